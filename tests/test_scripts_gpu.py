"""
The three training scripts end to end on one CUDA GPU: a lone CUDA process is a 1-rank NCCL group, so this
is the practitioners' path (FSDP2, bf16 compute with fp32 master weights, the Triton kernels, generation
with the parameters gathered) on a tiny model. Skipped without CUDA; ~1-2 minutes on an H100.

    python -m pytest tests/test_scripts_gpu.py -v
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import tasks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny base checkpoint, SFT rows, preference pairs (a demonstration against the next row's answer),
    RLVR prompts and held-out prompts from the built-in tasks."""
    d = tmp_path_factory.mktemp("gpu")
    sft, _, rl, held_out = tasks.make_tasks(seed=0, n_sft=256, n_prefs=2, n_rl=64, n_eval=16)
    tasks.make_base_checkpoint(str(d / "base"), sft, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                               vocab_size=300)
    prefs = [{"chosen": a["messages"], "rejected": a["messages"][:-1] + b["messages"][-1:]}
             for a, b in zip(sft, sft[1:])]
    for name, rows in (("sft", sft), ("prefs", prefs), ("rl", rl), ("held_out", held_out)):
        with open(d / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return d


def run(script, *args):
    r = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def metrics(out):
    return [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]


def test_sft_eager_and_compiled(tiny):
    args = ["--ckpt", tiny / "base", "--data", tiny / "sft.jsonl", "--preset", "tiny", "--val-frac", "0",
            "--batch-size", 32,
            "--max-steps", 6, "--lr", 3e-3, "--eval-prompts", tiny / "held_out.jsonl"]
    run("sft.py", *args, "--out", tiny / "sft")
    run("sft.py", *args, "--out", tiny / "sft_compiled", "--compile")
    eager, compiled = ([m["loss"] for m in metrics(tiny / d)] for d in ("sft", "sft_compiled"))
    assert eager[-1] < eager[0] - 0.5, eager  # it learns
    # bf16 compute: the compiled blocks fuse and round differently, so equal to bf16 precision, not bitwise
    assert compiled == pytest.approx(eager, rel=2e-2), (eager, compiled)


def test_sft_output_loads_in_transformers(tiny):
    transformers = pytest.importorskip("transformers")
    from model import Llama
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny / "sft"), torch_dtype=torch.float32).eval()
    ours = Llama.from_pretrained(str(tiny / "sft")).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_dpo_then_ppo(tiny):
    run("dpo.py", "--ckpt", tiny / "sft", "--data", tiny / "prefs.jsonl", "--preset", "tiny", "--out", tiny / "dpo",
        "--loss-type", "dpo",
        "--beta", 0.1, "--batch-size", 16, "--max-steps", 4, "--lr", 1e-4, "--eval-n", 0)
    m = metrics(tiny / "dpo")
    assert len(m) == 4 and all(math.isfinite(r["loss"]) for r in m)  # one row a step
    # step 0: the policy is the reference, so every implicit reward is 0 (up to bf16) and the loss log 2
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=2e-2) and abs(m[0]["margin"]) < 2e-2, m[0]
    run("ppo_rlvr.py", "--ckpt", tiny / "dpo", "--data", tiny / "rl.jsonl", "--preset", "tiny", "--out",
        tiny / "rlvr", "--steps", 2,
        "--prompts-per-step", 16, "--max-new-tokens", 24, "--eval-n", 0, "--compile")
    m = metrics(tiny / "rlvr")
    assert len(m) == 2 and all(abs(r["logp_gap_max"]) < 0.1 for r in m), m  # generator vs trainer, bf16
