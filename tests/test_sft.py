"""
data.py and sft.py: assistant-only targets, packing, loss normalisation, FSDP2 parity, resume, bad input.

    python -m pytest tests/test_sft.py -v
"""
import gzip
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import data
import tasks
from common import IGNORE
from helpers import (adamw, clip_grads, eval_length, held_out_file, kill_at_first_checkpoint, nan_checkpoint,
                     python, recording_evaluate, refusal, run_here, saved_state, syncs_between_backwards, update_gap)
from model import Llama, LlamaConfig
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}  # CPU runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random base checkpoint and a 96-row SFT file from the built-in tasks."""
    d = tmp_path_factory.mktemp("tiny")
    sft = tasks.make_tasks(seed=0, n_sft=96, n_prefs=2, n_rl=2, n_eval=2)[0]
    base = tasks.make_base_checkpoint(str(d / "base"), sft, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                      ffn_dim=64, vocab_size=300)
    path = str(d / "sft.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in sft)
    return base, path


def run_sft(tiny, out, *extra, nproc=1, wait=True, env=None):
    base, path = tiny
    cmd = ["sft.py", "--ckpt", base, "--data", path, "--preset", "tiny", "--out", str(out), "--val-frac", "0",
           *map(str, extra)]
    cmd = python(*cmd, nproc=nproc)
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    r = subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def losses(out):
    return [json.loads(ln)["loss"] for ln in open(os.path.join(out, "metrics.jsonl"))]


# -----------------------------------------------------------------------------
# targets and batches


def test_assistant_targets_multiturn(tiny):
    tok = Tokenizer.from_pretrained(tiny[0])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sam has 3 pens."},
            {"role": "assistant", "content": "3 + 1 = 4.\n#### 4"}, {"role": "user", "content": "And cats?"},
            {"role": "assistant", "content": "The calm cat is old."}]
    ids, labels = data.encode_sft(tok, msgs, max_len=512)
    trained = [t for t in labels if t != IGNORE]
    assert tok.decode(trained) == "3 + 1 = 4.\n#### 4<|endoftext|>The calm cat is old.<|endoftext|>"
    assert [i for i, t in zip(ids, labels) if t != IGNORE] == trained
    # truncation keeps a prefix; nothing left to train on -> dropped
    assert data.encode_sft(tok, msgs, max_len=8) is None
    assert data.encode_sft(tok, msgs, max_len=20, truncate=False) is None
    assert data.encode_sft(tok, msgs, max_len=len(ids), truncate=False) == (ids, labels)  # exactly max_len fits
    # the count of truncated examples sft.py prints: one cut and kept, not one that fits exactly or is dropped
    cut = []
    assert data.encode_sft(tok, msgs, max_len=len(ids), cut=cut) == (ids, labels) and cut == []
    assert data.encode_sft(tok, msgs, max_len=8, cut=cut) is None and cut == []
    assert data.encode_sft(tok, msgs, max_len=len(ids) - 1, cut=cut) == (ids[:-1], labels[:-1]) and cut == [len(ids)]


def test_a_target_on_the_first_token_alone_trains_nothing(monkeypatch):
    # the first token has no position before it to predict it from (pad_batch drops labels[0]): an example whose
    # only trained token is the first one is dropped, not a batch row without a target
    monkeypatch.setattr(data, "tokenize_conversation", lambda tok, msgs: ([5, 6, 7], [True, False, False]))
    assert data.encode_sft(None, [], max_len=8) is None
    monkeypatch.setattr(data, "tokenize_conversation", lambda tok, msgs: ([5, 6, 7], [True, False, True]))
    assert data.encode_sft(None, [], max_len=8) == ([5, 6, 7], [5, IGNORE, 7])


def test_packed_loss_equals_padded_loss(tiny):
    tok = Tokenizer.from_pretrained(tiny[0])
    model = Llama.from_pretrained(tiny[0])
    rows = [json.loads(ln)["messages"] for ln in open(tiny[1])][:5]
    exs = [data.encode_sft(tok, m, 256) for m in rows]
    padded, packed = data.pad_batch(exs, tok.pad_id), data.pack_batch(exs)
    assert (padded["targets"] != IGNORE).sum() == (packed["targets"] != IGNORE).sum()
    lp_pad = common.token_logprobs(model, padded["input_ids"], padded["targets"])
    lp_pack = common.token_logprobs(model, packed["input_ids"], packed["targets"],
                                    position_ids=packed["position_ids"], doc_ids=packed["doc_ids"])
    # token by token (both are in example order): a sum of ~1000 in fp32 is only good to ~1e-4
    a, b = lp_pad[padded["targets"] != IGNORE], lp_pack[packed["targets"] != IGNORE]
    assert (a - b).abs().max().item() < 1e-5


# -----------------------------------------------------------------------------
# the training script


def test_accumulation_and_two_process_fsdp_match(tiny, tmp_path):
    """One micro-batch of 8, eight of 1, and 2 ranks x 4 give the same losses and weights: the loss is
    normalised by the step's global target-token count, not per micro-batch. 4 validation rows at micro-batch
    4 leave rank 1 without any: it must still join each validation forward (FSDP), and the value is the same."""
    val = ("--val-frac", 0.05, "--eval-every", 1)
    run_sft(tiny, tmp_path / "a", "--max-steps", 3, "--batch-size", 8, "--micro-batch-size", 8, *val)
    run_sft(tiny, tmp_path / "b", "--max-steps", 3, "--batch-size", 8, "--micro-batch-size", 1, *val)
    run_sft(tiny, tmp_path / "c", "--max-steps", 3, "--batch-size", 8, "--micro-batch-size", 4, *val, nproc=2)
    a, b, c = (str(tmp_path / k) for k in "abc")
    assert losses(a) == pytest.approx(losses(b), abs=1e-6) and losses(a) == pytest.approx(losses(c), abs=1e-6)
    va, vc = ([json.loads(ln)["val_loss"] for ln in open(os.path.join(d, "metrics.jsonl"))] for d in (a, c))
    assert len(va) == 3 and va == pytest.approx(vc, abs=1e-6)
    assert max_diff(weights(a), weights(b)) < 1e-4
    assert max_diff(weights(a), weights(c)) < 1e-4
    # and the per-micro-batch mean (the ablation) is a different objective here
    run_sft(tiny, tmp_path / "d", "--max-steps", 3, "--batch-size", 8, "--micro-batch-size", 1,
            "--loss-reduction", "mean", *val)
    assert max_diff(weights(a), weights(str(tmp_path / "d"))) > 1e-4


ENCODE_ROWS = """
import common, data
rank, world, device = common.init_distributed()
calls = []
def encode(x):  # row 5 is one the chat template refuses
    calls.append(x)
    if x == 5:
        raise ValueError("five")
    return [x] * x
rows = [(f"f.jsonl:{i + 1}", i) for i in range(11)]
got, bad = data.encode_rows(rows, encode, skip_bad=True, block=2)
assert got == [[x] * x for x in range(11) if x != 5] and bad == 1
assert calls == list(range(rank, 11, world))  # this rank's share alone, in blocks of 2 rows per rank
try:
    data.encode_rows(rows, encode, skip_bad=False, block=2)
    raise AssertionError("no DataError")
except data.DataError as e:
    assert str(e) == "f.jsonl:6: five", e
common.cleanup()
print("ok")
"""


