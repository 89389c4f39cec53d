"""
metrics.jsonl -> one PNG, a panel per stage (loss, accuracy, reward, KL, ...: the keys the scripts log).

    python plot.py                 # out/sft, out/dpo, out/rlvr -> out/curves.png
    python plot.py out/seed1       # another run's root

Needs matplotlib (an optional extra: pip install -e ".[plot]").
"""
import json
import os
import sys

try:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
except ImportError:
    raise SystemExit("plot.py needs matplotlib: pip install matplotlib") from None

root = sys.argv[1] if len(sys.argv) > 1 else "out"
# per stage, the metrics worth a curve, as sft.py / dpo.py / ppo_rlvr.py name them in metrics.jsonl;
# a response length in tokens dwarfs the rest, so it gets its own axis on the right
KEYS = {"sft": ["loss", "val_loss"],
        "dpo": ["loss", "accuracy", "margin", "reward_chosen", "reward_rejected"],
        "rlvr": ["reward", "accuracy", "kl", "beta", "value_loss", "resp_len"]}
RIGHT = {"resp_len"}
stages = [s for s in KEYS if os.path.isfile(os.path.join(root, s, "metrics.jsonl"))]
if not stages:
    raise SystemExit(f"no {root}/<sft|dpo|rlvr>/metrics.jsonl found")
fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4), squeeze=False)
for ax, stage in zip(axes[0], stages):
    rows = [json.loads(ln) for ln in open(os.path.join(root, stage, "metrics.jsonl"))]
    lines = []
    for i, key in enumerate(KEYS[stage]):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        on = ax
        if key in RIGHT:
            on = ax.twinx()
            on.set_ylabel(key)
        lines += on.plot(*zip(*pts), label=key, color=f"C{i}", ls="--" if key in RIGHT else "-",
                         marker="." if len(pts) < 40 else None)
    ev = os.path.join(root, stage, "eval.json")
    title = stage
    if os.path.isfile(ev):
        title += f" (held-out accuracy {json.load(open(ev))['accuracy']:.3f})"
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8)
fig.tight_layout()
path = os.path.join(root, "curves.png")
fig.savefig(path, dpi=110)
print(f"wrote {path}")
