"""
eval/: the benchmark scripts run end to end on a tiny random model (one process and a 2-rank torchrun),
their prompts follow the protocols (golden renders), and their aggregations are right on hand-made
predictions.

    python -m pytest tests/test_eval.py -v
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import common
import tasks
import verifiers
from data import DataError
from eval import common as eval_common
from eval import builtin, gsm8k, ifeval, math
from eval.common import DATA, complete, cut, load_rows, positive, render
from helpers import python, refusal
from model import Llama, generate
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}  # CPU runs
FAST = ["--limit", "20", "--max-new-tokens", "8"]  # short generations: the protocol's lengths cost minutes on a CPU


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random checkpoint: byte-level BPE (any text encodes), Tülu chat template."""
    sft = tasks.make_tasks(seed=0, n_sft=96, n_prefs=2, n_rl=2, n_eval=2)[0]
    return tasks.make_base_checkpoint(str(tmp_path_factory.mktemp("eval") / "tiny"), sft, dim=32, n_layers=2,
                                      n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=300)


@pytest.fixture
def one_thread():
    """Generation in this process on one thread: the machine is shared, and oversubscribed threads make
    the tiny model's attention ~40x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runs(ckpt, tmp_path_factory):
    """Every CLI run at once (2 cores): -> {name: (returncode, stderr, out folder)}.
    gsm8k reads a --data copy whose first question was changed; builtin runs on 2 processes (torchrun,
    gloo) with batch size 1, so that its responses can be compared with one process's, and writes to
    its default folder."""
    tmp = tmp_path_factory.mktemp("runs")
    data = tmp / "data"
    os.makedirs(data / "gsm8k")
    rows = load_rows(os.path.join(DATA, "gsm8k", "test.jsonl"), [], limit=25)
    rows[0] = {"question": "Copy: what is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}
    with open(data / "gsm8k" / "test.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    py, tr = python("-m"), python("-m", nproc=2)
    cmds = {"gsm8k": (py, ["eval.gsm8k", "--data", str(data), "--batch-size", "10", "--out", str(tmp / "gsm8k")]),
            "math": (py, ["eval.math", "--subset", "500", "--batch-size", "10", "--out", str(tmp / "math")]),
            "ifeval": (py, ["eval.ifeval", "--out", str(tmp / "ifeval")]),
            "builtin": (tr, ["eval.builtin", "--batch-size", "1"])}
    procs = {k: subprocess.Popen(pre + cmd + ["--ckpt", ckpt] + FAST, cwd=ROOT, env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for k, (pre, cmd) in cmds.items()}
    out = {}
    for k, p in procs.items():
        _, err = p.communicate(timeout=600)
        out[k] = (p.returncode, err, str(tmp / k) if k != "builtin" else os.path.join(ckpt, "eval", "builtin"))
    return out


def outputs(runs, name):
    rc, err, out = runs[name]
    assert rc == 0, err[-3000:]
    recs = [json.loads(x) for x in open(os.path.join(out, "predictions.jsonl"), encoding="utf-8")]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert len(recs) == summary["n"] == 20 and summary["args"]["limit"] == 20
    if name != "builtin":  # common.evaluate returns the text only
        assert all(r["finish_reason"] in ("eos", "stop", "length") and r["n_tokens"] <= 8 for r in recs)
    return recs, summary


# -----------------------------------------------------------------------------
# end to end: outputs written, and the summary agrees with a re-scoring of the predictions


def test_gsm8k_cli(runs):
    recs, summary = outputs(runs, "gsm8k")
    assert recs[0]["question"] == "Copy: what is 2 + 3?"  # --data was read, not the shipped copy
    rows = load_rows(os.path.join(DATA, "gsm8k", "test.jsonl"), [], limit=20)[1:]
    assert [r["question"] for r in recs[1:]] == [r["question"] for r in rows]
    _, metrics = gsm8k.score([{"question": "", "answer": r["gold"]} for r in recs], [r["response"] for r in recs])
    assert summary["metrics"] == metrics and summary["primary"] == "exact_match"
    assert summary["example_prompt"].endswith("Question: Copy: what is 2 + 3?\n<|assistant|>\nAnswer:")


def test_math_cli(runs):
    # MATH-500: its file has no subjects ("type": null); the CLI takes them from the full test set, and the
    # headline is the micro mean (one task in OLMES)
    recs, summary = outputs(runs, "math")
    full = {r["problem"]: r for r in load_rows(os.path.join(DATA, "math", "test.jsonl"), [])}
    rows = load_rows(os.path.join(DATA, "math", "test500.jsonl"), [], limit=20)
    assert all(r["type"] is None for r in rows)
    rows = [{**r, "type": full[r["problem"]]["type"]} for r in rows]
    assert None not in {r["type"] for r in recs} and len({r["type"] for r in recs}) > 1
    _, metrics = math.score(rows, [r["response"] for r in recs])
    assert summary["metrics"] == metrics and summary["primary"] == "flex_micro"
    assert [r["gold"] for r in recs] == [r["answer"] for r in rows]


def test_ifeval_cli(runs):
    recs, summary = outputs(runs, "ifeval")
    rows = load_rows(os.path.join(DATA, "ifeval", "input_data.jsonl"), [], limit=20)
    assert [r["key"] for r in recs] == [r["key"] for r in rows]
    _, metrics = ifeval.score(rows, [r["response"] for r in recs])
    assert summary["metrics"] == metrics and summary["primary"] == "prompt_level_loose_acc"


def test_builtin_cli_two_ranks(runs, ckpt, one_thread):
    recs, summary = outputs(runs, "builtin")  # written to CKPT/eval/builtin by default
    held = tasks.make_tasks(0)[3][:20]
    assert [r["prompt"] for r in recs] == [h["messages"][-1]["content"] for h in held]
    # rank-strided, gathered back in order: what one process gets from common.evaluate
    preds = []
    model, tok = Llama.from_pretrained(ckpt), Tokenizer.from_pretrained(ckpt)
    one = common.evaluate(model, tok, held, max_new_tokens=8, batch_size=1, predictions=preds)
    assert [(r["id"], r["response"], r["score"]) for r in recs] == sorted(preds)
    m = summary["metrics"]
    assert m["accuracy"] == pytest.approx(one["accuracy"]) == pytest.approx(sum(r["score"] for r in recs) / 20)
    for t in ("tiny_arith", "tiny_if"):
        s = [r["score"] for r in recs if r["dataset"] == t]
        assert m["n_per_task"][t] == len(s) == 10 and m[t] == pytest.approx(sum(s) / len(s))
        assert m[t] == pytest.approx(one["per_task"][t]["accuracy"])


def test_evaluate_scores_decoded_responses_per_token_and_per_task(ckpt, monkeypatch):
    """common.evaluate on responses fixed in advance (generate stubbed): each prompt is the chat rendering
    ending at the assistant header, decoded greedily up to the tokenizer's EOS ids; the response is decoded
    without special tokens (an IFEval end phrase right before EOS counts), and the accuracy is over rows
    (micro: 3 of 4), not a mean of the tasks' (macro: 5/6). The model generates in eval mode and is handed back
    in the mode it came in."""
    import model as model_module
    tok = Tokenizer.from_pretrained(ckpt)
    end = "Is there anything else I can help with?"
    rows = [tasks.rlvr_row(f"What is {a} + {b}?", "tiny_arith", str(a + b)) for a, b in ((1, 3), (2, 5), (4, 5))]
    rows.append(tasks.rlvr_row("Write a line.", "tiny_if", json.dumps(
        {"instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": end}]})))
    responses = ["1 + 3 = 4.\n#### 4", "2 + 5 = 7.\n#### 7", "4 + 5 = 8.\n#### 8", f"A line. {end}"]
    calls = []

    def fake_generate(model, prompts, max_new_tokens, temperature, eos_token_ids, batch_size):
        calls.append((prompts, max_new_tokens, temperature, eos_token_ids, model.training))
        return [tok.encode(r) + [tok.eos_token_ids[0]] for r in responses], None

    monkeypatch.setattr(model_module, "generate", fake_generate)
    preds = []
    m = Llama.from_pretrained(ckpt).train()  # an evaluation in the middle of training
    res = common.evaluate(m, tok, rows, max_new_tokens=5, predictions=preds)
    (prompts, n_new, temperature, eos, training), = calls
    assert (n_new, temperature, eos) == (5, 0.0, tok.eos_token_ids)
    assert not training and m.training  # generated in eval mode, handed back in train mode (grad checkpointing)
    for p, r in zip(prompts, rows):
        assert tok.decode(p) == f"<|user|>\n{r['messages'][0]['content']}\n<|assistant|>\n"
    assert preds == [(i, text, s) for i, (text, s) in enumerate(zip(responses, (1.0, 1.0, 0.0, 1.0)))]
    assert res["per_task"] == {"tiny_arith": {"accuracy": pytest.approx(2 / 3), "n": 3},
                               "tiny_if": {"accuracy": 1.0, "n": 1}}
    assert res["accuracy"] == 0.75 and res["n"] == 4 and res["max_new_tokens"] == 5


def test_a_generation_prompt_ends_where_training_starts(ckpt):
    """data.encode_prompt's ids are the conversation's up to its assistant turn, and the next token is the
    first one SFT trains on: generation continues exactly where training began."""
    from data import encode_prompt
    from tokenizer import tokenize_conversation
    tok = Tokenizer.from_pretrained(ckpt)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    prompt = encode_prompt(tok, msgs)
    ids, mask = tokenize_conversation(tok, msgs + [{"role": "assistant", "content": "4"}])
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)]) and mask[len(prompt)]


# -----------------------------------------------------------------------------
# prompts, exactly per protocol (Tülu chat template of the tiny checkpoint)


def test_gsm8k_prompt(ckpt):
    tok = Tokenizer.from_pretrained(ckpt)
    text = render(tok, gsm8k.messages("How many?"), gsm8k.PREFIX)
    first = ("<|user|>\nQuestion: There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
             "After they are done, there will be 21 trees. How many trees did the grove workers plant today?\n"
             "<|assistant|>\nAnswer: There are 15 trees originally. Then there were 21 trees after some more were "
             "planted. So there must have been 21 - 15 = 6. So the answer is 6.<|endoftext|>\n")
    last = ("<|user|>\nQuestion: Olivia has $23. She bought five bagels for $3 each. How much money does she have "
            "left?\n<|assistant|>\nAnswer: Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 "
            "dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. So the answer is 8.<|endoftext|>\n"
            "<|user|>\nQuestion: How many?\n<|assistant|>\nAnswer:")
    assert text.startswith(first) and text.endswith(last)
    assert text.count("<|user|>\nQuestion: ") == 9 and text.count("<|assistant|>\nAnswer: ") == 8
    # the 8 exemplars of the chain-of-thought paper, each ending "So the answer is N."
    assert [a.rsplit("So the answer is ", 1)[1] for _, a in gsm8k.FEWSHOT] == \
        ["6.", "5.", "39.", "8.", "9.", "29.", "33.", "8."]
    assert [q.split()[0] for q, _ in gsm8k.FEWSHOT] == \
        ["There", "If", "Leah", "Jason", "Shawn", "There", "Michael", "Olivia"]
    assert gsm8k.STOPS == ["Question:", "</s>", "<|im_end|>"]  # OLMES' chat stop sequences


def test_math_prompt(ckpt):
    tok = Tokenizer.from_pretrained(ckpt)
    path = os.path.join(DATA, "math", "minerva_4shot_prompt.txt")
    shots = math.fewshot(path)
    # lossless parse: the exemplars put back together in the non-chat format are the file
    assert "\n\n".join(f"{math.query(p)} {s}" for p, s in shots) == open(path, encoding="utf-8").read().strip()
    assert [verifiers.math_gold(s) for _, s in shots] == ["[2,5)", "24", "16", "-\\frac{2}{3}"]
    assert all(s.endswith("I hope it is correct.") for _, s in shots)
    # minerva_math::tulu names no fewshot_source, so it takes OLMES' default "Minerva:MATH" (lm-eval's copy of the
    # Minerva prompt); ::olmes alone asks for "Minerva:MATH:fixed", whose exemplar 4 lacks these line breaks
    problem4, solution4 = shots[3]
    assert problem4.startswith("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\n")
    assert "\\end{align*}has a solution" in problem4 and "both nonzero,\nfind" in problem4
    assert "we obtain\n\n$$6y-9x" in solution4 and "we have\n\n$$-\\frac{3}{2}a=b" in solution4
    problem = load_rows(os.path.join(DATA, "math", "test.jsonl"), [], limit=1)[0]["problem"]
    text = render(tok, math.messages(problem, shots))
    assert text.startswith("<|user|>\nProblem:\nFind the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}"
                           "\n\nSolution:\n<|assistant|>\n The expressions inside each square root must be non-negative.")
    assert text.endswith("Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.<|endoftext|>\n"
                         f"<|user|>\nProblem:\n{problem}\n\nSolution:\n<|assistant|>\n")
    assert text.count("<|user|>\nProblem:\n") == 5 and text.count("<|assistant|>\n ") == 4
    assert math.STOPS == ["Problem:"]  # else an invented next problem's box would be the one taken


def test_ifeval_prompt(ckpt):
    tok = Tokenizer.from_pretrained(ckpt)
    row = load_rows(os.path.join(DATA, "ifeval", "input_data.jsonl"), [], limit=1)[0]
    assert render(tok, [{"role": "user", "content": row["prompt"]}]) == f"<|user|>\n{row['prompt']}\n<|assistant|>\n"


# -----------------------------------------------------------------------------
# aggregation on hand-made predictions


def test_gsm8k_score():
    rows = load_rows(os.path.join(DATA, "gsm8k", "test.jsonl"), [], limit=40)
    assert gsm8k.score(rows, [r["answer"] for r in rows])[1]["exact_match"] == 1.0  # gold solutions
    half = [r["answer"] if i % 2 else "I do not know." for i, r in enumerate(rows)]
    recs, m = gsm8k.score(rows, half)
    assert m["exact_match"] == 0.5 and recs[0]["pred"] is None and recs[1]["pred"] == recs[1]["gold"]
    # the recorded pred is the number the verifier read: its comma rule is ASCII-only, so in "\u0663,1,2" (an
    # Arabic-Indic 3 first) the comma joins 1 and 2 into 12, which a Unicode \d would have paired with the 3
    recs, m = gsm8k.score([{"question": "q", "answer": "#### 12"}], ["\u0663,1,2"])
    assert m["exact_match"] == 1.0 and recs[0]["pred"] == "12"


def test_math_score():
    # whole-number answers (sympy-parsable for Minerva's exact match), 2, 3, 4, ... problems per subject
    every = [r for r in load_rows(os.path.join(DATA, "math", "test.jsonl"), []) if r["answer"].isdigit()]
    subjects = sorted({r["type"] for r in every})
    rows = [r for k, s in enumerate(subjects) for r in [r for r in every if r["type"] == s][:k + 2]]
    assert len(subjects) == 7 and len(rows) == 35
    # gold solutions: flex finds the box; Minerva's exact match needs the "Final Answer" line
    _, m = math.score(rows, [r["solution"] for r in rows])
    assert (m["flex_micro"], m["flex_macro"], m["minerva_micro"]) == (1.0, 1.0, 0.0)
    line = "\nFinal Answer: The final answer is ${}$. I hope it is correct."
    _, m = math.score(rows, [r["solution"] + line.format(r["answer"]) for r in rows])
    assert (m["minerva_micro"], m["minerva_macro"]) == (1.0, 1.0)
    # right on one subject only: macro = 1 / #subjects, micro = its share of the problems
    a = subjects[0]
    resp = [line.format(r["answer"] if r["type"] == a else "x") for r in rows]
    _, m = math.score(rows, resp)
    n_a = sum(r["type"] == a for r in rows)
    for k in ("flex", "minerva"):
        assert m[f"{k}_macro"] == pytest.approx(1 / 7) and m[f"{k}_micro"] == pytest.approx(n_a / 35)
        assert m[f"{k}_per_subject"] == {s: float(s == a) for s in subjects}
    # an interval: flex (Hendrycks or sympy) matches it, OLMES exact_match (sympy only) cannot parse it;
    # the gold comes from the solution's box (a row needs no "answer" field)
    rows = [{"problem": "p", "solution": "So the domain is $\\boxed{[2,5)}$.", "type": "algebra"}]
    recs, m = math.score(rows, ["Final Answer: The final answer is $[2,5)$. I hope it is correct."])
    assert recs[0]["gold"] == "[2,5)" and (recs[0]["flex"], recs[0]["minerva"]) == (1.0, 0.0)


def test_ifeval_score():
    q, nc, end = "startend:quotation", "punctuation:no_comma", "startend:end_checker"
    rows = [{"key": 1, "prompt": "a", "instruction_id_list": [q, nc], "kwargs": [{}, {}]},
            {"key": 2, "prompt": "b", "instruction_id_list": [q, end], "kwargs": [{}, {"end_phrase": "Any other questions?"}]},
            {"key": 3, "prompt": "c", "instruction_id_list": [nc, "detectable_format:title"], "kwargs": [{}, {}]}]
    responses = ['"Hello there friend"',                                   # strict T T
                 'Sure, here it is:\n"Some text. Any other questions?"',    # strict F T, loose T T (first line dropped)
                 "a, b"]                                                    # F F either way
    recs, m = ifeval.score(rows, responses)
    assert [r["strict"] for r in recs] == [[True, True], [False, True], [False, False]]
    assert [r["loose"] for r in recs] == [[True, True], [True, True], [False, False]]
    assert m["prompt_level_strict_acc"] == pytest.approx(1 / 3) and m["inst_level_strict_acc"] == pytest.approx(3 / 6)
    assert m["prompt_level_loose_acc"] == pytest.approx(2 / 3) and m["inst_level_loose_acc"] == pytest.approx(4 / 6)
    assert m["per_instruction_strict"] == {end: 1.0, "detectable_format:title": 0.0, nc: 0.5, q: 0.5}
    # prompts with 1 and 3 instructions: the instruction level is micro (3 of 4), not a mean over prompts
    rows = [{"key": 1, "prompt": "a", "instruction_id_list": [nc], "kwargs": [{}]},
            {"key": 2, "prompt": "b", "instruction_id_list": [q, nc, "detectable_format:title"], "kwargs": [{}, {}, {}]}]
    _, m = ifeval.score(rows, ["a, b", '"<<T>> no commas"'])
    assert m["inst_level_strict_acc"] == pytest.approx(3 / 4) and m["prompt_level_strict_acc"] == pytest.approx(1 / 2)
    # the real prompts, answered with nothing: strict and loose both fail everything
    rows = load_rows(os.path.join(DATA, "ifeval", "input_data.jsonl"), [])
    _, m = ifeval.score(rows, [""] * len(rows))
    assert len(rows) == 541 and sum(len(r["instruction_id_list"]) for r in rows) == 834
    assert all(v == 0.0 for k, v in m.items() if k.endswith("_acc"))


# -----------------------------------------------------------------------------
# plumbing: stop strings, batched generation back in order, bad input


def test_builtin_accuracy_is_over_rows(monkeypatch, tmp_path):
    # common.evaluate a chunk at a time, chunks mixing the tasks unevenly: the per-task and overall
    # accuracies are correct answers over rows, not means of the chunks' accuracies
    tasks_ = ["tiny_arith", "tiny_arith", "tiny_if", "tiny_arith", "tiny_if"]
    right = [1.0, 0.0, 1.0, 1.0, 0.0]
    rows = [{"dataset": t, "messages": [{"role": "user", "content": str(i)}], "ground_truth": "1"}
            for i, t in enumerate(tasks_)]

    def evaluate(model, tok, chunk, max_new_tokens, batch_size, predictions):
        per = {}
        for i, r in enumerate(chunk):
            s = right[int(r["messages"][0]["content"])]
            predictions.append((i, "text", s))
            per.setdefault(r["dataset"], []).append(s)
        return {"per_task": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in per.items()}}

    saved = {}
    tok = SimpleNamespace(apply_chat_template=lambda messages, add_generation_prompt: "prompt")
    monkeypatch.setattr(builtin, "make_tasks", lambda seed: [None, None, None, rows])
    monkeypatch.setattr(builtin, "setup", lambda args, name: (None, tok, str(tmp_path)))
    monkeypatch.setattr(builtin, "evaluate", evaluate)
    monkeypatch.setattr(builtin, "save", lambda out, name, args, records, metrics, *a: saved.update(m=metrics, r=records))
    monkeypatch.setattr(builtin, "cleanup", lambda: None)
    monkeypatch.setattr(sys, "argv", ["builtin", "--ckpt", str(tmp_path), "--batch-size", "3"])
    builtin.main()
    m = saved["m"]
    assert m["accuracy"] == pytest.approx(3 / 5) and m["n_per_task"] == {"tiny_arith": 3, "tiny_if": 2}
    assert m["tiny_arith"] == pytest.approx(2 / 3) and m["tiny_if"] == pytest.approx(1 / 2)
    assert [r["score"] for r in saved["r"]] == right and [r["dataset"] for r in saved["r"]] == tasks_


def test_cut():
    assert cut("So 5.\n\nQuestion: next", ["Question:"]) == ("So 5.\n\n", True)
    assert cut("a Problem: b Question: c", ["Question:", "Problem:"]) == ("a ", True)  # the earliest stop wins
    assert cut("no stop here", ["Question:"]) == ("no stop here", False)


def test_complete_finish_reasons(monkeypatch):
    # a stop string wins over the EOS that ended the generation (a stopped generation would not have
    # reached it); EOS without a stop string is "eos"; neither is "length"
    texts = {5: "So 5.\n\nQuestion: next", 6: "So 6.", 7: "So 7 and"}

    class Tok:
        eos_token_ids = [0]

        def encode(self, s):
            return [int(s)]

        def decode(self, out, skip_special_tokens):
            return texts[out[0]]

    monkeypatch.setattr(eval_common, "generate", lambda model, ids, n, **kw: ([[i[0], 0] if i[0] != 7 else [7]
                                                                              for i in ids], None))
    got = complete(None, Tok(), ["5", "6", "7"], SimpleNamespace(batch_size=2, max_new_tokens=4), ["Question:"])
    assert [(g["response"], g["finish_reason"]) for g in got] == [("So 5.\n\n", "stop"), ("So 6.", "eos"),
                                                                   ("So 7 and", "length")]


def test_complete_matches_one_by_one(ckpt, one_thread):
    model, tok = Llama.from_pretrained(ckpt).eval(), Tokenizer.from_pretrained(ckpt)
    prompts = [render(tok, [{"role": "user", "content": "x" * n}]) for n in (3, 40, 7, 25, 1)]
    args = SimpleNamespace(batch_size=2, max_new_tokens=6)
    got = complete(model, tok, prompts, args)
    for p, g in zip(prompts, got):  # each prompt alone, no padding
        (out,), _ = generate(model, [tok.encode(p)], 6, temperature=0.0, eos_token_ids=tok.eos_token_ids)
        assert g["response"] == tok.decode(out, skip_special_tokens=True) and g["n_tokens"] == len(out)


def test_bad_data(tmp_path):
    f = tmp_path / "test.jsonl"
    f.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    for bad in ("0", "-3", "2.5", "x"):  # --limit, --batch-size, --max-new-tokens
        with pytest.raises(argparse.ArgumentTypeError, match="whole number >= 1"):
            positive(bad)
    with pytest.raises(DataError, match=r"test.jsonl:2: missing field\(s\) \['answer'\]"):
        load_rows(str(f), ["question", "answer"])
    f.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": "no number"}\n')
    with pytest.raises(DataError, match=r"test.jsonl:2: gsm8k: ground truth 'no number' does not end in a number"):
        load_rows(str(f), ["question", "answer"], check=lambda r: verifiers.gsm8k_gold(r["answer"]))
    f.write_text(json.dumps({"key": 7, "prompt": "p", "instruction_id_list": ["punctuation:no_comma",
                            "length_constraints:number_words"], "kwargs": [{}, {"num_words": 5}]}) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl:1: ifeval: length_constraints:number_words takes kwargs"):
        load_rows(str(f), [], check=lambda r: verifiers.ifeval("", r["instruction_id_list"], r["kwargs"]))
    bad = tmp_path / "math"
    os.makedirs(bad)
    shutil.copy(os.path.join(DATA, "math", "minerva_4shot_prompt.txt"), bad / "p.txt")
    (bad / "p.txt").write_text((bad / "p.txt").read_text().replace("\n\nSolution:", "\nSolution:", 1))
    with pytest.raises(ValueError, match="no '.*Solution:'"):
        math.fewshot(str(bad / "p.txt"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cli_cuda(ckpt, tmp_path):
    """On a GPU: bf16, CUDA-graph decoding, a 1-rank NCCL group for the gather; the protocol's 512 tokens."""
    env = {**ENV, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    r = subprocess.run([sys.executable, "-m", "eval.gsm8k", "--ckpt", ckpt, "--limit", "20", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    recs = [json.loads(x) for x in open(tmp_path / "predictions.jsonl", encoding="utf-8")]
    assert "1 x cuda (torch.bfloat16)" in r.stdout and summary["n"] == len(recs) == 20
    assert all(x["n_tokens"] <= 512 and x["finish_reason"] in ("eos", "stop", "length") for x in recs)


def test_cli_errors_are_one_sentence(ckpt, tmp_path, monkeypatch, capsys):
    # bad data, a missing checkpoint, an --out that is a file: one line, before any generation
    (tmp_path / "gsm8k").mkdir()
    bad = tmp_path / "gsm8k" / "test.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args, msg in [(["--ckpt", ckpt, "--data", str(tmp_path)], f"error: {bad}:2: missing field(s) ['answer']"),
                      (["--ckpt", str(tmp_path / "none")], f"error: {tmp_path / 'none'}/config.json not found"),
                      (["--ckpt", ckpt, "--out", str(afile)], f"error: --out {afile} is a file")]:
        # (--limit 2: were a check lost, the run would score 2 questions and the test fail quickly)
        assert refusal(monkeypatch, capsys, "eval.gsm8k", *args, "--limit", 2).startswith(msg)  # no traceback


def test_unwritable_out_is_refused_before_generating(ckpt, tmp_path, monkeypatch, capsys):
    # the results are written after the whole generation (hours for MATH on a large model): an output folder
    # that cannot be made must stop the run at once, in one sentence, not in save() with everything generated
    # lost. The default CKPT/eval/<benchmark> of a checkpoint whose eval/ cannot be a folder, and an --out
    # through a file.
    def no_generation(*a, **kw):
        raise AssertionError("generated before finding that the results cannot be written")

    monkeypatch.setattr(eval_common, "complete", no_generation)
    ro = tmp_path / "ckpt"
    shutil.copytree(ckpt, ro, ignore=shutil.ignore_patterns("eval"))  # (other tests write CKPT/eval/)
    (ro / "eval").write_text("not a folder")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args, out, bad in [([], ro / "eval" / "gsm8k", ro / "eval"),
                           (["--out", afile / "gsm8k"], afile / "gsm8k", afile)]:
        msg = refusal(monkeypatch, capsys, "eval.gsm8k", "--ckpt", ro, *args, "--limit", 2)
        assert msg == f"error: cannot write {out} ({bad} is a file); give --out a directory this process can write"
    assert sorted(os.listdir(tmp_path)) == ["afile", "ckpt"]  # nothing left behind
    # a checkpoint that does not exist is still reported as such, with no folder made on the way
    assert refusal(monkeypatch, capsys, "eval.gsm8k", "--ckpt", tmp_path / "none", "--limit", 2).startswith(
        f"error: {tmp_path / 'none'}/config.json not found")
    assert not (tmp_path / "none").exists()
