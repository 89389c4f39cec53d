"""
The Tülu-in-miniature: SFT -> DPO -> RLVR on the built-in tasks, then the held-out accuracy table.

    python pipeline.py                    # one seed: out/sft, out/dpo, out/rlvr (5-8 minutes on 2 CPU cores)
    python pipeline.py --seeds 0 1 2      # three seeds: out/seed0/..., the mean and spread of each stage
    python pipeline.py --fast             # a few steps per stage: checks that everything runs (tests use it)

Each stage is the plain script (`python sft.py`, `python dpo.py`, `python ppo_rlvr.py`), run with the
same --seed so that every stage is scored on the same held-out prompts with the same greedy decoding.
Extra arguments for a stage go after --sft-args / --dpo-args / --rl-args, e.g. --dpo-args "--beta 0.2"
(a single flag needs the = form: --dpo-args=--compile). Every stage must keep its evaluation (no --eval-n 0).
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("--seeds", type=int, nargs="+", default=[0])
p.add_argument("--out", default="out")
p.add_argument("--fast", action="store_true", help="a few steps per stage and a small held-out set")
p.add_argument("--sft-args", default="")
p.add_argument("--dpo-args", default="")
p.add_argument("--rl-args", default="")
args = p.parse_args()

FAST = {"sft": "--max-steps 60 --eval-n 16", "dpo": "--n-prompts 64 --batch-size 4 --micro-batch-size 4 --max-steps 2 "
        "--eval-n 16", "rlvr": "--steps 2 --eval-n 16"}
STAGES = []  # (stage, script, its extra arguments)
for stage, script, flag in [("sft", "sft.py", "sft"), ("dpo", "dpo.py", "dpo"), ("rlvr", "ppo_rlvr.py", "rl")]:
    try:
        STAGES.append((stage, script, (shlex.split(FAST[stage]) if args.fast else [])
                       + shlex.split(getattr(args, f"{flag}_args"))))
    except ValueError as e:  # e.g. an unclosed quote
        p.error(f"--{flag}-args: {e}")
here = os.path.dirname(os.path.abspath(__file__))

results = {}  # seed -> stage -> {"accuracy", "n", "per_task", "seconds"}
for seed in args.seeds:
    root = args.out if len(args.seeds) == 1 else os.path.join(args.out, f"seed{seed}")
    prev, res = None, {}
    for stage, script, extra in STAGES:
        out = os.path.join(root, stage)
        cmd = [sys.executable, os.path.join(here, script), "--seed", str(seed), "--out", out]
        cmd += ["--ckpt", prev] if prev else []
        cmd += extra
        print(f"\n=== seed {seed} | {stage}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        r = subprocess.run(cmd)
        if r.returncode != 0:
            raise SystemExit(f"error: {script} failed (exit {r.returncode}) for seed {seed}")
        if not os.path.isfile(os.path.join(out, "eval.json")):
            raise SystemExit(f"error: {script} wrote no {out}/eval.json (its evaluation was turned off?): the table "
                             "needs every stage's held-out accuracy")
        ev = json.load(open(os.path.join(out, "eval.json")))
        res[stage] = {"accuracy": ev["accuracy"], "n": ev["n"], "per_task": ev["per_task"], "seconds": time.time() - t0}
        prev = out
    results[seed] = res

# ---- the table
stages = [s for s, _, _ in STAGES]
tasks = sorted(results[args.seeds[0]]["sft"]["per_task"])
print("\nHeld-out accuracy (greedy, %d prompts, verified by verifiers.py)\n" % results[args.seeds[0]]["sft"]["n"])
print("| seed | " + " | ".join(f"{s} ({', '.join(tasks)})" for s in stages) + " | minutes |")
print("|---|" + "---:|" * (len(stages) + 1))


def cell(r):
    per = ", ".join(f"{r['per_task'][t]['accuracy']:.2f}" for t in tasks)
    return f"{r['accuracy']:.3f} ({per})"


for seed, res in results.items():
    cells = [cell(res[s]) for s in stages]
    print(f"| {seed} | " + " | ".join(cells) + f" | {sum(r['seconds'] for r in res.values()) / 60:.1f} |")
if len(args.seeds) > 1:
    def stats(xs):
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), min(xs), max(xs)
    print("\n| stage | mean accuracy | std | min | max | gain over previous stage (mean, min) |")
    print("|---|---:|---:|---:|---:|---:|")
    for i, s in enumerate(stages):
        m, sd, lo, hi = stats([results[k][s]["accuracy"] for k in args.seeds])
        gain = "-"
        if i:
            g = [results[k][s]["accuracy"] - results[k][stages[i - 1]]["accuracy"] for k in args.seeds]
            gain = f"{100 * statistics.mean(g):+.1f} pts, {100 * min(g):+.1f} pts"
        print(f"| {s} | {m:.3f} | {sd:.3f} | {lo:.3f} | {hi:.3f} | {gain} |")
    secs = [sum(r["seconds"] for r in results[k].values()) for k in args.seeds]
    print(f"\nwall time per seed: mean {statistics.mean(secs) / 60:.1f} min, max {max(secs) / 60:.1f} min")
os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({str(k): v for k, v in results.items()}, f, indent=2)
