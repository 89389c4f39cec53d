"""Helpers shared by the test files."""
import json
import os
import runpy
import shutil
import signal
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def update_gap(a, b, base):
    """||a - b|| / ||a - base|| over the tensors of two state dicts and their common start: how far apart two runs
    ended, against how far they moved. (A max-abs bound is flaky: Adam turns a rounding-level difference of a
    near-zero gradient into a step of lr.)"""
    def norm(diff):
        return sum((diff(k) ** 2).sum() for k in a) ** 0.5
    return (norm(lambda k: a[k].double() - b[k].double()) / norm(lambda k: a[k].double() - base[k].double())).item()


def python(*argv, nproc=1):
    """The command line that runs a script (or `-m module`) with its arguments: in one process, or in nproc ranks
    under torchrun (CPU ranks on gloo in the tests)."""
    return [sys.executable, *map(str, argv)] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, argv)]


def run_here(monkeypatch, script, *argv):
    """A training script (or, without .py, a module: `eval.gsm8k`) in this process, on the CPU: no interpreter
    start-up, the slow part of a tiny run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    if script.endswith(".py"):
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    else:  # as `python -m`: a fresh copy of the module runs as __main__ (the imported one is set aside meanwhile)
        monkeypatch.delitem(sys.modules, script, raising=False)
        runpy.run_module(script, run_name="__main__", alter_sys=True)


def refusal(monkeypatch, capsys, script, *argv):
    """run_here for a command that must stop with one sentence -> that sentence: the message of its SystemExit
    (exit status 1), or the last line argparse printed (status 2). Any other exception propagates, as its
    traceback would."""
    with pytest.raises(SystemExit) as e:
        run_here(monkeypatch, script, *argv)
    if isinstance(e.value.code, str):
        return e.value.code
    assert e.value.code == 2, f"{script} exited with {e.value.code!r}, not with a sentence"
    return capsys.readouterr().err.strip().splitlines()[-1]


def adamw(params, lr, wd):
    """common.build_optimizer's groups for a reference trainer: decay on matrices, none on norms and biases."""
    params = list(params)
    return torch.optim.AdamW([{"params": [q for q in params if q.dim() >= 2], "weight_decay": wd},
                              {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0}], lr=lr)


def clip_grads(params, clip):
    """torch's clip_grad_norm_ for a reference trainer: scale by clip / (norm + 1e-6) when that is below 1.
    -> the norm before clipping."""
    params = list(params)
    norm = torch.cat([q.grad.flatten() for q in params]).norm().item()
    for q in params:
        q.grad *= min(1.0, clip / (norm + 1e-6))
    return norm


def nan_checkpoint(src, dst):
    """A copy of checkpoint `src` at `dst` whose final norm holds a NaN: every loss computed through it is NaN."""
    shutil.copytree(src, dst)
    w = load_file(os.path.join(dst, "model.safetensors"))
    w["model.norm.weight"][0] = float("nan")
    save_file(w, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def perturb_in_place(ckpt):
    """Checkpoint `ckpt`'s weights changed in place, as retraining it would: every tensor nudged, the file rewritten."""
    path = os.path.join(ckpt, "model.safetensors")
    save_file({k: v + 1e-3 for k, v in load_file(path).items()}, path, metadata={"format": "pt"})


def recording_evaluate(seen, batch_sizes=None):
    """A stand-in for common.evaluate that appends the weights it scored (layer 0's q_proj) to `seen` (and its
    batch size to `batch_sizes`) and gives its k-th call (from 1) accuracy 0.25 k, keyed to the rows it was given."""
    def evaluate(model, tok, rows, max_new_tokens=64, batch_size=256, **kw):
        seen.append(model.state_dict()["layers.0.self_attn.q_proj.weight"].clone())
        if batch_sizes is not None:
            batch_sizes.append(batch_size)
        return {"accuracy": 0.25 * len(seen), "n": len(rows), "per_task": {}, "max_new_tokens": max_new_tokens,
                "prompts": common.prompts_key(rows)}
    return evaluate


def saved_state(ckpt, tmp):
    """ckpt's train_state/ (torch.distributed.checkpoint's sharded files) as one nested dict of whole tensors:
    {"model": {"model": fp32 weights, "optimizer": ...}, "value": {...}}; `tmp` is a scratch directory."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    path = os.path.join(tmp, f"state-{len(os.listdir(tmp))}.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ("assuming the intent is to load in a single process")
        dcp_to_torch_save(os.path.join(ckpt, "train_state"), path)
    return torch.load(path, weights_only=False)


def kill_at_first_checkpoint(proc, out, timeout):
    """kill -9 (a crash, not a clean exit) the training run `proc` writing to `out` as soon as its first checkpoint
    is there -> the step that checkpoint holds."""
    state = os.path.join(out, "train_state.pt")
    deadline = time.time() + timeout
    while not os.path.isfile(state) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isfile(state), proc.stderr.read()[-2000:]
    return torch.load(state, weights_only=False)["step"]


def eval_length(monkeypatch, script, *argv):
    """The --eval-max-new-tokens a script's first held-out evaluation decodes with (its run stops there)."""
    class Stop(Exception):
        pass

    def evaluate(model, tok, rows, max_new_tokens=None, batch_size=None, **kw):
        raise Stop(max_new_tokens)
    monkeypatch.setattr(common, "evaluate", evaluate)
    with pytest.raises(Stop) as e:
        run_here(monkeypatch, script, *argv)
    return e.value.args[0]


def held_out_file(path, n):
    """Writes n held-out prompts of the built-in tasks (RLVR rows) to path -> path."""
    import tasks
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in tasks.make_tasks(seed=1, n_sft=2, n_prefs=2, n_rl=2, n_eval=n)[3])
    return path


def syncs_between_backwards(monkeypatch, script, *argv):
    """Runs a script in this process -> (its backward calls, the host syncs between its first and last backward).
    On a GPU a .cpu(), an .item() or a blocking copy to the device waits for every kernel queued so far: one between
    two micro-batches drains the queue after a backward, and the GPU idles while Python launches the next forward."""
    events, orig = [], {k: getattr(torch.Tensor, k) for k in ("cpu", "item", "to", "backward")}

    def record(name, is_sync=lambda *a, **kw: True):
        def f(self, *a, **kw):
            if is_sync(*a, **kw):
                events.append(name)
            return orig[name](self, *a, **kw)
        return f
    to_device = lambda *a, **kw: "device" in kw or any(isinstance(x, (torch.device, str)) for x in a)  # noqa: E731
    for name in ("cpu", "item", "backward"):
        monkeypatch.setattr(torch.Tensor, name, record(name))
    monkeypatch.setattr(torch.Tensor, "to", record("to", to_device))
    run_here(monkeypatch, script, *argv)
    first, last = events.index("backward"), len(events) - 1 - events[::-1].index("backward")
    return events.count("backward"), [e for e in events[first:last] if e != "backward"]
