"""
MATH 4-shot chain-of-thought with "flex" scoring, the protocol Tülu 3 reports (OLMES
`minerva_math::tulu`, "MATH (4 shot CoT, Flex)"):
  - the 4 Minerva exemplars (data/math/minerva_4shot_prompt.txt) as a multi-turn chat: 4 x
    [user "Problem:\\n{problem}\\n\\nSolution:", assistant " {solution}"], then user
    "Problem:\\n{test problem}\\n\\nSolution:"; no system prompt, no assistant prefix. Their text is OLMES'
    default few-shot source "Minerva:MATH", which `::tulu` takes by naming none (`::olmes` asks for
    "Minerva:MATH:fixed", which differs only in exemplar 4's line breaks)
  - greedy, 1024 new tokens; stop at "Problem:" (`::tulu` itself sets no stop string and relies on
    the chat EOS; the cut only matters when a model goes on to invent the next problem, whose
    boxed answer would otherwise be the one taken)
  - verdicts: `flex` (headline) = verifiers.math: any candidate (the Minerva "Final Answer" line, the
    last box, else the last $...$, else the whole text; Minerva-normalised) equal to the gold under
    Hendrycks' equivalence or sympy; `minerva` = OLMES exact_match: the Minerva line only, by sympy
    only, so an answer sympy cannot parse (an interval, text) never matches: the 5,000 gold answers
    written as Minerva lines score 94.7% on it and 100% on flex (which is why Tülu 3 reports flex)
  - gold: the normalised content of the solution's last \\boxed{}
  - metrics: macro (mean over the 7 subjects, OLMES' suite metric) and micro (over problems); MATH-500 is
    one task in OLMES (`minerva_math_500`), so its headline is micro. Its file carries no subjects: they
    (and the levels) are looked up in the full test set by problem text

    python -m eval.math --ckpt out/sft                    # all 5,000 test problems
    python -m eval.math --ckpt out/sft --subset 500       # MATH-500 (data/math/test500.jsonl)
"""
import os
import re
import time

import verifiers
from eval.common import cleanup, complete, load_rows, parser, render, run, save, setup

STOPS = ["Problem:"]


def fewshot(path):
    """The Minerva exemplars -> [(problem, solution)]. The file is the exemplars in the non-chat prompt
    format, each "Problem:\\n{problem}\\n\\nSolution: {solution}", separated by blank lines."""
    text = open(path, encoding="utf-8").read().strip()
    shots = []
    for block in re.split(r"(?:^|\n\n)Problem:\n", text)[1:]:
        problem, sep, solution = block.partition("\n\nSolution:")
        if not sep:
            raise ValueError(f"{path}: an exemplar has no '\\n\\nSolution:' after its problem")
        shots.append((problem, solution.strip()))
    if len(shots) != 4:
        raise ValueError(f"{path}: expected 4 'Problem:' exemplars, found {len(shots)}")
    return shots


def query(problem):
    return f"Problem:\n{problem}\n\nSolution:"


def messages(problem, shots):
    pairs = [[{"role": "user", "content": query(p)}, {"role": "assistant", "content": f" {s}"}] for p, s in shots]
    return [m for pair in pairs for m in pair] + [{"role": "user", "content": query(problem)}]


def minerva(response, gold):
    """OLMES exact_match: the normalised "Final Answer: The final answer is X. I hope it is correct." X,
    symbolically equal to the gold (sympy only, as lm-eval's is_equiv)."""
    x = verifiers.get_unnormalized_answer(response)
    if x == verifiers.INVALID:
        return 0.0
    try:
        return float(verifiers.sympy_equiv([verifiers.normalize_final_answer(x)], gold))
    except Exception:  # noqa: BLE001  model output never raises: a failure is a wrong answer
        return 0.0


def score(rows, responses):
    """-> (records, metrics): flex and Minerva verdicts per response; micro and macro (over subjects) means."""
    records = []
    for i, (r, resp) in enumerate(zip(rows, responses)):
        gold = verifiers.math_gold(r["solution"])
        records.append({"id": r.get("unique_id", i), "type": r["type"], "level": r.get("level"), "gold": gold,
                        "candidates": verifiers.math_candidates(resp), "flex": verifiers.math(resp, r["solution"]),
                        "minerva": minerva(resp, gold)})
    metrics = {}
    subjects = sorted({r["type"] for r in records})
    for m in ("flex", "minerva"):
        per = {s: [r[m] for r in records if r["type"] == s] for s in subjects}
        per = {s: sum(v) / len(v) for s, v in per.items()}
        metrics[f"{m}_macro"] = sum(per.values()) / max(len(per), 1)
        metrics[f"{m}_micro"] = sum(r[m] for r in records) / max(len(records), 1)
        metrics[f"{m}_per_subject"] = per
    return records, metrics


def main():
    p = parser("math", __doc__, max_new_tokens=1024, out="math, or math500 with --subset 500")
    p.add_argument("--subset", default=None, choices=["500"], help="500: MATH-500 instead of all 5,000 problems")
    args = p.parse_args()
    t0 = time.time()
    name = "math500" if args.subset else "math"
    path = os.path.join(args.data, "math", "test500.jsonl" if args.subset else "test.jsonl")
    rows = load_rows(path, ["problem", "solution", "type"], args.limit, check=lambda r: verifiers.math_gold(r["solution"]))
    if args.subset:
        full = {r["problem"]: r for r in load_rows(os.path.join(args.data, "math", "test.jsonl"), ["problem", "type"])}
        for i, r in enumerate(rows):
            if r["problem"] not in full:
                raise SystemExit(f"error: {path}: row {i + 1}'s problem is not in test.jsonl: its subject is unknown")
            r["type"], r["level"] = full[r["problem"]]["type"], full[r["problem"]].get("level")
    shots = fewshot(os.path.join(args.data, "math", "minerva_4shot_prompt.txt"))
    model, tok, out = setup(args, name)
    prompts = [render(tok, messages(r["problem"], shots)) for r in rows]
    gens = complete(model, tok, prompts, args, STOPS, desc=name)
    records, metrics = score(rows, [g["response"] for g in gens])
    records = [{**r, **g} for r, g in zip(records, gens)]
    headline = "flex_micro" if args.subset else "flex_macro"
    protocol = {"shots": 4, "format": "multi-turn chat, Minerva exemplars (OLMES Minerva:MATH)",
                "stops": STOPS, "greedy": True, "headline": headline,
                "scoring": "flex: Hendrycks strip_string or sympy over the Minerva line, last box, last $...$"}
    save(out, name, args, records, metrics, headline, protocol, prompts[0], t0)
    cleanup()


if __name__ == "__main__":
    run(main)
