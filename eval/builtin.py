"""
The built-in tiny tasks' held-out prompts (tasks.make_tasks(seed)[3]: 600 rows, half tiny_arith and
half tiny_if), greedy-decoded through the chat template and scored by common.evaluate, the same
function that sft.py, dpo.py and ppo_rlvr.py report during training, so the figures are comparable:
  - tiny_arith: verifiers.gsm8k, the last number of the response against the answer
  - tiny_if: verifiers.ifeval (strict), the fraction of the prompt's instructions followed
  - metrics: accuracy over all rows and per task

    python -m eval.builtin --ckpt out/sft                 # 64 new tokens, as the training scripts
"""
import time

from tqdm import tqdm

from common import evaluate
from eval.common import cleanup, gather, parser, rank_world, run, save, setup
from tasks import make_tasks


def main():
    p = parser("builtin", __doc__, max_new_tokens=64, data=False)
    p.add_argument("--seed", type=int, default=0, help="the tasks' seed (the training scripts' --seed)")
    args = p.parse_args()
    t0 = time.time()
    rows = make_tasks(args.seed)[3][:args.limit]
    model, tok, out = setup(args, "builtin")
    rank, world = rank_world()
    # evaluate() a chunk at a time, for the progress bar; its counts come back summed over ranks
    step = args.batch_size * world
    preds, totals = [], {}  # totals: task -> [correct, n]
    bar = tqdm(total=len(rows), desc="builtin", disable=rank != 0, dynamic_ncols=True)
    for a in range(0, len(rows), step):
        mine = []  # (index in the chunk, response, score) of this rank's rows
        res = evaluate(model, tok, rows[a:a + step], args.max_new_tokens, args.batch_size, predictions=mine)
        preds += [(a + i, text, s) for i, text, s in mine]
        for task, r in res["per_task"].items():
            t = totals.setdefault(task, [0.0, 0])
            t[0] += r["accuracy"] * r["n"]
            t[1] += r["n"]
        bar.update(len(rows[a:a + step]))
    bar.close()
    records = [{"id": i, "dataset": rows[i]["dataset"], "prompt": rows[i]["messages"][-1]["content"],
                "ground_truth": rows[i]["ground_truth"], "response": text, "score": s}
               for i, text, s in sorted(gather(preds))]
    metrics = {"accuracy": sum(c for c, _ in totals.values()) / max(sum(n for _, n in totals.values()), 1),
               **{task: c / max(n, 1) for task, (c, n) in sorted(totals.items())},
               "n_per_task": {task: n for task, (_, n) in sorted(totals.items())}}
    protocol = {"rows": f"tasks.make_tasks({args.seed})[3]", "scoring": "common.evaluate (verifiers.verify)",
                "greedy": True}
    prompt = tok.apply_chat_template(rows[0]["messages"], add_generation_prompt=True)
    save(out, "builtin", args, records, metrics, "accuracy", protocol, prompt, t0)
    cleanup()


if __name__ == "__main__":
    run(main)