def test_encode_rows_shares_the_tokenization_out_among_ranks(tmp_path):
    """Tokenizing is the slow part of loading a mixture: each of 2 ranks encodes every other row, and both get
    every result in order, with the same bad row named (or skipped and counted) on each; one process, all."""
    script = tmp_path / "ranks.py"
    script.write_text(ENCODE_ROWS)
    r = subprocess.run(python(script, nproc=2), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("ok") == 2, r.stderr[-3000:]
    exec(ENCODE_ROWS.replace("rank, world, device = common.init_distributed()", "rank, world = 0, 1"), {})


def test_collectives_and_loading_under_two_processes(tiny, tmp_path):
    """common's helpers on 2 gloo ranks: all_reduce sums or takes the max over ranks (a tensor too), load_model
    shards a frozen model (a reference: no gradients) and passes --grad-checkpoint, reshard shards its root again
    after a forward, full_state_dict gathers the checkpoint's weights on rank 0 and nothing elsewhere. Under CUDA's
    bf16 policy, a frozen model is stored in bf16 and computes what a trained one (fp32 masters) does."""
    script = tmp_path / "ranks.py"
    script.write_text(f"""
import torch, common
from torch.distributed.tensor import DTensor
from model import Llama
rank, world, device = common.init_distributed()
assert world == 2 and common.all_reduce(rank + 1.0) == 3.0 and common.all_reduce(rank + 1.0, op="max") == 2.0
assert common.all_reduce(torch.tensor([rank, -rank]), op="max").tolist() == [1.0, 0.0]
m = common.load_model({tiny[0]!r}, device, requires_grad=False, grad_checkpoint=True)
assert m.grad_checkpoint and not any(p.requires_grad for p in m.parameters())
# a forward without backward leaves the root's parameters gathered (plain tensors); reshard() shards them again
with torch.no_grad():
    m(torch.tensor([[1, 2, 3]]))
assert not isinstance(m.embed_tokens.weight, DTensor) and isinstance(m.layers[0].mlp.up_proj.weight, DTensor)
common.reshard(m)
assert isinstance(m.embed_tokens.weight, DTensor) and isinstance(m.norm.weight, DTensor)
sd = common.full_state_dict(m)
if rank == 0:
    ref = Llama.from_pretrained({tiny[0]!r}).state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
else:
    assert sd == {{}}
# CUDA's policy (bf16 compute): a frozen model is stored in bf16, a trained one in fp32, with the same forward
from torch.distributed.fsdp import MixedPrecisionPolicy
common.mp_policy = lambda device: MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
frozen, trained = common.load_model({tiny[0]!r}, device, requires_grad=False), common.load_model({tiny[0]!r}, device)
assert {{p.dtype for p in frozen.parameters()}} == {{torch.bfloat16}}
assert {{p.dtype for p in trained.parameters()}} == {{torch.float32}}
x = torch.tensor([[5, 1, 2, 3, 4]])
with torch.no_grad():
    out = frozen(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, trained(x))
    assert torch.equal(common.token_logprobs(frozen, x, x), common.token_logprobs(trained, x, x))
common.cleanup()
print("ok")
""")
    r = subprocess.run(python(script, nproc=2), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("ok") == 2, r.stderr[-3000:]  # (the ranks' lines may interleave)


def test_packing_matches_padding_in_training(tiny, tmp_path):
    run_sft(tiny, tmp_path / "pad", "--max-steps", 2, "--batch-size", 8, "--micro-batch-size", 4)
    run_sft(tiny, tmp_path / "pack", "--max-steps", 2, "--batch-size", 8, "--micro-batch-size", 4, "--packing")
    assert losses(str(tmp_path / "pad")) == pytest.approx(losses(str(tmp_path / "pack")), abs=1e-5)


def test_compiled_blocks_match_eager(tiny, tmp_path):
    # --compile (torch.compile per block, inductor on the CPU) trains to the eager run's losses and weights,
    # and the final evaluation's generate() runs the compiled model eagerly
    held_out = held_out_file(tmp_path / "held_out.jsonl", 4)
    args = ("--max-steps", 3, "--batch-size", 8, "--micro-batch-size", 4, "--eval-prompts", held_out)
    for name, flag in (("eager", ()), ("compiled", ("--compile",))):
        cache = tmp_path / f"inductor-{name}"
        run_sft(tiny, tmp_path / name, *args, *flag, env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
        compiled = any(f.is_file() for f in cache.rglob("*"))
        assert compiled == bool(flag)  # inductor wrote kernels for the compiled run only
    assert losses(str(tmp_path / "eager")) == pytest.approx(losses(str(tmp_path / "compiled")), abs=1e-5)
    assert max_diff(weights(str(tmp_path / "eager")), weights(str(tmp_path / "compiled"))) < 1e-5
    ev = [json.load(open(tmp_path / d / "eval.json")) for d in ("eager", "compiled")]
    assert ev[0] == ev[1]


def hf_nll(hf, tok, conversations):
    """Summed NLL over the assistant tokens of each conversation (one forward each: no padding), and their
    count: the reference for the script's loss, from transformers."""
    from tokenizer import tokenize_conversation
    nll, n = 0.0, 0
    for msgs in conversations:
        ids, mask = tokenize_conversation(tok, msgs)
        x = torch.tensor([ids])
        logp = torch.log_softmax(hf(x).logits[0, :-1], -1).gather(1, x[0, 1:, None])[:, 0]  # token t+1 given :t
        on = torch.tensor(mask[1:], dtype=torch.bool)
        nll, n = nll - logp[on].sum(), n + int(on.sum())
    return nll, n


def grad_norm(model):
    return torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None)).item()


def test_first_step_loss_and_gradient_match_transformers(tiny, tmp_path):
    """The logged loss of a step is the mean NLL over the step's assistant tokens (all examples, all
    micro-batches), and its gradient norm that mean's: both against transformers in float64. The step
    holds the whole 6-row file, so its order does not matter for the sum. With --loss-reduction mean the
    gradient is that of the mean over micro-batches of each micro-batch's token mean (the logged loss stays
    the token mean); its micro-batches are the step's rows in the seeded order, two by two."""
    import transformers
    base, path = tiny
    rows = open(path).readlines()[:6]
    small = tmp_path / "six.jsonl"
    small.write_text("".join(rows))
    for red in ("sum", "mean"):
        run_sft((base, str(small)), tmp_path / red, "--max-steps", 1, "--batch-size", 6, "--micro-batch-size", 2,
                "--eval-n", 0, "--loss-reduction", red)
    tok = Tokenizer.from_pretrained(base)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base).double()
    nll, n = hf_nll(hf, tok, [json.loads(r)["messages"] for r in rows])
    (nll / n).backward()
    m = json.loads(open(tmp_path / "sum" / "metrics.jsonl").readline())
    assert m["tokens"] == n
    assert m["loss"] == pytest.approx((nll / n).item(), rel=1e-5)
    assert m["grad_norm"] == pytest.approx(grad_norm(hf), rel=1e-6)  # (measured 4e-8: a norm over some params shows)
    hf.zero_grad()
    msgs = data.load_mixture([str(small)], data.sft_row, seed=0)[0]  # the script's seeded shuffle of the file
    order = data.epoch_order(6, 0, 0)
    for j in range(0, 6, 2):
        nll_j, n_j = hf_nll(hf, tok, [msgs[k] for k in order[j:j + 2]])
        (nll_j / n_j / 3).backward()
    m = json.loads(open(tmp_path / "mean" / "metrics.jsonl").readline())
    assert m["loss"] == pytest.approx((nll / n).item(), rel=1e-5)
    assert m["grad_norm"] == pytest.approx(grad_norm(hf), rel=1e-6)


