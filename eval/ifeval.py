"""
IFEval, 0-shot, the protocol Tülu 3 reports (OLMES `ifeval::tulu`):
  - each of the 541 prompts (data/ifeval/input_data.jsonl) as one user turn, no system prompt
  - greedy, 2048 new tokens (the `::tulu` value; OLMES' plain `ifeval` uses 1280), no stop string
  - verdicts: verifiers.ifeval per instruction, strict (the response as is) and loose (any of 8
    variants: without the first and/or last line, without '*'), Google's semantics
  - metrics: prompt level (all of a prompt's instructions followed) and instruction level (micro over
    the 834 instructions), strict and loose; Tülu 3's "IFEval" is prompt_level_loose (the headline).
    Also the instruction-level accuracy of each instruction id.

    python -m eval.ifeval --ckpt out/sft
"""
import os
import time

import verifiers
from eval.common import cleanup, complete, load_rows, parser, render, run, save, setup


def score(rows, responses):
    """-> (records, metrics): per prompt the strict and loose verdict of each instruction; the four
    accuracies (prompt/instruction level x strict/loose) and per-instruction-id accuracies."""
    records = []
    for r, resp in zip(rows, responses):
        ids, kw = r["instruction_id_list"], r["kwargs"]
        records.append({"key": r["key"], "prompt": r["prompt"], "instruction_id_list": ids,
                        "strict": verifiers.ifeval(resp, ids, kw), "loose": verifiers.ifeval(resp, ids, kw, loose=True)})
    metrics, n = {}, max(len(records), 1)
    for mode in ("strict", "loose"):
        flags = [f for r in records for f in r[mode]]
        metrics[f"prompt_level_{mode}_acc"] = sum(all(r[mode]) for r in records) / n
        metrics[f"inst_level_{mode}_acc"] = sum(flags) / max(len(flags), 1)
    for mode in ("strict", "loose"):
        per = {}
        for r in records:
            for i, f in zip(r["instruction_id_list"], r[mode]):
                per.setdefault(i, []).append(f)
        metrics[f"per_instruction_{mode}"] = {i: sum(v) / len(v) for i, v in sorted(per.items())}
    return records, metrics


def main():
    args = parser("ifeval", __doc__, max_new_tokens=2048).parse_args()
    t0 = time.time()
    rows = load_rows(os.path.join(args.data, "ifeval", "input_data.jsonl"),
                     ["key", "prompt", "instruction_id_list", "kwargs"], args.limit,
                     check=lambda r: verifiers.ifeval_checks(r["instruction_id_list"], r["kwargs"]))  # labels validated
    model, tok, out = setup(args, "ifeval")
    prompts = [render(tok, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    gens = complete(model, tok, prompts, args, desc="ifeval")
    records, metrics = score(rows, [g["response"] for g in gens])
    records = [{**r, **g} for r, g in zip(records, gens)]
    protocol = {"shots": 0, "format": "one user turn", "stops": [], "greedy": True, "headline": "prompt_level_loose_acc"}
    save(out, "ifeval", args, records, metrics, "prompt_level_loose_acc", protocol, prompts[0], t0)
    cleanup()


if __name__ == "__main__":
    run(main)
