"""
The embedded default end to end, shortened: sft.py -> dpo.py -> ppo_rlvr.py through pipeline.py,
a few steps each, so that the README's main command keeps working.

    python -m pytest tests/test_pipeline.py -v
"""
import ast
import json
import os
import re
import runpy
import subprocess
import sys

import pytest

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


def test_seeds_table_and_stage_failures(tmp_path, monkeypatch, capsys):
    """--seeds with the stages stubbed (their eval.json written from a fixed table): each seed's stages chain in
    out/seedN with --seed N, and the summary gives each stage's mean, sample std, min, max and its gain over the
    stage before (mean and worst seed). A stage that fails, or writes no eval.json, stops the run with one line."""
    acc = {0: (0.2, 0.3, 0.5), 1: (0.3, 0.3, 0.5), 2: (0.4, 0.6, 0.5)}  # seed -> sft, dpo, rlvr accuracy
    calls = []

    def run(cmd, fail=None, no_eval=None):
        script, a = os.path.basename(cmd[1]), dict(zip(cmd[2::2], cmd[3::2]))
        calls.append((script, a))
        if script == fail:
            return subprocess.CompletedProcess(cmd, 3)
        if script != no_eval:
            k = ["sft.py", "dpo.py", "ppo_rlvr.py"].index(script)
            os.makedirs(a["--out"], exist_ok=True)
            x = acc[int(a["--seed"])][k]
            json.dump({"accuracy": x, "n": 600, "per_task": {"tiny_arith": {"accuracy": x / 2, "n": 300},
                                                             "tiny_if": {"accuracy": 1.0, "n": 300}}},
                      open(os.path.join(a["--out"], "eval.json"), "w"))
        return subprocess.CompletedProcess(cmd, 0)

    out = str(tmp_path / "o")
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(sys, "argv", ["pipeline.py", "--seeds", "0", "1", "2", "--out", out, "--dpo-args", "--beta 0.2"])
    runpy.run_path(os.path.join(ROOT, "pipeline.py"), run_name="__main__")
    text = capsys.readouterr().out
    assert [(s, a["--seed"], a["--out"], a.get("--ckpt"), a.get("--beta")) for s, a in calls[3:6]] == [
        ("sft.py", "1", f"{out}/seed1/sft", None, None), ("dpo.py", "1", f"{out}/seed1/dpo", f"{out}/seed1/sft", "0.2"),
        ("ppo_rlvr.py", "1", f"{out}/seed1/rlvr", f"{out}/seed1/dpo", None)]
    assert "| 2 | 0.400 (0.20, 1.00) | 0.600 (0.30, 1.00) | 0.500 (0.25, 1.00) |" in text
    assert "| sft | 0.300 | 0.100 | 0.200 | 0.400 | - |" in text
    assert "| dpo | 0.400 | 0.173 | 0.300 | 0.600 | +10.0 pts, +0.0 pts |" in text
    assert "| rlvr | 0.500 | 0.000 | 0.500 | 0.500 | +10.0 pts, -10.0 pts |" in text
    assert json.load(open(os.path.join(out, "results.json")))["2"]["dpo"]["accuracy"] == 0.6
    for kw, msg in [({"fail": "dpo.py"}, "error: dpo.py failed (exit 3) for seed 0"),
                    ({"no_eval": "ppo_rlvr.py"}, f"error: ppo_rlvr.py wrote no {out}/rlvr/eval.json")]:
        monkeypatch.setattr(subprocess, "run", lambda cmd, kw=kw: run(cmd, **kw))
        monkeypatch.setattr(sys, "argv", ["pipeline.py", "--out", out])
        with pytest.raises(SystemExit, match=re.escape(msg)):
            runpy.run_path(os.path.join(ROOT, "pipeline.py"), run_name="__main__")