def test_a_run_matches_a_reference_trainer(tiny, tmp_path):
    """Four optimizer steps of the script against a trainer written out here on transformers in float64:
    8 rows, the first 2 of the seeded shuffle held out for validation, the other 6 in batches of 3 (micro-
    batches of 1) for 2 epochs, each epoch in its own order; lr 1e-3 warmed up over 2 steps then cosine; AdamW
    with weight decay 1.0 on matrices only; the gradient clipped to norm 0.3. Each step's logged loss, lr,
    gradient norm (before clipping) and validation loss (after the step, per token over both rows), and the
    final weights."""
    import transformers
    base, path = tiny
    small = tmp_path / "eight.jsonl"
    small.write_text("".join(open(path).readlines()[:8]))
    lr, clip = 1e-3, 0.3
    r = run_sft((base, str(small)), tmp_path / "o", "--epochs", 2, "--batch-size", 3, "--micro-batch-size", 1,
                "--val-frac", 0.25, "--eval-every", 1, "--lr", lr, "--schedule", "cosine", "--warmup-ratio", 0.5,
                "--weight-decay", 1.0, "--grad-clip", clip, "--eval-n", 0)
    assert "examples: 6 train, 2 val;" in r.stdout
    logged = [json.loads(ln) for ln in open(tmp_path / "o" / "metrics.jsonl")]
    assert [m["step"] for m in logged] == [0, 1, 2, 3]

    tok = Tokenizer.from_pretrained(base)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base).double()
    msgs = data.load_mixture([str(small)], data.sft_row, seed=0)[0]  # the script's seeded shuffle of the file
    val_rows, train_rows = msgs[:2], msgs[2:]
    with torch.no_grad():  # rows of unequal length: a mean of the two rows' means would differ
        assert hf_nll(hf, tok, val_rows[:1])[1] != hf_nll(hf, tok, val_rows[1:])[1]
    params = list(hf.parameters())
    opt = adamw(params, lr, 1.0)
    orders = [data.epoch_order(6, e, 0) for e in (0, 1)]
    assert {frozenset(o[:3]) for o in orders} != {frozenset(orders[0][:3])}  # the second epoch regroups the rows
    for step, m in enumerate(logged):
        epoch, i = divmod(step, 2)
        rows = [train_rows[k] for k in orders[epoch][3 * i:3 * i + 3]]
        step_lr = lr * (step + 1) / 2 if step < 2 else lr * 0.5 * (1 + math.cos(math.pi * (step - 2) / 2))
        for g in opt.param_groups:
            g["lr"] = step_lr
        nll, n = hf_nll(hf, tok, rows)
        (nll / n).backward()
        norm = clip_grads(params, clip)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            vnll, vn = hf_nll(hf, tok, val_rows)
        assert m["loss"] == pytest.approx((nll / n).item(), rel=1e-5)
        assert m["lr"] == pytest.approx(step_lr, rel=1e-12)
        assert m["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > clip  # clipping is in play
        assert m["val_loss"] == pytest.approx((vnll / vn).item(), rel=1e-5)
    ours = weights(str(tmp_path / "o"))
    ref = {k: v.float() for k, v in hf.state_dict().items()}
    diff = max_diff(ours, ref)
    assert diff < 2e-5, diff  # (measured 4.5e-6: fp32 against float64)


def test_chat_template_flag_trains_with_and_saves_the_template(tiny, tmp_path):
    """--chat-template FILE: the step's tokens are those the file's template renders, and the output's
    tokenizer carries it (the later stages, eval/ and vLLM render prompts with it). This template ends an
    assistant turn with " (the end)": more trained tokens than the checkpoint's own template gives."""
    from tokenizer import tokenize_conversation
    base, path = tiny
    src = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{% if m['role'] == 'assistant' %}"
           " (the end){{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    (tmp_path / "t.jinja").write_text(src)
    rows = open(path).readlines()[:4]
    (tmp_path / "four.jsonl").write_text("".join(rows))
    run_sft((base, str(tmp_path / "four.jsonl")), tmp_path / "o", "--chat-template", tmp_path / "t.jinja",
            "--max-steps", 1, "--batch-size", 4, "--eval-n", 0)
    saved = Tokenizer.from_pretrained(str(tmp_path / "o"))
    assert saved.chat_template == src
    n = sum(sum(tokenize_conversation(saved, json.loads(r)["messages"])[1][1:]) for r in rows)
    own = sum(sum(tokenize_conversation(Tokenizer.from_pretrained(base), json.loads(r)["messages"])[1][1:])
              for r in rows)
    assert json.loads(open(tmp_path / "o" / "metrics.jsonl").readline())["tokens"] == n != own


def test_kill_and_resume_matches_uninterrupted(tiny, tmp_path):
    args = ("--max-steps", 12, "--batch-size", 8, "--micro-batch-size", 1, "--save-every", 2)
    run_sft(tiny, tmp_path / "full", *args)
    out = tmp_path / "killed"
    proc = run_sft(tiny, out, *args, wait=False)
    step = kill_at_first_checkpoint(proc, out, 120)
    assert step < 12, "the run finished before it could be killed"
    before = open(out / "metrics.jsonl").readlines()[:step]
    r = run_sft(tiny, out, *args, "--resume")
    # it did resume (a fresh start would reach the same weights too): the saved steps were not run again
    assert f"resumed from {out} at step {step}" in r.stdout
    assert open(out / "metrics.jsonl").readlines()[:step] == before
    assert max_diff(weights(str(tmp_path / "full")), weights(str(out))) < 1e-6
    assert losses(str(out)) == pytest.approx(losses(str(tmp_path / "full")), abs=1e-6)
    # a finished run resumes at its last step: nothing to redo, its log kept whole, the weights as they were
    full = str(tmp_path / "full")
    log, w = open(os.path.join(full, "metrics.jsonl")).read(), weights(full)
    assert f"resumed from {full} at step 12" in run_sft(tiny, full, *args, "--resume").stdout
    assert open(os.path.join(full, "metrics.jsonl")).read() == log and max_diff(w, weights(full)) == 0


def test_two_process_run_resumes_its_sharded_state(tiny, tmp_path):
    """Under torchrun, every rank saves its shards of the Adam moments and fp32 master weights (the safetensors
    are bf16 here) and --resume reads them back into its FSDP2 shards: 2 steps, then 2 more resumed, on 2 ranks,
    give the losses and weights of 4 uninterrupted steps (on 1 process: 2 ranks equal 1,
    test_accumulation_and_two_process_fsdp_match)."""
    args = ("--batch-size", 8, "--micro-batch-size", 4, "--schedule", "constant", "--warmup-ratio", 0,
            "--save-dtype", "bf16")
    full, out = tmp_path / "full", tmp_path / "two"
    run_sft(tiny, full, "--max-steps", 4, *args)
    run_sft(tiny, out, "--max-steps", 2, *args, nproc=2)
    assert f"resumed from {out} at step 2" in run_sft(tiny, out, "--max-steps", 4, "--resume", *args, nproc=2).stdout
    assert losses(str(out)) == pytest.approx(losses(str(full)), abs=1e-5)
    assert len(list((out / "train_state").glob("*.distcp"))) == 2  # one file of shards per rank
    master = [saved_state(d, tmp_path)["model"]["model"] for d in (full, out)]
    assert update_gap(*master, Llama.from_pretrained(tiny[0]).state_dict()) < 1e-3


def test_one_process_checkpoint_resumes_under_two(tiny, tmp_path):
    """A checkpoint saved by a plain 1-process run resumes on 2 ranks with its Adam moments: the
    optimizer state is keyed by parameter name either way (torch's own state_dict() numbers the parameters,
    which set_optimizer_state_dict dropped silently, and the next save then failed with KeyError: '0')."""
    args = ("--batch-size", 8, "--micro-batch-size", 2, "--schedule", "constant", "--warmup-ratio", 0)
    full, out = tmp_path / "full", tmp_path / "one"
    run_sft(tiny, full, "--max-steps", 4, *args)
    run_sft(tiny, out, "--max-steps", 2, *args)
    assert f"resumed from {out} at step 2" in run_sft(tiny, out, "--max-steps", 4, "--resume", *args, nproc=2).stdout
    assert losses(str(out)) == pytest.approx(losses(str(full)), abs=1e-5)
    ends = [Llama.from_pretrained(str(d)).state_dict() for d in (full, out)]
    assert update_gap(*ends, Llama.from_pretrained(tiny[0]).state_dict()) < 1e-3


def test_trim_metrics_drops_the_steps_about_to_be_redone(tmp_path):
    rows = [json.dumps({"step": k, "loss": 1.0}) + "\n" for k in range(5)]
    # the last line cut by a kill; lines that are not rows with a step (edited in by hand, say) are no step's
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"loss": 1.0}\n[1]\n"s"\n{"step": 5, "lo')
    common.trim_metrics(str(tmp_path), 3)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(rows[:3])


def test_trim_metrics_that_fails_midway_keeps_the_log(tmp_path, monkeypatch):
    # the rewrite dies after the file it writes was opened (truncated): a kill, a full disk. The log of the steps
    # before the checkpoint must survive it (a resumed run only appends to it), as any other file in --out does
    rows = "".join(json.dumps({"step": k, "loss": 1.0}) + "\n" for k in range(5))
    (tmp_path / "metrics.jsonl").write_text(rows)

    def dies_writing(file, mode="r", *a, **k):
        f = open(file, mode, *a, **k)
        if "w" in mode:
            f.close()
            raise OSError(28, "No space left on device")
        return f
    monkeypatch.setattr(common, "open", dies_writing, raising=False)
    with pytest.raises(OSError):
        common.trim_metrics(str(tmp_path), 3)
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == rows
    common.trim_metrics(str(tmp_path), 3)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(rows.splitlines(True)[:3])


def test_bf16_checkpoint_resumes_fp32_weights_and_drops_stale_index(tiny, tmp_path):
    # the real presets save bf16 safetensors: --resume must still continue from the fp32 master weights
    # (kept in train_state/), and a shard index left by an earlier, sharded save must not survive
    tok = Tokenizer.from_pretrained(tiny[0])
    model = Llama.from_pretrained(tiny[0])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # weights that bf16 rounds
    opt = torch.optim.AdamW(model.parameters())
    out = str(tmp_path / "ck")
    model.save_pretrained(out, max_shard_bytes=20_000)  # an earlier sharded save in the same directory
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    common.save_checkpoint(out, model, tok, opt, {"step": 3}, dtype=torch.bfloat16)
    assert not os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    again = common.load_model(out, torch.device("cpu"))  # bf16-rounded, as a resumed run first loads it
    assert max_diff(again.state_dict(), model.state_dict()) > 1e-6
    opt2 = torch.optim.AdamW(again.parameters())
    assert common.load_train_state(out, again, opt2)["step"] == 3
    assert max_diff(again.state_dict(), model.state_dict()) == 0


def test_resume_after_a_crash_between_the_renames(tmp_path):
    # replace_dir moved out -> out.old and died before tmp -> out: the checkpoint (and the run's logs) are
    # moved back to out, where the resumed run goes on
    out = tmp_path / "run"
    (tmp_path / "run.old").mkdir()
    for f in ("train_state.pt", "config.json", "metrics.jsonl"):
        (tmp_path / "run.old" / f).write_text("x")
    assert common.find_checkpoint(str(out)) == str(out)
    assert (out / "metrics.jsonl").exists() and not (tmp_path / "run.old").exists()
    assert common.find_checkpoint(str(tmp_path / "none")) is None


def test_resume_after_a_crash_between_the_renames_resolves_out_as_the_save_does(tmp_path):
    # the save swaps the directory --out resolves to (a symlink's target, "sub/link/../run" where the link
    # leads): --resume looks there too, for the checkpoint and for a .old left by a crash between the renames
    real = tmp_path / "real"
    (real / "deep").mkdir(parents=True)
    (tmp_path / "sub").mkdir()
    os.symlink(real / "deep", tmp_path / "sub" / "link")
    os.symlink(real / "run", tmp_path / "run")  # dangling while the checkpoint is in real/run.old
    (real / "run.old").mkdir()
    for f in ("train_state.pt", "config.json", "metrics.jsonl"):
        (real / "run.old" / f).write_text("x")
    assert common.find_checkpoint(str(tmp_path / "run")) == str(real / "run")
    assert (tmp_path / "run" / "metrics.jsonl").exists() and not (real / "run.old").exists()
    assert common.find_checkpoint(str(tmp_path / "sub" / "link" / ".." / "run")) == str(real / "run")
    # a crash in a first save: no checkpoint yet, but what --out held (the log, a user's files) is moved back,
    # not left for the next save to delete
    (tmp_path / "first.old").mkdir()
    (tmp_path / "first.old" / "notes.txt").write_text("keep me")
    assert common.find_checkpoint(str(tmp_path / "first")) is None
    assert (tmp_path / "first" / "notes.txt").read_text() == "keep me"


def test_out_a_symlink_to_a_directory_not_made_yet(tmp_path):
    # --out is made if missing (check_out): a symlink's target too, where the saves write
    os.symlink(tmp_path / "target", tmp_path / "run")
    common.log_metrics(str(tmp_path / "run"), {"step": 0})
    assert (tmp_path / "target" / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_failed_save_keeps_last_checkpoint(tiny, tmp_path, monkeypatch):
    tok = Tokenizer.from_pretrained(tiny[0])
    model = Llama.from_pretrained(tiny[0])
    out = str(tmp_path / "ck")
    common.save_checkpoint(out, model, tok)
    before = weights(out)
    with torch.no_grad():
        model.norm.weight.add_(1.0)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(tok, "save_pretrained", boom)  # dies after the weights were written
    with pytest.raises(OSError):
        common.save_checkpoint(out, model, tok)
    assert max_diff(before, weights(out)) == 0
    assert not os.path.exists(tmp_path / ".ck.tmp")  # the half-written temp directory is gone


def test_checkpoint_dir_spelled_with_slash_readable_and_leftovers_removed(tiny, tmp_path):
    # --out run/ (as shell completion writes it) saves and resumes like --out run; the directory gets the
    # umask's mode as transformers' saves do (mkdtemp's 0700 would lock out a vLLM server run as another
    # user); what a killed save left beside it is cleared by the next save
    tok = Tokenizer.from_pretrained(tiny[0])
    model = Llama.from_pretrained(tiny[0])
    opt = torch.optim.AdamW(model.parameters())
    out = str(tmp_path / "run") + "/"
    (tmp_path / ".run.tmp").mkdir()
    (tmp_path / ".run.tmp" / "model.safetensors").write_text("half")
    umask = os.umask(0o022)
    try:
        for step in (1, 2):  # the second save replaces the first
            common.save_checkpoint(out, model, tok, opt, {"step": step})
    finally:
        os.umask(umask)
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert os.stat(tmp_path / "run").st_mode & 0o777 == 0o755
    assert common.find_checkpoint(out) == str(tmp_path / "run")
    assert common.load_train_state(out, model, opt)["step"] == 2


# -----------------------------------------------------------------------------
# bad input: one clear error naming file and line


@pytest.mark.parametrize("line, msg", [
    ('{"messages": [{"role": "user", "content": "hi"}', "malformed JSON"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
])
def test_bad_rows(tmp_path, line, msg):
    good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    path = tmp_path / "d.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(data.DataError, match=f"{path}:2: .*{msg}"):
        data.load_mixture([str(path)], data.sft_row)
    rows, skipped = data.load_mixture([str(path)], data.sft_row, skip_bad=True)
    assert (len(rows), skipped) == (1, 1)


def test_rows_the_chat_template_cannot_train_on_are_bad_rows(tiny, tmp_path):
    # tokenization errors (an assistant turn first, a template's raise_exception) name the file and line and
    # --skip-bad skips them, as for malformed rows; only the rows a fraction takes are tokenized
    tok = Tokenizer.from_pretrained(tiny[0])
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "c"}]}
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, good, bad)) + "\n")
    seen = []

    def encode(msgs):
        seen.append(msgs)
        return data.encode_sft(tok, msgs, 64)
    with pytest.raises(data.DataError, match=f"{path}:3: messages\\[0\\] is an assistant turn"):
        data.load_mixture([str(path)], data.sft_row, encode=encode)
    rows, skipped = data.load_mixture([str(path)], data.sft_row, skip_bad=True, encode=encode)
    assert len(rows) == 2 and skipped == 1 and rows[0] == data.encode_sft(tok, good["messages"], 64)
    seen.clear()
    assert len(data.load_mixture([f"{path}:0.34"], data.sft_row, seed=1, skip_bad=True, encode=encode)[0]) <= 1
    assert len(seen) == 1


