"""
GSM8K 8-shot chain-of-thought, the protocol Tülu 3 reports (OLMES `gsm8k::tulu`):
  - the 8 exemplars of the chain-of-thought paper (Wei et al. 2022), each answer ending
    "So the answer is N.", given as a multi-turn chat (OLMES fewshot_as_multiturn): 8 x
    [user "Question: {q}", assistant "Answer: {cot}"], then user "Question: {test question}";
    no system prompt; the assistant turn is made to start with "Answer:" (OLMES assistant_prefix)
  - greedy, 512 new tokens, stop at "Question:" (or the chat EOS)
  - verdict: verifiers.gsm8k, the last number of the response against the "#### N" answer (numeric,
    signs kept; OLMES compares strings and drops the sign of integers, see verifiers.py)

    python -m eval.gsm8k --ckpt out/sft                  # the test split, 1,319 problems
    python -m eval.gsm8k --ckpt out/sft --limit 100 --split train
    torchrun --standalone --nproc_per_node=8 -m eval.gsm8k --ckpt out/sft
"""
import os
import time

import verifiers
from eval.common import cleanup, complete, load_rows, parser, render, run, save, setup

FEWSHOT = [  # (question, chain of thought), in the paper's order
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. So the answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. So the answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "So the answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "So the answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. So the answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. So the answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. So the answer is 8."),
]
PREFIX = "Answer:"
STOPS = ["Question:", "</s>", "<|im_end|>"]  # OLMES' chat stop sequences; the checkpoint's EOS ends it too


def messages(question):
    shots = [[{"role": "user", "content": f"Question: {q}"}, {"role": "assistant", "content": f"{PREFIX} {a}"}]
             for q, a in FEWSHOT]
    return [m for pair in shots for m in pair] + [{"role": "user", "content": f"Question: {question}"}]


def score(rows, responses):
    """-> (records, metrics): one verdict per response against its row's "#### N" answer, and the accuracy."""
    records = []
    for i, (r, resp) in enumerate(zip(rows, responses)):
        records.append({"id": r.get("id", i), "question": r["question"], "gold": str(verifiers.gsm8k_gold(r["answer"])),
                        "pred": verifiers.gsm8k_pred(resp), "correct": verifiers.gsm8k(resp, r["answer"])})
    return records, {"exact_match": sum(x["correct"] for x in records) / max(len(records), 1)}


def main():
    p = parser("gsm8k", __doc__, max_new_tokens=512)
    p.add_argument("--split", default="test", choices=["test", "train"])
    args = p.parse_args()
    t0 = time.time()
    rows = load_rows(os.path.join(args.data, "gsm8k", f"{args.split}.jsonl"), ["question", "answer"], args.limit,
                     check=lambda r: verifiers.gsm8k_gold(r["answer"]))
    model, tok, out = setup(args, "gsm8k")
    prompts = [render(tok, messages(r["question"]), PREFIX) for r in rows]
    gens = complete(model, tok, prompts, args, STOPS, desc="gsm8k")
    records, metrics = score(rows, [g["response"] for g in gens])
    records = [{**r, **g} for r, g in zip(records, gens)]
    protocol = {"shots": 8, "format": "multi-turn chat, assistant prefix 'Answer:'", "stops": STOPS, "greedy": True,
                "scoring": "the last number, compared as a number with its sign (OLMES compares strings, unsigned)"}
    save(out, "gsm8k", args, records, metrics, "exact_match", protocol, prompts[0], t0)
    cleanup()


if __name__ == "__main__":
    run(main)
