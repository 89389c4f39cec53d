"""
The embedded default end to end, shortened: sft.py -> dpo.py -> ppo_rlvr.py through pipeline.py,
a few steps each, so that the README's main command keeps working.

    python -m pytest tests/test_pipeline.py -v
"""
import ast
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fast_pipeline(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "pipeline.py", "--fast", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.load(open(out / "results.json"))["0"]
    prev = None
    for stage in ("sft", "dpo", "rlvr"):
        ev = json.load(open(out / stage / "eval.json"))
        assert ev["n"] == 16 and set(ev["per_task"]) == {"tiny_arith", "tiny_if"}
        assert res[stage]["accuracy"] == ev["accuracy"]
        if prev is not None:  # the stages chain: each started from the last one's checkpoint and accuracy
            assert ev["start"]["accuracy"] == prev["accuracy"]
            args = json.load(open(out / stage / "args.json"))
            assert os.path.realpath(args["ckpt"]) == os.path.realpath(out / {"dpo": "sft", "rlvr": "dpo"}[stage])
        prev = ev
        assert os.path.isfile(out / stage / "model.safetensors") and os.path.isfile(out / stage / "metrics.jsonl")
    assert "| seed | sft" in r.stdout  # the table was printed
    # every curve plot.py draws is a key the stage logs (plot.py skips a missing key silently)
    src = open(os.path.join(ROOT, "plot.py")).read()
    keys = next(ast.literal_eval(n.value) for n in ast.parse(src).body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "KEYS")
    for stage, want in keys.items():
        logged = {k for ln in open(out / stage / "metrics.jsonl") for k in json.loads(ln)}
        assert set(want) <= logged, (stage, set(want) - logged)


def test_stage_arguments_are_checked_first(tmp_path):
    r = subprocess.run([sys.executable, "pipeline.py", "--sft-args", "--lr '3e-3", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("error: --sft-args: No closing quotation")
    assert os.listdir(tmp_path) == []  # nothing ran