def test_undecodable_files(tmp_path):
    # a non-UTF-8 byte is a malformed line (named, skippable); a UTF-8 BOM is fine; a truncated .gz is an error
    good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\ufeff" + good).encode() + b'{"messages": "\xff"}\n')
    with pytest.raises(data.DataError, match=f"{path}:2: not UTF-8"):
        data.load_mixture([str(path)], data.sft_row)
    assert data.load_mixture([str(path)], data.sft_row, skip_bad=True)[1] == 1
    gz = tmp_path / "t.jsonl.gz"
    blob = gzip.compress(good.encode() * 2000)
    gz.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(data.DataError, match=f"{gz}: corrupt or truncated gzip"):
        data.load_mixture([str(gz)], data.sft_row)
    only_bad = tmp_path / "b.jsonl"
    only_bad.write_text("nope\n")
    with pytest.raises(data.DataError, match="no valid row .1 malformed"):
        data.load_mixture([str(only_bad)], data.sft_row, skip_bad=True)


def test_unpaired_surrogate_is_a_bad_row(tiny, tmp_path):
    # "\ud83d" alone (half of an emoji's JSON escape, as cut-off scraped text has it) is valid JSON but not valid
    # Unicode: the tokenizer would stop the run with a TypeError traceback, even under --skip-bad. It is a bad row,
    # named, and skippable; an escaped pair ("\ud83d\ude00", one emoji) is fine.
    tok = Tokenizer.from_pretrained(tiny[0])
    rows = ['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
            '{"messages": [{"role": "user", "content": "a \\ud83d\\ude00"}, {"role": "assistant", "content": "b"}]}',
            '{"messages": [{"role": "user", "content": "a \\ud83d"}, {"role": "assistant", "content": "b"}]}']
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n")
    encode = lambda m: data.encode_sft(tok, m, 64)  # noqa: E731
    with pytest.raises(data.DataError, match=f"{path}:3: not valid Unicode .an unpaired surrogate .ud83d."):
        data.load_mixture([str(path)], data.sft_row, encode=encode)
    got, skipped = data.load_mixture([str(path)], data.sft_row, skip_bad=True, encode=encode)
    assert len(got) == 2 and skipped == 1


def test_empty_file_and_cli_error(tiny, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(data.DataError, match="e.jsonl: empty file"):
        data.load_mixture([str(empty)], data.sft_row)
    args = ["sft.py", "--ckpt", tiny[0], "--preset", "tiny", "--out", tmp_path / "o"]
    assert refusal(monkeypatch, capsys, *args, "--data", empty) == f"error: {empty}: empty file"
    # the tiny tokenizer has no BOS to add
    assert refusal(monkeypatch, capsys, *args, "--data", tiny[1], "--add-bos") == \
        "error: --add-bos: the tokenizer has no bos_token to add"
    assert refusal(monkeypatch, capsys, *args, "--data", tiny[1], "--chat-template", tmp_path / "none.jinja"
                   ).startswith("error: --chat-template: [Errno 2]")


def test_skip_bad_leaves_the_held_out_prompts_whole(tiny, tmp_path, monkeypatch, capsys):
    # --skip-bad is for training data: a held-out row skipped would change the prompts an accuracy is over
    held_out = tmp_path / "held_out.jsonl"
    row = tasks.make_tasks(seed=1, n_sft=2, n_prefs=2, n_rl=2, n_eval=1)[3][0]
    held_out.write_text(json.dumps(row) + "\n{not json\n")
    err = refusal(monkeypatch, capsys, "sft.py", "--ckpt", tiny[0], "--data", tiny[1], "--preset", "tiny",
                  "--out", tmp_path / "o", "--eval-prompts", held_out, "--skip-bad")
    assert err == f"error: {held_out}:2: malformed JSON (Expecting property name enclosed in double quotes)"
    held_out.write_text(json.dumps(row) + "\n")
    assert data.read_eval_prompts(str(held_out)) == [data.rlvr_row(row, "")]


def test_too_few_examples_says_why(tiny, tmp_path, monkeypatch, capsys):
    # every row dropped (here: all over --max-len with --drop-long) or skipped: the stop names the count, and the
    # counts line that says where the rows went is printed before it, not lost with the rest of the summary
    err = refusal(monkeypatch, capsys, "sft.py", "--ckpt", tiny[0], "--data", tiny[1], "--preset", "tiny",
                  "--out", tmp_path / "o", "--val-frac", "0", "--max-len", 4, "--drop-long")
    assert err == "error: 0 training examples is fewer than one batch of 32"
    assert "examples: 0 train, 0 val; 0 bad rows skipped, 0 truncated to --max-len, 96 dropped" in \
        capsys.readouterr().out


def test_preset_follows_the_data(tiny, tmp_path, monkeypatch, capsys):
    # data of one's own is for a real checkpoint: Tülu 3's hyperparameters (lr 5e-6, bf16 saves, a held-out batch
    # whose KV cache fits beside an 8B model's training state) unless --preset tiny is asked for, never the tiny
    # model's lr 3e-3 silently
    import common
    seen, batch_sizes = [], []
    monkeypatch.setattr(common, "evaluate", recording_evaluate(seen, batch_sizes))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps(tasks.make_tasks(seed=1, n_sft=2, n_prefs=2, n_rl=2, n_eval=1)[3][0]) + "\n")
    for preset, want, dtype in ((None, "preset tulu3-8b: lr 5e-06 linear, max length 4096, saved in bf16", "BF16"),
                                ("tiny", "preset tiny: lr 0.003 cosine, max length 256, saved in fp32", "F32")):
        out = tmp_path / str(preset)
        run_here(monkeypatch, "sft.py", "--ckpt", tiny[0], "--data", tiny[1], "--out", out, "--max-steps", 1,
                 "--batch-size", 2, "--eval-prompts", held_out, "--val-frac", 0,
                 *(["--preset", preset] if preset else []))
        log = capsys.readouterr().out
        assert want in log, log
        assert batch_sizes.pop() == (64 if preset is None else 256)
        with open(out / "model.safetensors", "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {dtype}


def test_mixture_counts_fractions_and_gzip(tmp_path):
    rows = [{"messages": [{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}]}
            for i in range(10)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(b, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    got, _ = data.load_mixture([f"{a}:0.5", f"{b}:3"], data.sft_row)
    assert len(got) == 8
    with pytest.raises(data.DataError, match="asks for 11 rows"):
        data.load_mixture([f"{a}:11"], data.sft_row)
    # as open-instruct's mixer reads it: up to 1 a fraction, so ":1" is the whole file, not one row; a fraction
    # of the rows rounded down (int(0.46 * 10) = 4, where round() would take 5)
    assert len(data.load_mixture([f"{a}:1"], data.sft_row)[0]) == 10
    assert len(data.load_mixture([f"{a}:0.46"], data.sft_row)[0]) == 4
    for bad in ("1.5", "-1", "x"):
        with pytest.raises(data.DataError, match="must be a fraction \\(0 to 1\\) or a row count"):
            data.load_mixture([f"{a}:{bad}"], data.sft_row)


def test_mixture_and_epoch_order_follow_the_seed(tmp_path):
    # a file's rows are shuffled by the seed (a fraction takes other rows, the validation rows are others),
    # and the data order is a permutation of its own per (seed, epoch): reproducible, new every epoch
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"messages": [{"role": "user", "content": str(i)},
                                                  {"role": "assistant", "content": "x"}]}) + "\n" for i in range(40)))
    take = lambda spec, seed: [r[0]["content"] for r in data.load_mixture([spec], data.sft_row, seed=seed)[0]]  # noqa
    assert take(str(a), 0) == take(str(a), 0) != take(str(a), 1)
    assert sorted(take(str(a), 0), key=int) == [str(i) for i in range(40)] != take(str(a), 0)
    assert set(take(f"{a}:0.25", 0)) != set(take(f"{a}:0.25", 1))
    assert take(f"{a}:1.0", 0) == take(f"{a}:1", 0) == take(str(a), 0)  # ":1.0" is the whole file too
    order = data.epoch_order(40, 0, 0)
    assert sorted(order) == list(range(40)) and order == data.epoch_order(40, 0, 0)
    assert order != data.epoch_order(40, 1, 0) and order != data.epoch_order(40, 0, 1)


def test_schedule_optimizer_and_step_plan():
    # after warmup, transformers' schedulers (the oracle) step for step; warmup starts at lr/warmup, not 0
    # (transformers' first step trains at lr 0)
    transformers = pytest.importorskip("transformers")
    from argparse import Namespace
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    for kind, make in (("linear", transformers.get_linear_schedule_with_warmup),
                       ("cosine", transformers.get_cosine_schedule_with_warmup)):
        hf = make(opt, 4, 30).lr_lambdas[0]
        assert [common.lr_at(s, 30, 2.0, 4, kind) for s in range(4, 31)] == pytest.approx(
            [2.0 * hf(s) for s in range(4, 31)], abs=1e-12)
        assert [common.lr_at(s, 30, 2.0, 4, kind) for s in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert common.lr_at(29, 30, 2.0, 0, "constant") == 2.0
    # AdamW with torch's defaults; decay on matrices only (not norms, biases)
    model = Llama(LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32))
    opt = common.build_optimizer(model, 1e-3, weight_decay=0.1)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    for g in opt.param_groups:
        assert all((p.dim() >= 2) == (g["weight_decay"] == 0.1) for p in g["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    # steps: whole batches per epoch, a fractional epoch's last step counted (rounded up), warmup rounded down,
    # accumulation per rank
    args = Namespace(batch_size=8, micro_batch_size=2, epochs=1.3, max_steps=None, warmup_ratio=0.3)
    assert common.plan_steps(100, args, 2) == (2, 12, 16, 4)  # 15.6 steps, 4.8 of warmup
    # a micro-batch larger than a rank's share of the batch shrinks to it (no accumulation)
    args = Namespace(batch_size=4, micro_batch_size=8, epochs=1, max_steps=None, warmup_ratio=0)
    assert common.plan_steps(100, args, 2) == (1, 25, 25, 0) and args.micro_batch_size == 2
    # every rank runs the same number of micro-batches: the batch must split evenly over micro-batches x ranks
    args = Namespace(batch_size=8, micro_batch_size=2, epochs=1, max_steps=None, warmup_ratio=0)
    with pytest.raises(SystemExit, match="--batch-size 8 must be a multiple of --micro-batch-size 2 x world size 3"):
        common.plan_steps(100, args, 3)
    args = Namespace(batch_size=8, micro_batch_size=8, epochs=2, max_steps=20, warmup_ratio=0.1)
    assert common.plan_steps(100, args, 1) == (1, 12, 20, 2)


def test_fractional_epochs_round_up_only_a_fraction():
    # --epochs 1.1 of 100 steps is 110 steps; 1.1 * 100 is 110.00000000000001 in floating point, which a bare
    # ceil turns into 111 (an extra step, and a schedule stretched to it)
    from argparse import Namespace
    for epochs, n, want in ((1.1, 800, 110), (2.2, 400, 110), (1.3, 96, 16), (0.5, 80, 5)):
        args = Namespace(batch_size=8, micro_batch_size=8, epochs=epochs, max_steps=None, warmup_ratio=0)
        assert common.plan_steps(n, args, 1)[2] == want, (epochs, n)


def test_preference_and_rlvr_rows():
    c, r = data.pref_row({"prompt": "q", "chosen": "a", "rejected": "b"}, "f:1")
    assert c[0] == r[0] and (c[1]["content"], r[1]["content"]) == ("a", "b")
    with pytest.raises(data.DataError, match="f:3: chosen and rejected must share the same prompt"):
        data.pref_row({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                       "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "b"}]}, "f:3")
    row = data.rlvr_row({"messages": [{"role": "user", "content": "q"}], "ground_truth": "4", "dataset": "gsm8k"}, "f")
    assert row["dataset"] == "gsm8k"
    # a reference answer at the end of an RLVR row is not part of the prompt
    row = data.rlvr_row({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "4"}],
                         "ground_truth": "4", "dataset": "gsm8k"}, "f")
    assert row["messages"] == [{"role": "user", "content": "q"}]
    with pytest.raises(data.DataError, match="needs 'ground_truth'"):
        data.rlvr_row({"messages": [{"role": "user", "content": "q"}]}, "f:9")


def test_grad_clip_zero_turns_clipping_off():
    # clip_grad_norm_(max_norm=0) would zero every gradient: 0 means no clipping, the norm still measured
    import argparse
    p = argparse.ArgumentParser()
    common.add_optim_args(p)
    assert p.parse_args([]).grad_clip == 1.0
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.full((3,), 10.0)
    norm = torch.nn.utils.clip_grad_norm_([w], p.parse_args(["--grad-clip", "0"]).grad_clip)
    assert norm.item() == pytest.approx(300 ** 0.5) and w.grad.tolist() == [10.0] * 3


def test_a_stage_reuses_only_an_evaluation_of_the_same_prompts(tmp_path):
    # dpo.py and ppo_rlvr.py take their starting point's accuracy from its eval.json only when it scored these
    # very prompts with the same decoding (the same count is not enough); a fresh run drops an earlier run's
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}], "ground_truth": str(i), "dataset": "gsm8k"}
            for i in range(3)]
    saved = {"accuracy": 0.5, "n": 3, "per_task": {}, "max_new_tokens": 64, "prompts": common.prompts_key(rows)}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(saved))
    assert common.earlier_eval(str(path), rows, 64) == saved
    assert common.earlier_eval(str(path), rows, 128) is None
    other = [dict(r) for r in rows]
    other[1]["ground_truth"] = "7"
    assert common.earlier_eval(str(path), other, 64) is None
    assert common.earlier_eval(str(tmp_path / "none.json"), rows, 64) is None
    model = torch.nn.Linear(2, 2)
    assert common.resume(None, str(tmp_path), model, torch.optim.AdamW(model.parameters()), None, 1) == {"step": 0}
    assert not path.exists()


def test_a_save_keeps_what_else_the_directory_holds(tiny, tmp_path):
    # the swap replaces the checkpoint's own files only: a user's files and folders in --out survive (they were
    # deleted with the old directory), while an earlier save's shards, template and optimizer state do not
    tok = Tokenizer.from_pretrained(tiny[0])
    model = Llama.from_pretrained(tiny[0])
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "x.py").write_text("print(1)")
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    os.symlink("notes.txt", out / "link")
    os.mkfifo(out / "fifo")  # carried, not opened (an fsync of it would block)
    stale = ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "chat_template.jinja",
             "train_state.pt", "pytorch_model.bin", "vocab.json", "tokenizer.model")
    for f in stale:
        (out / f).write_text("stale")
    inode = os.stat(out / "metrics.jsonl").st_ino
    os.symlink(out, tmp_path / "alias")  # a symlinked --out: its target is replaced, the link stays
    common.save_checkpoint(str(tmp_path / "alias"), model, tok)  # no optimizer: no train_state.pt of its own
    assert (out / "notes.txt").read_text() == "keep me" and (out / "sub" / "x.py").read_text() == "print(1)"
    assert (out / "metrics.jsonl").read_text() == '{"step": 0}\n' and os.readlink(out / "link") == "notes.txt"
    assert os.stat(out / "metrics.jsonl").st_ino != inode  # a copy: appending to it changes no other copy
    assert (out / "fifo").is_fifo() and not any((out / f).exists() for f in stale)
    assert max_diff(weights(str(out)), weights(tiny[0])) == 0 and sorted(os.listdir(tmp_path)) == ["alias", "mine"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out / "model.safetensors").st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600


def test_number_flags_are_checked_at_the_command_line(tiny, tmp_path, monkeypatch, capsys):
    import argparse
    for parse, bad, msg in [(common.number(0), "-1", "a number >= 0"), (common.number(0, 1), "1.5", ">= 0 and <= 1"),
                            (common.number(0, above=True), "0", "a number > 0"), (common.number(0), "nan", ">= 0"),
                            (common.number(0), "x", "expected a number, got 'x'"), (common.count, "-1", ">= 0")]:
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            parse(bad)
    for bad in ("inf", "-inf", "1e999"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.number(0)(bad)
    assert common.number(0, 1)("0.25") == 0.25 and common.count("0") == 0
    base, path = tiny
    for flag, value, msg in [("--lr", "-1", "argument --lr: expected a number >= 0, got '-1'"),
                             ("--val-frac", "-0.5", "argument --val-frac: expected a number >= 0 and <= 1"),
                             ("--epochs", "-1", "argument --epochs: expected a number > 0"),
                             ("--eval-n", "-1", "argument --eval-n: expected a whole number >= 0")]:
        assert msg in refusal(monkeypatch, capsys, "sft.py", "--ckpt", base, "--data", path, "--preset", "tiny", flag,
                              value, "--out", tmp_path / "o")
    # --data with no file after it (an unset shell variable): said, not "0 training examples" later
    for script in ("sft.py", "dpo.py", "ppo_rlvr.py"):
        assert refusal(monkeypatch, capsys, script, "--ckpt", base, "--out", tmp_path / "o", "--data") == (
            f"{script}: error: argument --data: expected at least one argument")


def test_an_out_that_cannot_be_written_is_refused_before_any_work(tiny, tmp_path, monkeypatch, capsys):
    # a save writes the checkpoint beside --out and swaps it in, logs go into --out: a parent that takes no new
    # directory (a cluster's /scratch with only /scratch/$USER writable) or a path through a file would fail at
    # the first save or log line, after the data, the sampling and the evaluation. Tests run as root, where
    # permissions do not stop a write: an unwritable directory is stood in for by the probe failing there.
    base, path = tiny
    afile = tmp_path / "afile"
    afile.write_text("x")
    ro = tmp_path / "ro"
    (ro / "mine").mkdir(parents=True)
    probe = common.tempfile.TemporaryDirectory

    def unwritable(*a, dir=None, **kw):
        if os.path.realpath(dir) == str(ro):
            raise PermissionError(13, "Permission denied")
        return probe(*a, dir=dir, **kw)
    monkeypatch.setattr(common.tempfile, "TemporaryDirectory", unwritable)
    for out, why in [(afile / "run", f"{afile} is a file"), (ro / "mine", f"Permission denied in {ro}"),
                     (ro / "new" / "run", f"Permission denied in {ro}")]:
        err = refusal(monkeypatch, capsys, "sft.py", "--ckpt", base, "--data", path, "--preset", "tiny", "--out", out)
        assert err == f"error: cannot write {out} ({why}); give --out a directory this process can write", err
    (tmp_path / "link").symlink_to(ro / "mine")  # a symlinked --out: its target is swapped, beside the target
    with pytest.raises(SystemExit, match=f"Permission denied in {ro}"):
        common.check_out(str(tmp_path / "link"))
    common.check_out(str(ro / "mine"), swapped=False)  # eval's results go into the folder only
    common.check_out(str(tmp_path / "new" / "run"))
    assert sorted(os.listdir(tmp_path)) == ["afile", "link", "ro"] and os.listdir(ro) == ["mine"]  # no probe left


def test_bad_checkpoints_and_outputs_are_one_sentence(tiny, tmp_path, monkeypatch, capsys):
    # before any work, and without a traceback: a missing or broken --ckpt, an --out that is a file, a damaged
    # train_state.pt on --resume
    base, path = tiny
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    cfg = json.load(open(broken / "config.json"))
    del cfg["hidden_size"]
    (broken / "config.json").write_text(json.dumps(cfg))
    afile = tmp_path / "afile"
    afile.write_text("x")
    for ckpt, out, msg in [(tmp_path / "none", tmp_path / "o", f"error: {tmp_path / 'none'}/tokenizer.json not found"),
                           (broken, tmp_path / "o", f"error: {broken}/config.json: 'hidden_size' is missing"),
                           (base, afile, f"error: --out {afile} is a file; it must be a directory")]:
        err = refusal(monkeypatch, capsys, "sft.py", "--ckpt", ckpt, "--data", path, "--preset", "tiny", "--out", out)
        assert err.startswith(msg) and "\n" not in err, err
    # an --out that holds the working directory is swapped out whole by a save; a sibling whose name only
    # starts the same way is not inside it
    (tmp_path / "o" / "sub").mkdir(parents=True)
    (tmp_path / "o2").mkdir()
    for cwd, refused in [(tmp_path / "o" / "sub", True), (tmp_path / "o", True), (tmp_path / "o2", False)]:
        monkeypatch.chdir(cwd)
        if refused:
            with pytest.raises(SystemExit, match=f"--out {tmp_path / 'o'}/ is, or holds, the working directory"):
                common.check_out(str(tmp_path / "o") + "/")
        else:
            common.check_out(str(tmp_path / "o") + "/")
    (broken / "config.json").write_text('{"vocab_size": 300,\n')
    with pytest.raises(ValueError, match="config.json: invalid JSON at line 2"):
        Llama.from_pretrained(str(broken))
    model = torch.nn.Linear(2, 2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_state.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(SystemExit, match="train_state.pt cannot be read .*: the checkpoint is damaged"):
        common.load_train_state(str(tmp_path / "run"), model, torch.optim.AdamW(model.parameters()))
    # the sharded tensors beside it: missing, or a file of them cut short
    torch.save({"step": 1, "sharded": ["model"]}, tmp_path / "run" / "train_state.pt")
    with pytest.raises(SystemExit, match=r"train_state cannot be read \(FileNotFoundError.*: the checkpoint is damaged"):
        common.load_train_state(str(tmp_path / "run"), model, torch.optim.AdamW(model.parameters()))
    tok = Tokenizer.from_pretrained(tiny[0])
    m = Llama.from_pretrained(tiny[0])
    common.save_checkpoint(str(tmp_path / "run"), m, tok, torch.optim.AdamW(m.parameters()), {"step": 1})
    (shards,) = (tmp_path / "run" / "train_state").glob("*.distcp")
    shards.write_bytes(shards.read_bytes()[:100])
    with pytest.raises(SystemExit, match=f"error: {tmp_path / 'run' / 'train_state'} cannot be read .*: the checkpoint "
                                         f"is damaged; run without --resume, or put back a copy of {tmp_path / 'run'}"):
        common.load_train_state(str(tmp_path / "run"), m, torch.optim.AdamW(m.parameters()))


def test_a_train_state_without_its_metadata_is_one_sentence_without_tracebacks(tiny, tmp_path, caplog):
    # train_state/ copied with `cp train_state/*` (no dot files) or its .metadata cut short:
    # torch.distributed.checkpoint logs a traceback per attempt to read it, on every rank, before the sentence
    tok, m = Tokenizer.from_pretrained(tiny[0]), Llama.from_pretrained(tiny[0])
    run = str(tmp_path / "run")
    common.save_checkpoint(run, m, tok, torch.optim.AdamW(m.parameters()), {"step": 1})
    meta = os.path.join(run, "train_state", ".metadata")
    for damage, why in [(lambda: os.truncate(meta, 50), "AssertionError"),
                        (lambda: os.remove(meta), "FileNotFoundError: no .metadata")]:
        damage()
        caplog.clear()
        with pytest.raises(SystemExit, match=f"train_state cannot be read \\({why}.*: the checkpoint is damaged"):
            common.load_train_state(run, m, torch.optim.AdamW(m.parameters()))
        assert not [r for r in caplog.records if r.name == "root"], caplog.text  # (dcp's own logger: a NullHandler)


def test_a_shard_cut_short_is_one_sentence(tiny, tmp_path):
    # torch's error for a .distcp cut short is five sentences on one line ("... This is an internal miniz error. If
    # you are seeing this error, ..."): the message keeps its first
    tok, m = Tokenizer.from_pretrained(tiny[0]), Llama.from_pretrained(tiny[0])
    run = str(tmp_path / "run")
    common.save_checkpoint(run, m, tok, torch.optim.AdamW(m.parameters()), {"step": 1})
    (shard,) = (tmp_path / "run" / "train_state").glob("*.distcp")
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(SystemExit) as e:
        common.load_train_state(run, m, torch.optim.AdamW(m.parameters()))
    assert "(RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory): the " \
           "checkpoint is damaged" in str(e.value) and "miniz" not in str(e.value), e.value
    pt = os.path.join(run, "train_state.pt")  # and train_state.pt cut short, read by read_train_state
    os.truncate(pt, os.path.getsize(pt) // 2)
    with pytest.raises(SystemExit) as e:
        common.load_train_state(run, m, torch.optim.AdamW(m.parameters()))
    assert "train_state.pt cannot be read (" in str(e.value) and "miniz" not in str(e.value), e.value


def test_a_checkpoint_in_the_earlier_format_is_not_called_damaged(tmp_path):
    # train_state.pt with the whole optimizer state (and, for bf16 saves, the fp32 weights) and no train_state/:
    # written by nanopost before the sharded saves; it is whole, only not readable by this version
    model = torch.nn.Linear(2, 2)
    (tmp_path / "run").mkdir()
    torch.save({"step": 4, "optimizer": torch.optim.AdamW(model.parameters()).state_dict()},
               tmp_path / "run" / "train_state.pt")
    with pytest.raises(SystemExit) as e:
        common.load_train_state(str(tmp_path / "run"), model, torch.optim.AdamW(model.parameters()))
    assert "saved by an earlier nanopost" in str(e.value) and "damaged" not in str(e.value)


def test_a_loss_that_is_not_finite_stops_the_run(tiny, tmp_path, monkeypatch, capsys):
    # before the optimizer step that would spread the NaN into every weight, and before any save
    err = refusal(monkeypatch, capsys, "sft.py", "--ckpt", nan_checkpoint(tiny[0], tmp_path / "nan"), "--data",
                  tiny[1], "--preset", "tiny", "--out", tmp_path / "o", "--max-steps", 2, "--save-every", 1)
    assert err == f"error: loss is nan at step 0; stopping. The last good checkpoint (if any) is untouched in {tmp_path / 'o'}"
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")


def test_rows_named_when_their_label_cannot_be_scored(tmp_path):
    # an RLVR row whose ground truth its verifier cannot read stops the run at load time (it stopped PPO at the
    # step that sampled it, hours in); --skip-bad skips it
    msgs = [{"role": "user", "content": "q"}]
    rows = [{"messages": msgs, "ground_truth": "#### 4", "dataset": "gsm8k"},
            {"messages": msgs, "ground_truth": "n/a", "dataset": "gsm8k"},
            {"messages": msgs, "ground_truth": "4", "dataset": "unknown"},
            {"messages": msgs, "ground_truth": "{not json", "dataset": "ifeval"},
            {"messages": msgs, "ground_truth": "\\boxed{1", "dataset": "math"},
            {"messages": msgs, "ground_truth": json.dumps({"func_name": "no_such_check"}), "dataset": "ifeval"},
            {"messages": msgs, "ground_truth": json.dumps({"func_name": "verify_keyword_frequency", "word": "cat",
                                                           "N": "3"}), "dataset": "ifeval"},
            {"messages": msgs, "ground_truth": json.dumps({"instruction_id_list": ["punctuation:no_comma"],
                                                           "kwargs": {}}), "dataset": "ifeval"},
            {"messages": msgs, "ground_truth": json.dumps({"instruction_id_list": [["x"]], "kwargs": [{}]}),
             "dataset": "ifeval"},
            {"messages": msgs, "ground_truth": json.dumps({"instruction_id_list": ["punctuation:no_comma"],
                                                           "kwargs": ["x"]}), "dataset": "ifeval"}]
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i, msg in enumerate(["does not end in a number", "unknown dataset 'unknown'", "cannot parse ground truth",
                             "last box is unbalanced", "unknown Tülu 3 func_name", "needs a whole number N, got '3'",
                             "kwargs must be a list", r"unknown instruction id \['x'\]", "has kwargs 'x'"], 2):
        with pytest.raises(data.DataError, match=f"{path}:{i}: .*{msg}"):
            data.rlvr_row(rows[i - 1], f"{path}:{i}")
    got, skipped = data.load_mixture([str(path)], data.rlvr_row, skip_bad=True)
    assert (len(got), skipped) == (1, 9)


def test_more_bad_data_messages(tmp_path):
    good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    (tmp_path / "a.jsonl").write_text(good * 10)
    with pytest.raises(data.DataError, match=f"{tmp_path}: is a directory, not a JSONL file"):
        data.load_mixture([str(tmp_path)], data.sft_row)
    for amount in ("0", "0.01"):  # rounds to no row: surely not what was meant
        with pytest.raises(data.DataError, match="takes no row .the file has 10 usable rows"):
            data.load_mixture([f"{tmp_path / 'a.jsonl'}:{amount}"], data.sft_row)
    with pytest.raises(data.DataError, match=r"f:1: no 'messages' field \(the row has \['conversations'\]\)"):
        data.sft_row({"conversations": []}, "f:1")


def test_resume_says_what_changed_and_refuses_what_cannot_be(tiny, tmp_path, monkeypatch, capsys):
    # past the run's steps: refused (it saved the later weights as the earlier step); changed flags: listed;
    # the optimizer's moments come back but --weight-decay is this run's (load_state_dict restored the saved);
    # a metrics line cut short by a kill is dropped
    from argparse import Namespace
    tok = Tokenizer.from_pretrained(tiny[0])
    model = Llama.from_pretrained(tiny[0])
    out = str(tmp_path / "run")
    opt = common.build_optimizer(model, 1e-3, weight_decay=0.0)
    common.save_checkpoint(out, model, tok, opt, {"step": 4, "args": {"batch_size": 8, "lr": 1e-3, "resume": False}})
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    args = Namespace(batch_size=16, lr=1e-3, resume=True)
    opt = common.build_optimizer(model, 1e-3, weight_decay=0.5)
    with pytest.raises(SystemExit, match="is at step 4, past this run's 3 steps"):
        common.resume(out, out, model, opt, args, 3)
    for f in ("eval.json", "start_eval.json", "eval/gsm8k.json"):  # an evaluation of the saved model
        os.makedirs(os.path.dirname(os.path.join(out, f)), exist_ok=True)
        open(os.path.join(out, f), "w").write("{}")
    assert common.resume(out, out, model, opt, args, 6)["step"] == 4
    # (--resume itself, which always differs, is not listed)
    assert "in effect from here: --batch-size 16 (saved: 8)\n" in capsys.readouterr().out
    assert opt.param_groups[0]["weight_decay"] == 0.5
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 4
    assert all(os.path.isfile(os.path.join(out, f)) for f in ("start_eval.json", "eval/gsm8k.json"))
    # but not the run's own final evaluation: the weights it scored are about to change
    assert not os.path.exists(os.path.join(out, "eval.json"))
    # a fresh run in the same directory: a new log, and no evaluation that is not of its own model
    assert common.resume(None, out, model, opt, args, 6) == {"step": 0}
    assert not {"eval.json", "start_eval.json", "eval"} & set(os.listdir(out)) and "config.json" in os.listdir(out)
    assert open(os.path.join(out, "metrics.jsonl")).read() == ""
    monkeypatch.chdir(out)
    assert refusal(monkeypatch, capsys, "sft.py", "--ckpt", tiny[0], "--data", tiny[1], "--preset", "tiny", "--out", "."
                   ).startswith("error: --out . is, or holds, the working")


def test_resumed_default_run_keeps_its_tokenizer_when_a_sibling_run_rewrote_the_base(tmp_path, monkeypatch):
    """The built-in default puts its base (and tokenizer) in --out's parent: a run with another --seed beside
    it rewrites that base with another tokenizer; resuming the first run must still encode with its own."""
    a, b = tmp_path / "sft", tmp_path / "sft_seed1"
    run_here(monkeypatch, "sft.py", "--out", a, "--max-steps", 1, "--eval-n", 0, "--val-frac", 0)
    own = open(a / "tokenizer.json", "rb").read()
    run_here(monkeypatch, "sft.py", "--out", b, "--seed", 1, "--max-steps", 1, "--eval-n", 0, "--val-frac", 0)
    assert open(tmp_path / "base" / "tokenizer.json", "rb").read() != own  # the shared base is seed 1's now
    run_here(monkeypatch, "sft.py", "--out", a, "--resume", "--max-steps", 2, "--eval-n", 0, "--val-frac", 0)
    assert open(a / "tokenizer.json", "rb").read() == own


def test_a_finished_run_resumed_for_more_steps_drops_its_evaluation(tmp_path, monkeypatch):
    """eval.json scores the weights of the run that wrote it; resumed for more steps with the evaluation off,
    the directory must not go on holding it beside other weights (DPO/PPO take it as their start's accuracy)."""
    a = tmp_path / "sft"
    run_here(monkeypatch, "sft.py", "--out", a, "--max-steps", 1, "--eval-n", 2, "--val-frac", 0)
    assert os.path.isfile(a / "eval.json")
    run_here(monkeypatch, "sft.py", "--out", a, "--resume", "--max-steps", 2, "--eval-n", 0, "--val-frac", 0)
    assert not os.path.exists(a / "eval.json")
    # resumed with nothing left to train, the weights are those it scored: kept
    run_here(monkeypatch, "sft.py", "--out", a, "--resume", "--max-steps", 2, "--eval-n", 2, "--val-frac", 0)
    run_here(monkeypatch, "sft.py", "--out", a, "--resume", "--max-steps", 2, "--eval-n", 0, "--val-frac", 0)
    assert os.path.isfile(a / "eval.json")


@pytest.mark.parametrize("dies_in, logged", [("save_checkpoint", [0, 1]), ("build_optimizer", None)])
def test_a_fresh_run_killed_before_its_first_save_does_not_resume_the_earlier_runs_checkpoint(tiny, tmp_path,
                                                                                             monkeypatch, dies_in,
                                                                                             logged):
    """A fresh run (no --resume) in a directory that holds an earlier run's checkpoint starts a new log; killed
    before its own first save (at it, two steps logged; or before any write to --out: loading, tokenizing, DPO's
    reference pass), --resume must start afresh, not go on from the earlier run's weights and step (which left
    the log without the steps in between and the weights of another run)."""
    args = ("--ckpt", tiny[0], "--data", tiny[1], "--preset", "tiny", "--val-frac", 0, "--max-steps", 4,
            "--batch-size", 8, "--micro-batch-size", 8, "--save-every", 2)
    run_here(monkeypatch, "sft.py", *args, "--out", tmp_path / "full")
    out = tmp_path / "run"
    run_here(monkeypatch, "sft.py", *args, "--out", out, "--lr", "1e-2")  # the earlier run: finished, other flags

    class Killed(BaseException):
        pass

    def killed(*a, **kw):
        raise Killed
    with monkeypatch.context() as m:
        m.setattr(common, dies_in, killed)
        with pytest.raises(Killed):
            run_here(m, "sft.py", *args, "--out", out)
    if logged is not None:
        assert [json.loads(ln)["step"] for ln in open(out / "metrics.jsonl")] == logged
    run_here(monkeypatch, "sft.py", *args, "--out", out, "--resume")
    assert [json.loads(ln)["step"] for ln in open(out / "metrics.jsonl")] == [0, 1, 2, 3]
    assert losses(out) == pytest.approx(losses(tmp_path / "full"), rel=1e-5)
    assert max_diff(weights(out), weights(tmp_path / "full")) < 1e-5


def test_a_second_run_into_an_out_still_being_written_is_refused(tiny, tmp_path, monkeypatch, capsys):
    """A torchrun launcher killed with SIGKILL leaves its workers training on (each in a session of its own); a
    --resume started then wrote into the same --out beside them: metrics.jsonl got steps twice and out of order,
    and the two saves raced on one .out.tmp. While a run (its rank 0) holds --out, another is refused at the start;
    once it is gone (a SIGKILL included), the next run goes ahead."""
    base, path = tiny
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, common; common.claim_out(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(120)", str(out)],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = refusal(monkeypatch, capsys, "sft.py", "--ckpt", base, "--data", path, "--preset", "tiny", "--out", out,
                      "--resume", "--max-steps", 1)
        assert err.startswith(f"error: another run is still writing to {out}"), err
        assert not out.exists()  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    common.claim_out(str(out))
    common.claim_out(str(out))  # the same process may claim it again (the tests run the scripts in-process)


def test_process_group_outwaits_a_rank0_checkpoint_write(monkeypatch):
    """Under torchrun the other ranks wait in a collective while rank 0 alone reads the HF checkpoint and writes
    the HF weights of a save (140 GB at 70B in bf16): the process group's timeout must outlast that, not be
    NCCL's default 10 minutes. NANOPOST_TIMEOUT_S sets it."""
    import datetime
    got = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: got.update(kw))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("NANOPOST_TIMEOUT_S", raising=False)
    common.init_distributed()
    assert got.get("timeout", datetime.timedelta(minutes=10)) >= datetime.timedelta(minutes=30)
    monkeypatch.setenv("NANOPOST_TIMEOUT_S", "7200")
    common.init_distributed()
    assert got["timeout"] == datetime.timedelta(hours=2)


@pytest.mark.parametrize("preset,tokens", [("tiny", 64), ("tulu3-8b", 512)])
def test_presets_fill_the_held_out_decoding_length(tiny, tmp_path, monkeypatch, preset, tokens):
    # the tiny tasks' answers fit in 64 tokens; a real model's chain of thought (GSM8K) needs Tülu 3's 512
    held_out = held_out_file(tmp_path / "held_out.jsonl", 2)
    args = ("--ckpt", tiny[0], "--data", tiny[1], "--out", tmp_path / "o", "--eval-prompts", held_out,
            "--max-steps", 1, "--batch-size", 8, "--micro-batch-size", 8, "--val-frac", 0)
    assert eval_length(monkeypatch, "sft.py", *args, "--preset", preset) == tokens
    assert eval_length(monkeypatch, "sft.py", *args, "--preset", preset, "--eval-max-new-tokens", 7) == 7


def test_no_host_sync_between_the_micro_batches_of_a_step(tiny, tmp_path, monkeypatch):
    # on a GPU each would idle it (helpers.syncs_between_backwards); one step of 8 micro-batches
    n, between = syncs_between_backwards(monkeypatch, "sft.py", "--ckpt", tiny[0], "--data", tiny[1], "--preset",
                                         "tiny", "--val-frac", "0", "--out", tmp_path / "o", "--max-steps", 1,
                                         "--batch-size", 8, "--micro-batch-size", 1)
    assert n == 8 and not between, f"host syncs between the step's micro-batches: {between}"


@pytest.mark.parametrize("script", ["sft.py", "dpo.py", "ppo_rlvr.py"])
def test_data_flags_that_would_do_nothing_are_refused(tiny, tmp_path, monkeypatch, capsys, script):
    # said, not silently ignored: --skip-bad on the built-in tasks, a held-out flag where nothing is held out
    out = ("--out", tmp_path / "o")
    assert refusal(monkeypatch, capsys, script, *out, "--skip-bad") == \
        "error: --skip-bad skips the bad rows of --data; the built-in tasks have none"
    for flag in (("--eval-n", 5), ("--eval-max-new-tokens", 512), ("--eval-batch-size", 8)):
        assert refusal(monkeypatch, capsys, script, *out, "--ckpt", tiny[0], "--data", tiny[1], *flag) == \
            f"error: {flag[0]} sets the held-out evaluation, and with --data there is none without --eval-prompts"
    if script == "sft.py":
        assert refusal(monkeypatch, capsys, script, *out, "--val-frac", 0, "--eval-every", 10).startswith(
            "error: --eval-every sets how often the validation loss is computed, and --val-frac 0 holds out no rows")
