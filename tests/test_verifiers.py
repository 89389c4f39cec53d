"""
verifiers.py / verifiers_ifeval.py against the references' semantics: the gold answers of the shipped
data, tables of reference verdicts, the reference bugs we fix, and hostile input.

    python -m pytest tests/test_verifiers.py -v

Reference verdicts in the tables were recorded by running the reference code: NLTK 3.10 punkt with its
English model (sentences) and nltk.word_tokenize (capital words); sympy 1.14 parse_latex with
antlr4-python3-runtime 4.11 (symbolic equivalence). Known differences are listed where they apply.
"""
import concurrent.futures
import json
import multiprocessing
import os
import random
import re
import time

import pytest

import verifiers as V
import verifiers_ifeval as I

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def rows(path):
    with open(os.path.join(DATA, path)) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------------
# GSM8K

def test_gsm8k_every_gold_answer_scores_one():
    data = rows("gsm8k/train.jsonl") + rows("gsm8k/test.jsonl")
    assert len(data) == 8792
    assert [r["answer"][-40:] for r in data if V.gsm8k(r["answer"], r["answer"]) != 1.0] == []
    # and against the bare number after '####' (open-instruct's RLVR label), commas and signs included
    assert sum(V.gsm8k(r["answer"], r["answer"].split("####")[-1].strip()) for r in data) == 8792


@pytest.mark.parametrize("response, gold, want", [
    ("So the answer is 1,200.", "1,200", 1.0),        # comma gold: Tülu 3's string compare gave 0
    ("So the answer is 1,200.", "#### 1200", 1.0),
    ("The answer is -3.", "-3", 1.0),                 # FIX: Tülu 3's regex read "3"
    ("The answer is -3.", "3", 0.0),
    ("The answer is 3.", "-3", 0.0),
    ("It costs 18.00 dollars", "18", 1.0),            # FIX: numeric, not string, equality
    ("It costs $1,200.", "1200", 1.0),
    ("+7", "7", 1.0),
    ("The answer is 7.\n\nQuestion: what is 12?", "7", 0.0),  # the last number wins (stop sequences help)
    ("no number here", "5", 0.0),
    ("", "5", 0.0),
    ("1,2,3", "3", 1.0),                              # "(\d),(\d)" joins "1,2" only: 12,3 -> 3
    ("So the answer is 18.", "$18.00", 1.0),          # a gold's leading '$' goes, as a response's
    ("x = 0.5", "0.50", 1.0),
    ("answer: .5", "0.5", 1.0),
    ("The answer is 5.5.5", "5", 0.0),                # numbers "5.5", ".5": the last is 0.5
])
def test_gsm8k_cases(response, gold, want):
    assert V.gsm8k(response, gold) == want


def test_gsm8k_bad_ground_truth_is_an_error():
    with pytest.raises(ValueError, match="gsm8k"):
        V.gsm8k("12", "#### twelve")


# ------------------------------------------------------------------------------------------------
# MATH

def test_math_every_gold_solution_scores_one():
    data = rows("math/test.jsonl")
    assert len(data) == 5000
    assert [r["answer"] for r in data if V.math(r["solution"], r["answer"]) != 1.0] == []
    assert [r["answer"] for r in data if V.math(r["solution"], r["solution"]) != 1.0] == []
    assert all(V.math_gold(r["solution"]) == r["answer"] for r in data)  # the data's gold = OLMES's


def test_math_minerva_line_parity():
    # The gold boxed answer written as Minerva's final line scores 1 for all 5,000. One gold ends in
    # "i.": Minerva normalisation turns the line's ".$" into "$", so the strings differ and only the
    # symbolic check matches, as in the reference, whose parser stops at a '.' after a letter.
    misses = []
    for r in rows("math/test.jsonl"):
        raw = V.remove_boxed(V.last_boxed_only_string(r["solution"]))
        resp = f"Final Answer: The final answer is ${raw}$. I hope it is correct."
        if V.math(resp, r["answer"]) != 1.0:
            misses.append(raw)
    assert misses == []
    resp = "Final Answer: The final answer is $\\frac{7}{5} + \\frac{1}{5} i.$. I hope it is correct."
    assert V.get_unnormalized_answer(resp) == "$\\frac{7}{5} + \\frac{1}{5} i.$"
    assert not V.hendrycks_equiv(V.math_candidates(resp)[0], "\\frac{7}{5}+\\frac{1}{5}i.")


def final(x):
    return f"Some work.\nFinal Answer: The final answer is ${x}$. I hope it is correct."


@pytest.mark.parametrize("response, gold, want", [
    (final("\\left( -\\infty, 1\\right)"), "\\left( -\\infty, 1 \\right)", 1.0),  # mangled alike
    ("Final Answer: The final answer is 24", "24", 0.0),            # no " I hope...": invalid
    ("Final Answer: The final answer is 24. I hope it is correct.", "24", 1.0),
    ("Final Answer: The final answer is $\\frac12$.", "\\frac{1}{2}", 1.0),  # invalid line, $..$ fallback
    ("Final Answer: The final answer is $90\\text{ square\nunits}$. I hope it is correct.", "90", 1.0),
    ("We get \\boxed{3} and finally \\boxed{4}.", "4", 1.0),          # multiple boxes: the last
    ("We get \\boxed{3} and finally \\boxed{4}.", "3", 0.0),
    ("first \\boxed {3} then \\boxed{4}", "4", 1.0),                 # FIX: the reference took "\boxed {3}..."
    ("so it is \\boxed 5$ and", "5", 1.0),                           # "\boxed x" form, up to the next '$'
    ("the area is \\fbox{7}", "7", 1.0),                             # FIX: the reference asserted on \fbox
    ("\\boxed{1} but then \\fbox{2}", "2", 1.0),
    ("$\\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{\\sqrt{2}}{2}", 1.0),   # nested braces, sympy
    ("$\\boxed{\\frac{1}{2}$", "\\frac{1}{2}", 0.0),                  # unbalanced: no box
    ("$\\boxed{\\dfrac{3}{4}}$", "\\frac34", 1.0),
    ("$\\boxed{\\tfrac{3}{4}}$", "\\frac{3}{4}", 1.0),
    ("$\\boxed{0.5}$", "\\frac12", 1.0),
    ("$\\boxed{1/2}$", "\\frac{1}{2}", 1.0),
    ("$\\boxed{10\\%}$", "10", 1.0),
    ("$\\boxed{10\\%}$", "10\\%", 1.0),
    ("$\\boxed{10%}$", "10\\%", 1.0),                                # FIX: lm-eval kept the bare '%'
    ("$\\boxed{\\$5}$", "5", 1.0),
    ("$\\boxed{5 \\text{ cm}}$", "5", 1.0),
    ("$\\boxed{k=4}$", "4", 1.0),
    ("$\\boxed{90^\\circ}$", "90", 1.0),
    ("$\\boxed{3.50}$", "3.5", 1.0),                                 # sympy only (Hendrycks says no)
    ("$\\boxed{\\text{(A)}}$", "\\text{(A)}", 1.0),
    ("$\\boxed{\\text{(A)}}$", "(B)", 0.0),
    ("$\\boxed{2\\sqrt{2}}$", "\\sqrt{8}", 1.0),
    ("$\\boxed{x^2+2x+1}$", "(x+1)^2", 1.0),
    ("$\\boxed{x^2+2x+2}$", "(x+1)^2", 0.0),
    ("$\\boxed{(1,2)}$", "(2,1)", 0.0),
    ("I think it is 7", "7", 0.0),      # whole-text candidate: "Ithinkitis7" != 7
    ("7", "7", 1.0),
    ("", "7", 0.0),
    # the last $...$ only when there is no Minerva line and no box; the whole text only when nothing else
    ("The values are $5$ and $6$", "6", 1.0),
    ("The values are $5$ and $6$", "5", 0.0),
    ("Final Answer: The final answer is $3$. I hope it is correct. Check: $4$", "4", 0.0),
    ("x = \\boxed{3} = 4", "4", 0.0),
])
def test_math_cases(response, gold, want):
    assert V.math(response, gold) == want


# (response, OLMES extract_answers: the Minerva line and the last box, both normalised; else the last
# $...$; else the whole text)
CANDIDATES = [
    ("The values are $5$ and $6$", ["6"]),                       # raw[d[-2]+1:d[-1]]: the last span
    ("Final Answer: The final answer is $3$. I hope it is correct. Check: $4$", ["3"]),
    ("x = \\boxed{3} = 4", ["3"]),
    ("$\\boxed{x = 5}$", ["5"]),                                 # OLMES normalises the box (open-instruct not)
    (final("7") + " So \\boxed{8}.", ["7", "8"]),                # the Minerva answer first (model_answer)
    ("I think it is 7", ["Ithinkitis7"]),
]


@pytest.mark.parametrize("response, want", CANDIDATES)
def test_math_candidates(response, want):
    assert V.math_candidates(response) == want


def test_math_extraction_quirks_kept_for_parity():
    assert V.get_unnormalized_answer("Final Answer: The final answer is 5 I hope it is correct.") == ""
    assert V.get_unnormalized_answer("Final Answer: The final answer is $\\frac12$.") == V.INVALID
    assert V.get_unnormalized_answer("Final Answer: The final answer is $x$. I hope it is correct.") == "$x$"
    assert V.normalize_final_answer("\\left(") == "\\le("       # "ft" is a unit
    assert V.normalize_final_answer("\\infty") == "\\iny"
    assert V.normalize_final_answer("An apple") == "Anapple"   # case-sensitive article removal
    assert V.normalize_final_answer("\\$1,000") == "1000"
    assert V.normalize_final_answer("a = b = 7") == "7"
    assert V.normalize_final_answer("\\boxed{\\frac12}") == "\\frac{1}{2}"
    assert V.normalize_final_answer("\\sqrt2") == "\\sqrt{2}"
    assert V.normalize_final_answer("10\\%") == "10\\%"
    assert V.normalize_final_answer("90\\text{ square units}") == "90"   # units on the removal list
    assert V.normalize_final_answer("x \\text{and} y") == "x,y"
    assert V.normalize_final_answer("0.\\overline{3}") == "0.3"


# (a, b, Hendrycks is_equiv: the original MATH code's strip_string, one step per row)
HENDRYCKS = [
    ("\\left(1,2\\right)", "(1,2)", True), ("\\dfrac{3}{4}", "\\frac34", True),
    ("\\tfrac{3}{4}", "\\frac{3}{4}", True), ("\\\\frac{1}{2}", "\\frac{1}{2}", True),
    ("90^{\\circ}", "90", True), ("90^\\circ", "90", True), ("\\$5", "5", True), ("5 \\text{ cm}", "5", True),
    (".5", "0.5", True), ("\\frac{.5}{2}", "\\frac{0.5}{2}", True), ("1 + .5", "1+0.5", True),
    ("k = 4", "4", True), ("abc = 4", "4", False), ("\\sqrt3", "\\sqrt{3}", True),
    ("\\frac1{72}", "\\frac{1}{72}", True), ("2/4", "\\frac{1}{2}", False), ("10\\%", "10", True),
    ("3.50", "3.5", False),
]


@pytest.mark.parametrize("a, b, want", HENDRYCKS)
def test_hendrycks_strip_string_steps(a, b, want):
    assert V.hendrycks_equiv(a, b) == want


def test_hendrycks_fixes():
    assert V.hendrycks_equiv("x/2", " x/2")   # FIX: lm-eval's ValueError fell back to raw equality
    assert V.hendrycks_equiv("10%", "10")     # FIX: the original MATH code removes '%'
    assert not V.hendrycks_equiv("3.50", "3.5")
    assert V.hendrycks_equiv("\\frac12", "0.5") and V.hendrycks_equiv("1/2", "\\frac{1}{2}")
    # exceptions inside the normalisation fall back to raw equality, as the reference
    assert V.hendrycks_equiv("\\sqrt", "\\sqrt") and not V.hendrycks_equiv("\\sqrt", "\\sqrt ")
    assert not V.hendrycks_equiv("1 \\text{ a} 2 \\text{ b}", "1")


# (a, b, verdict of the reference is_equiv). Known differences, not in the table: "1 2" (the reference
# reads 12; our inputs never contain spaces, Minerva normalisation removes them) and "\frac12.5".
SYMPY_REFERENCE = [
    ("0.25", "\\frac{1}{4}", True), ("0.333", "\\frac{1}{3}", False), ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True), ("x^2+2x+1", "(x+1)^2", True),
    ("e^{i\\pi}", "-1", False), ("\\pi", "3.14159", False), ("1,000", "1000", True), ("2,3", "2", True),
    ("x)", "x", True), ("5\\text{cm}", "5", False), ("\\text{(A)}", "(A)", False), ("3.50", "3.5", True),
    ("\\frac{6}{4}", "\\frac32", True), ("10^{-3}", "0.001", True), ("2^-1", "2", True),
    ("\\infty", "\\infty", False), ("x\\in[1,2]", "x", False), ("\\sin^2x+\\cos^2x", "1", True),
    ("\\log_28", "3", True), ("dx", "xd", False), ("(1,2)", "(1,2)", False), ("[2,5)", "[2,5)", False),
    ("\\frac{1}{2}", "0.5", True), ("50\\%", "50", False), ("1.5e3", "1500", False), ("|{-3}|", "3", True),
    ("\\binom{5}{2}", "10", True), ("5!", "120", True), ("\\lfloor 2.5\\rfloor", "2", True),
    ("\\overline{3}", "3", True), ("\\sqrt[3]{8}", "2", True), ("x(1+x)", "x+x^2", False),
    ("\\frac{1}{2}x", "\\frac{x}{2}", True), ("a=b", "a=b", False), ("x<1", "x<1", False),
    ("-\\frac{2}{3}", "\\frac{-2}{3}", True), (".5", "0.5", False), ("0.1+0.2", "0.3", False),
    ("\\sqrt2", "\\sqrt{2}", False), ("2\\cdot3", "6", True), ("6:2", "3", True), ("\\dfrac{3}{4}", "0.75", True),
    ("x_1+x_1", "2x_1", True), ("\\ln e", "1", False), ("\\frac{a}{b}", "\\frac{2a}{2b}", True),
    ("a^{2}-b^{2}", "(a-b)(a+b)", True), ("\\left(3\\right)", "3", True), ("10\\%", "10", False),
    ("9a.m.", "9a", True), ("2.", "2", False), ("a.1", "a", True),
]


def test_sympy_equivalence_matches_reference_verdicts():
    got = [(a, b, V.sympy_equiv([a], b)) for a, b, _ in SYMPY_REFERENCE]
    assert got == SYMPY_REFERENCE


def _reference_parse_latex():
    """sympy's parse_latex, None without its antlr4 runtime (a test extra); with it, any failure of the
    oracle fails the tests that use it rather than skipping them."""
    try:
        import antlr4  # noqa: F401
    except ImportError:
        return None
    from sympy.parsing.latex import parse_latex
    return parse_latex


@pytest.mark.skipif(_reference_parse_latex() is None, reason="needs antlr4-python3-runtime==4.11")
def test_parser_agrees_with_parse_latex_on_gold_answers():
    import sympy
    parse_latex = _reference_parse_latex()
    for g in [r["answer"] for r in rows("math/test500.jsonl")]:
        ours = V.latex_ast(g)
        try:
            ref = parse_latex(g)
        except Exception:  # noqa: BLE001
            ref = None
        if ours is None or ref is None or isinstance(ref, sympy.core.relational.Relational):
            assert (ours is None) == (ref is None or isinstance(ref, sympy.core.relational.Relational)), g
        else:
            assert sympy.simplify(V._to_sympy(ours, sympy) - ref) == 0, g


# digits apart (the grammar's `number` is a parser rule over one-digit tokens, with spaces skipped between
# them), leading zeros (sympy.Number("01") is Python's syntax error), a decimal part next to a '.' or a
# thousands group, and the grammar's skipped commands
NUMBER_CASES = [r"1\,000", r"10\,000", r"1\;000", r"2\,3", r"2 3", r"2\quad 3", r"2\!3", r"2 3 4", r"2 03",
                r"1\,000.5", r"0.2\,5", r"1 . 5", r"2 3.5", r"1.5 2", r"1.5 2.5", r"1.5 2 3.5", r"1.52,000",
                r"1.5 2,3", r"1.555,000", r"1,000 000", r"1 2,000", r"2, 300", r"1 2,00", r"2,3", r"1{,}000",
                r"10,\!000", r"04", r"0 1", r"01.5", r"000", r"00.5", r"4.5.", r"0.5.", r"2.", r"2 .", r"\=2",
                r"2\=3", r"2\)", r"2\left 3", r"2\vspace 3", r"\frac12 3", r"\frac1 23", r"x\,2", r"3\,\pi",
                r"2^{1 0}", r"\sqrt{1\,0}", r"-0 5"]


@pytest.mark.skipif(_reference_parse_latex() is None, reason="needs antlr4-python3-runtime==4.11")
@pytest.mark.parametrize("s", NUMBER_CASES)
def test_parser_reads_numbers_as_parse_latex(s):
    import sympy
    try:
        ref = sympy.simplify(_reference_parse_latex()(s))
    except Exception:  # noqa: BLE001
        ref = None
    ours = V.latex_ast(s)
    assert (None if ours is None else sympy.simplify(V._to_sympy(ours, sympy))) == ref


# Function applications as parse_latex converts them: an argument without parentheses is the grammar's
# func_arg_noparens (only its first factor may be a function: "\ln2\ln3" is ln 2 ln 3), a number after _ or ^
# keeps all its digits while an argument still follows (greedy DIGIT+: "\log_23+1" is log base 23 of +1),
# \sin^{-1} is asin and \lg is log base 10 (convert_func)
FUNCTION_CASES = [r"2\sin10\cos10", r"\ln2\ln3", r"\sin2\sqrt{3}", r"\sin\theta\cos\theta", r"\sin x\cdot\cos x",
                  r"\ln1092\div3\ln2", r"\log_23+1", r"\log_28x", r"\log_28", r"\log_23^2", r"\sin^23x", r"\sin^23",
                  r"\log_23\log_34", r"\log_23(x)", r"\tan^{-1}2", r"\sinh^{-1}x", r"\sin^{-1.0}x", r"\lg100",
                  r"\ln_28"]


# parse_latex's convert_postfix_list reads a lone x between two factors without symbols as a times sign
TIMES_X_CASES = [r"2x3", r"10x10", r"4x10^{5}", r"3x3x", r"x\frac{9}{100}x\frac{9}{100}", r"2x\sqrt{3}", r"2x\pi",
                 r"2xy", r"(2)x(3)", r"2x3x4", r"2xx3"]


@pytest.mark.skipif(_reference_parse_latex() is None, reason="needs antlr4-python3-runtime==4.11")
@pytest.mark.parametrize("s", FUNCTION_CASES + TIMES_X_CASES)
def test_parser_reads_functions_and_x_as_parse_latex(s):
    import sympy
    ref = sympy.simplify(_reference_parse_latex()(s))
    assert sympy.simplify(V._to_sympy(V.latex_ast(s), sympy)) == ref


def test_math_function_answers_score_as_the_reference():
    # (Minerva line, gold, verdict of the reference flex metric: lm-eval 0.4.3 is_equiv with sympy 1.14)
    cases = [("2\\sin 10^\\circ\\cos 10^\\circ", "\\sin 20^\\circ", 1.0), ("\\ln 2\\ln 3", "\\ln 3\\ln 2", 1.0),
             ("\\sin\\theta\\cos\\theta", "\\frac{\\sin 2\\theta}{2}", 1.0),
             ("\\sin 2\\sqrt{3}", "\\sqrt{3}\\sin 2", 1.0),
             ("\\log_2 3 + 1", "\\log_2 6", 0.0), ("\\log_2 8", "3", 1.0),
             ("\\cos^{-1}\\frac{1}{3}", "\\arccos\\frac13", 1.0), ("\\lg 100", "2", 1.0)]
    assert [(a, b, V.math(final(a), b)) for a, b, _ in cases] == cases


def test_math_x_between_numbers_scores_as_the_reference():
    assert V.math(final("4x10^{5}"), "400000") == 1.0 and V.math(final("2x3"), "6") == 1.0
    assert V.math(final("2x3"), "6x") == 0.0 and V.math(final("2x\\sqrt{3}"), "2\\sqrt{3}") == 1.0


def test_long_decimals_are_compared_by_sympy():
    # sympy keeps every significant digit of a decimal literal past 15 (Float("0.6666666666666666") has 16),
    # so the reference finds it unequal to 2/3; up to 15 digits a literal is a double, compared in-process
    assert V.math("$\\boxed{0.6666666666666666}$", "\\frac{2}{3}") == 0.0
    assert V.math("$\\boxed{2.0000000000000001}$", "2") == 0.0
    assert not V.sympy_equiv(["0.3333333333333333"], "\\frac13")
    assert V.math("$\\boxed{0.5000000000000000}$", "\\frac12") == 1.0 and V.sympy_equiv(["0.125"], "\\frac18")


def test_cfrac_is_a_symbol_as_in_parse_latex():
    # parse_latex has no \cfrac (CMD_FRAC is \frac, \dfrac, \tfrac): the MATH test gold "\cfrac{25}{16}"
    # (Algebra, Level 1) is the product cfrac*25*16 there, so only the same text matches it
    gold = V.math_gold("$\\cfrac{5}{4}\\cdot\\cfrac{5}{4}=\\boxed{\\cfrac{25}{16}}$.")
    answers = ("\\cfrac{25}{16}", "\\frac{25}{16}", "1.5625")
    assert [V.math(f"$\\boxed{{{x}}}$", gold) for x in answers] == [1.0, 0.0, 0.0]
    assert V.math("$\\boxed{\\cfrac{1}{2}}$", "\\frac{1}{2}") == 0.0


def test_only_ascii_digits_are_numbers():
    # the references compare strings (GSM8K) or lex [0-9] (parse_latex): Arabic-Indic digits are no number
    assert V.gsm8k("The answer is \u0661\u0662", "#### 12") == 0.0 and V.gsm8k("The answer is 12", "#### 12") == 1.0
    assert V.latex_ast("\u0661\u0662") is None and V.latex_ast("12") == ["num", "12"]


def test_separated_digits_and_leading_zeros_score_as_the_reference():
    # "10\,000" was 10 x 000 = 0; Minerva's normalisation turns the gold "0,1" into "01", which the
    # reference cannot parse (so a bare "1" is not it)
    line = "Final Answer: The final answer is ${}$. I hope it is correct."
    assert V.math(line.format("10\\,000"), "10000") == 1.0
    assert V.math(line.format("1"), "\\boxed{0,1}") == 0.0
    assert V.math(line.format("0,1"), "\\boxed{0,1}") == 1.0


def test_sympy_check_works_in_threads():
    # The reference's SIGALRM timeout raises outside the main thread, so this was 0 in thread pools.
    pairs = [("$\\boxed{2\\sqrt{2}}$", "\\sqrt{8}"), ("$\\boxed{x^2+2x+1}$", "(x+1)^2"),
             ("$\\boxed{\\frac{\\sqrt{3}}{3}}$", "\\frac{1}{\\sqrt{3}}"), ("$\\boxed{(x-1)(x+1)}$", "x^2-1")]
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        assert list(ex.map(lambda p: V.math(*p), pairs)) == [1.0] * 4


def _math_in_worker(pair):
    return V.math(*pair)


def test_sympy_check_works_in_daemonic_worker_processes():
    # multiprocessing.Pool workers are daemonic and may not start multiprocessing children
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_math_in_worker, [("$\\boxed{2\\sqrt{2}}$", "\\sqrt{8}")]) == [1.0]


def test_sympy_default_timeout_is_the_references(monkeypatch):
    # each symbolic comparison gets the reference's 5 s (SIGALRM there, a wall-clock deadline here)
    seen = []
    monkeypatch.setattr(V, "_sympy_worker_call", lambda pair, timeout: seen.append(timeout) or True)
    assert V.math("$\\boxed{x^2+2x+1}$", "(x+1)^2") == 1.0
    assert V.SYMPY_TIMEOUT == 5.0 and seen == [5.0]


def test_sympy_timeout_scores_zero_and_is_counted(monkeypatch):
    V.math("$\\boxed{2\\sqrt{2}}$", "\\sqrt{8}")  # a warm worker, so that start-up is not timed
    monkeypatch.setattr(V, "SYMPY_TIMEOUT", 1.0)
    before = V.FAILURES["math:TimeoutError"]
    t = time.monotonic()
    assert V.math("$\\boxed{(x+y+z)^{80}}$", "x") == 0.0  # simplify runs for many seconds
    assert time.monotonic() - t < 1.0 + 1.5
    assert V.FAILURES["math:TimeoutError"] == before + 1
    assert V.math("$\\boxed{2\\sqrt{2}}$", "\\sqrt{8}") == 1.0  # a fresh worker replaces the killed one
    for p in V._IDLE:  # an idle worker killed from outside (the OOM killer, say) is replaced too
        p.kill()
        p.wait()
    assert V.math("$\\boxed{(x-1)(x+1)}$", "x^2-1") == 1.0 and V.FAILURES["math:TimeoutError"] == before + 1
    # the timeout costs only its own candidate: the Minerva line runs out of time, the box still counts
    both = "Final Answer: The final answer is $(x+y+z)^{80}$. I hope it is correct. So $\\boxed{2\\sqrt{2}}$"
    assert V.math_candidates(both) == ["(x+y+z)^{80}", "2\\sqrt{2}"]
    assert V.math(both, "\\sqrt{8}") == 1.0 and V.FAILURES["math:TimeoutError"] == before + 2


def test_runaway_power_is_cut_off():
    t = time.monotonic()
    assert V.math("$\\boxed{2^{10^{10}}}$", "3") == 0.0  # SIGALRM cannot interrupt this in the reference
    assert time.monotonic() - t < call_bound("math")


def test_linear_rewrites_equal_reference_regexes():
    # The reference's regexes are quadratic on some inputs; our rewrites must give the same results.
    def ref_norm(s):
        s = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", s)
        for cmd in ("text", "textbf", "overline"):
            s = re.sub(r"(\\" + cmd + r"\{)(.*?)(\})", "\\2", s)
        return re.sub(r"(\\boxed\{)(.*)(\})", "\\2", s)

    def ref_unnormalized(s):
        m = re.search(r"Final Answer: The final answer is(.*?). I hope it is correct.", s + "I hope it is correct.")
        return m.group(1).strip() if m else V.INVALID

    def ref_bullets(s):
        return len(re.findall(r"^\s*\*[^\*].*$", s, flags=re.M)) + len(re.findall(r"^\s*-.*$", s, flags=re.M))

    def our_norm(s):  # normalize_final_answer's regex steps only
        s = V._lines(s, V._first_dollar_span)
        for cmd in ("\\text{", "\\textbf{", "\\overline{"):
            s = V._lines(s, lambda line: V._unwrap_lazy(line, cmd))
        return V._lines(s, lambda line: V._unwrap_greedy(line, "\\boxed{"))

    rng = random.Random(0)
    pieces = ["\\text{", "\\boxed{", "\\overline{", "<<", ">>", "Final Answer: The final answer is",
              ". I hope it is correct.", " I hope it is correct", "$", "}", "{", "\n", "*", "-", " ", "[", "]", "a"]
    for _ in range(5000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert our_norm(s) == ref_norm(s), s
        assert V.get_unnormalized_answer(s) == ref_unnormalized(s), s
        assert I._bullets(s, ref_bullets(s)), s
        assert I._placeholders(s, 2) == (len(re.findall(r"\[.*?\]", s)) >= 2), s
        assert I._title(s) == any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", s)), s


def test_math_bad_ground_truth_is_an_error():
    with pytest.raises(ValueError, match="math"):
        V.math("1", "the answer is \\boxed{1")


# ------------------------------------------------------------------------------------------------
# IFEval: sentence and word counting against NLTK

SENTENCES = [  # (text, len(punkt English tokenize))
    ("Hello Mr. Smith. How are you? I am fine!", 3), ("The U.S. is big. It has 50 states.", 2),
    ("e.g. This is it. i.e. that one.", 4), ("Intro:\n1. First item.\n2. Second item.", 4),
    ('He said "Hi." Then he left.', 2), ("Wait... What? Really?! Yes.", 3),
    ("no punctuation at all\nbut two lines", 1), ("", 0), ("   ", 0), ("It costs $3.50 today. Buy now.", 2),
    ("See the appendix (page 3.) Next part.", 2), ("Plan B. Then we go.", 2),
    ("J. K. Rowling wrote it. She is British.", 2), ("Dr. Watson arrived at 5 p.m. Finally, he slept.", 2),
    ("One. Two. Three. Four. Five.", 5), ("Ends without a period", 1), ("Version 2.0 is out. Get it.", 2),
    ("I have 3. the rest is gone.", 1), ("* Bullet one.\n* Bullet two.\n* Bullet three.", 3),
    ("Hmm... so what now?", 1), ('This is the end."\n\nNew paragraph here.', 2),
    ("A sentence!Another one? And a third.", 2), ("Movie A was long. Movie B. was short.", 2),
    ("Inc. Today we start. Ltd. The end.", 3), ("He arrived at 10 a.m. The meeting started.", 2),
]
CAPITALS = [  # (text, number of nltk.word_tokenize tokens with isupper())
    ("I DON'T know. It's U.S.A. NASA's CEO/CTO (USA) well-known.", 7), ("HELLO WORLD", 2),
    ("AT&T and Q&A", 4), ("CANNOT. GONNA", 4), ("ECB’s RATE", 2), ("“HELLO” THERE", 2), ("A-B C--D", 3),
    ("3RD place, B2B, x2", 2), ("HI..THERE", 2), ("THE END.", 2), ("I'M OK", 3), ("don't", 0), ("", 0),
    ("Mr. X", 1),
]


@pytest.mark.parametrize("text, n", SENTENCES)
def test_sentence_count_matches_punkt(text, n):
    assert len(I.split_sentences(text)) == n


@pytest.mark.parametrize("text, n", CAPITALS)
def test_capital_word_count_matches_nltk(text, n):
    assert I.capital_words(text) == n


def test_sentence_split_keeps_text():
    assert I.split_sentences('He said "Hi." Then he left.') == ['He said "Hi."', "Then he left."]
    assert I.split_sentences("Really?! Yes.") == ["Really?!", "Yes."]


# ------------------------------------------------------------------------------------------------
# IFEval: every instruction, passing and failing, strict and loose

CASES = [  # (id, kwargs, follows, does not follow in any loose variant)
    ("keywords:existence", {"keywords": ["banana", "kiwi"]}, "I like BANANAS and kiwis.", "I like bananas."),
    ("keywords:frequency", {"keyword": "war", "frequency": 2, "relation": "at least"},
     "War and software.", "Peace, then war."),  # substring matching: "software" counts
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "a cat", "cat cat"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "evil"]}, "This is badly done.", "That is Bad."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
     "Zz z", "zz"),
    ("keywords:letter_frequency", {"letter": "Q", "let_frequency": 2, "let_relation": "at least"},
     "Quick quiz", "Quiet"),  # the letter is lowercased too
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "less than"},
     "# one", "## two"),  # data keys 1122/1129: the reference drew a random letter instead
    ("language:response_language", {"language": "de"},
     "Das ist ein schöner Tag und wir gehen heute zusammen in den Park.",
     "This is an English sentence about the weather today."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One. Two.", "One. Two. Three."),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"},
     "Dr. Who. Yes.", "Dr. Who is here."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "***\nFirst part.\n***\nSecond part.\n***", "A\n***\n  \n***\nB"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "hydro-thermal vents are hot", "only four words here"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     'First paragraph.\n\n"Then, the second."', "First.\n\nNow the second."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you at [address].", "Dear [name],\nsee you."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\np.s. see you", "Hi. PS see you"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi. P. P. S more", "Hi. P.S. more"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two", "* one\n**bold** line"),
    ("detectable_format:constrained_response", {}, "My answer is maybe.", "my answer is yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*one* and **two**", "*one* and ** **"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nfoo\nSection 2\nbar", "SECTION 1\nfoo\nSection two\nbar"),
    ("detectable_format:json_format", {}, '```JSON\n{"a": [1, 2]}\n```', "{a: 1}"),
    ("detectable_format:title", {}, "<<My Title>>\nSome text.", "<< >>\n<<multi\nline>>"),
    ("combination:two_responses", {}, "Answer A.\n******\nAnswer B.", "Answer A.\n******\nAnswer A."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."},
     "  write a POEM. Roses are red.", "Sure! Write a poem."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     'Text here. any other questions?"', "Any other questions? Thanks."),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"},
     "I DON'T know", "NASA's CEO"),
    ("change_case:english_capital", {}, "THIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER TODAY.",
     "This is not in capital letters at all."),
    ("change_case:english_lowercase", {}, "this is an english sentence about the weather today.",
     "This is English with a capital letter."),
    ("punctuation:no_comma", {}, "no commas here，only a wide one", "a, b"),
    ("startend:quotation", {}, '  "quoted"  ', '"'),
]
LOOSE_ONLY = [  # (id, kwargs, response failing strict but passing once a first/last line or '*' goes)
    ("startend:quotation", {}, 'Sure, here it is:\n"quoted text"'),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}'),
    ("punctuation:no_comma", {}, "Sure, here you go:\nno commas in this part"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Text. Any other questions?\nBye"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "A bad intro\nthe body\nthe end"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "Sure:\nWrite a poem. Roses."),
    ("detectable_format:title", {}, "*<*<Title>*>*"),
    ("startend:quotation", {}, 'Sure:\n"quoted text"\nHope this helps!'),   # first and last line dropped
    ("startend:quotation", {}, 'Sure:\n*"quoted text"*'),                     # first line dropped, then '*'
]


def test_cases_cover_all_25_instructions():
    assert {c[0] for c in CASES} == set(I.IFEVAL) and len(I.IFEVAL) == 25


@pytest.mark.parametrize("loose", [False, True], ids=["strict", "loose"])
@pytest.mark.parametrize("iid, kw, good, bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_ifeval_instruction(iid, kw, good, bad, loose):
    assert V.ifeval(good, [iid], [kw], loose=loose) == [True]
    assert V.ifeval(bad, [iid], [kw], loose=loose) == [False]
    assert V.ifeval("   \n ", [iid], [kw], loose=loose) == [False]  # empty follows nothing


@pytest.mark.parametrize("iid, kw, response", LOOSE_ONLY)
def test_ifeval_loose_variants(iid, kw, response):
    assert V.ifeval(response, [iid], [kw]) == [False]
    assert V.ifeval(response, [iid], [kw], loose=True) == [True]


def test_ifeval_reference_edge_cases():
    f = lambda iid, r, **kw: V.ifeval(r, [iid], [kw])[0]  # noqa: E731
    # bullets: "---" counts, "**bold**" does not, a lone '*' counts and swallows the next line
    assert f("detectable_format:number_bullet_lists", "---\n* a", num_bullets=2)
    assert f("detectable_format:number_bullet_lists", "*\ntext\n* b", num_bullets=2)
    # nth paragraph: the reference counts non-empty paragraphs but indexes the raw split
    assert not f("length_constraints:nth_paragraph_first_word", "\n\nA b\n\nThen c",
                 num_paragraphs=2, nth_paragraph=2, first_word="then")
    # keywords are regexes without word boundaries; forbidden words get \b
    assert f("keywords:existence", "Hello WORLD", keywords=["wor"])
    assert f("keywords:forbidden_words", "catalog", forbidden_words=["cat"])
    # undetectable language counts as followed (reference), but not all-caps for digits
    assert f("language:response_language", "12345 6789", language="de")
    assert not f("change_case:english_capital", "12345")
    # "[[[[..." makes json.loads recurse: no crash, just False
    assert not f("detectable_format:json_format", "[" * 100_000)
    # a title needs text inside <<>>; the '>>' may come later on the line
    assert f("detectable_format:title", "<<A>> and <<B")
    assert not f("detectable_format:title", "<<>>")
    # highlight: a **bold** span counts once
    assert not f("detectable_format:number_highlighted_sections", "**bold**", num_highlights=2)
    # "at least" counts: more than asked is fine; bullets are exact
    assert f("detectable_content:number_placeholders", "[a], [b] and [c]", num_placeholders=2)
    assert f("detectable_format:number_highlighted_sections", "*a* *b* *c*", num_highlights=2)
    assert f("detectable_format:multiple_sections", "Section 1 a Section 2 b Section 3 c", section_spliter="Section",
             num_sections=2)
    assert not f("detectable_format:number_bullet_lists", "* a\n* b\n* c", num_bullets=2)
    # P.S. may be spaced out: r"\s*p\.\s?s\..*$"
    assert f("detectable_content:postscript", "Hi.\nP. S. see you", postscript_marker="P.S.")
    # nth paragraph: the paragraph count must match too; the first word ends at a quote
    assert not f("length_constraints:nth_paragraph_first_word", "First.\n\nThen second.\n\nThird.",
                 num_paragraphs=2, nth_paragraph=2, first_word="then")
    assert f("length_constraints:nth_paragraph_first_word", "First.\n\nThen's the second.",
             num_paragraphs=2, nth_paragraph=2, first_word="then")
    # two responses: an empty part between two separators fails
    assert not f("combination:two_responses", "A\n******\n\n******\nB")
    # the case checks also need langdetect to say English
    assert not f("change_case:english_capital", "DAS IST EIN SCHÖNER TAG UND WIR GEHEN HEUTE ZUSAMMEN IN DEN PARK.")
    assert not f("change_case:english_lowercase", "das ist ein schöner tag und wir gehen heute zusammen in den park.")


def test_ifeval_kwargs_validation():
    ok = ("keywords:frequency", {"keyword": "a", "frequency": 1, "relation": "at least"})
    assert V.ifeval("a", [ok[0]], [dict(ok[1], num_words=None, language=None)]) == [True]  # None dropped
    bad = [
        ("keywords:frequency", {"keyword": "a", "relation": "at least"}),          # missing
        ("keywords:frequency", dict(ok[1], extra=1)),                               # unknown
        ("keywords:frequency", dict(ok[1], relation="at most")),                    # bad relation
        ("keywords:frequency", dict(ok[1], frequency=-1)),                          # negative
        ("keywords:letter_frequency", {"letter": "ab", "let_frequency": 1, "let_relation": "at least"}),
        ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 3,
                                                         "first_word": "a"}),
        ("no:such_id", {}),
    ]
    for iid, kw in bad:
        with pytest.raises(ValueError):
            V.ifeval("a", [iid], [kw])
    # 0 is a number like any other (lm-eval's `if v` filter drops it; the reference keeps it)
    assert V.ifeval("abc", ["keywords:letter_frequency"], [{"letter": "z", "let_frequency": 0,
                                                            "let_relation": "at least"}]) == [True]
    with pytest.raises(ValueError):
        V.ifeval("a", ["punctuation:no_comma", "startend:quotation"], [{}])


def test_every_ifeval_prompt_validates_and_scores():
    data = rows("ifeval/input_data.jsonl")
    assert len(data) == 541 and sum(len(r["instruction_id_list"]) for r in data) == 834
    for r in data:  # the prompt as a response: no error, one verdict per instruction
        for loose in (False, True):
            got = V.ifeval(r["prompt"], r["instruction_id_list"], r["kwargs"], loose=loose)
            assert len(got) == len(r["instruction_id_list"]) and all(isinstance(x, bool) for x in got)


# ------------------------------------------------------------------------------------------------
# Tülu 3 `func_name` labels and routing

def tulu3(response, func_name, **args):
    return V.verify("ifeval", response, json.dumps({"func_name": func_name, **args, "unused": None}))


def test_tulu3_fixed_bugs():
    assert tulu3("No placeholders.", "validate_placeholders", N=2) == 0.0   # was a truthy tuple
    assert tulu3("[a] and [b]", "validate_placeholders", N=2) == 1.0
    opts = ["My answer is yes.", "My answer is no.", "My answer is maybe."]
    assert tulu3("My answer is yes. Indeed.", "validate_choice", options=opts) == 1.0
    assert tulu3("yes", "validate_choice", options=opts) == 0.0             # was `text in option`
    nine = "A B C D E F G H I"
    assert tulu3(nine, "validate_frequency_capital_words", N=10, quantifier="around") == 1.0  # was == N
    assert tulu3(nine, "validate_frequency_capital_words", N=20, quantifier="around") == 0.0
    assert tulu3("Wow! Great! Fine.", "verify_sentence_constraint", N=3, quantifier="at least") == 1.0
    assert tulu3('"', "validate_quotation") == 0.0
    assert tulu3('"hi"', "validate_quotation") == 1.0
    assert tulu3("A\n******\n", "validate_two_responses") == 0.0
    assert tulu3("A\n******\nB", "validate_two_responses") == 1.0
    assert tulu3("123", "validate_uppercase") == 0.0 and tulu3("HI 123", "validate_uppercase") == 1.0
    assert tulu3("<<>> text", "validate_title") == 0.0 and tulu3("<<T>> text", "validate_title") == 1.0
    assert tulu3("12345", "validate_response_language", language="en") == 0.0  # raised before


def test_tulu3_semantics_kept():
    assert tulu3("the cat and the cat", "verify_keyword_frequency", word="cat", N=2) == 1.0  # exact count
    assert tulu3("the cat and the cat", "verify_keyword_frequency", word="cat", N=1) == 0.0
    assert tulu3("Aaa", "verify_letter_frequency", letter="a", N=2) == 1.0  # case-sensitive
    assert tulu3("The End.\n", "validate_end", end_phrase="The End.") == 1.0  # the response is stripped
    assert tulu3("the end.", "validate_end", end_phrase="The End.") == 0.0
    assert tulu3("one\n* * *\ntwo", "verify_paragraph_count", N=2) == 1.0
    assert tulu3("Section A Section B", "validate_sections", N=2, section_splitter="Section") == 1.0
    assert tulu3("one two three four", "validate_word_constraint", N=5, quantifier="around") == 1.0  # +-max(0, 1)
    assert tulu3("one two three", "validate_word_constraint", N=5, quantifier="around") == 0.0
    assert tulu3("Hi.\nP.S.", "verify_postscript", postscript_marker="P.S.") == 0.0  # text must follow
    assert tulu3("Hi.\nP.S. bye", "verify_postscript", postscript_marker="P.S.") == 1.0
    assert tulu3("write a poem. Roses.", "validate_repeat_prompt", original_prompt="Write a poem.") == 0.0
    with pytest.raises(ValueError):
        tulu3("x", "no_such_function")
    with pytest.raises(ValueError):
        tulu3("x", "validate_end")  # missing end_phrase


def test_verify_routes_open_instruct_formats():
    row = {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}, {}]}
    assert V.verify("ifeval", '"no commas"', row) == 1.0
    assert V.verify("IFEval", '"a, b"', json.dumps(row)) == 0.5  # fraction of instructions followed
    oi = str([{"instruction_id": ["punctuation:no_comma"], "kwargs": [None]}])  # current open-instruct
    assert V.verify("ifeval", "no commas", oi) == 1.0
    assert V.verify("ifeval", "no commas", [json.dumps({"instruction_id": ["punctuation:no_comma"],
                                                        "kwargs": [{}]})]) == 1.0
    assert V.verify("tiny_if", "all lowercase english words in this short sentence",
                    json.dumps({"instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]})) == 1.0
    assert V.verify("gsm8k", "so 72", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == 1.0
    assert V.verify("tiny_arith", "7 + 5 = 12.\n#### 12", "12") == 1.0
    assert V.verify("MATH", "\\boxed{\\frac{1}{2}}", "Thus $\\boxed{\\dfrac12}$.") == 1.0
    with pytest.raises(ValueError, match="unknown dataset"):
        V.verify("code", "x", "y")
    with pytest.raises(ValueError):
        V.verify("ifeval", "x", "not a label")


def test_tiny_task_demonstrations_score_one():
    import tasks
    rng = random.Random(0)
    for _ in range(100):
        q, demo, ans = tasks.arith(rng, 0.0)
        assert V.verify("tiny_arith", demo, str(ans)) == 1.0
    kinds = 0
    for _ in range(100):
        _, good, iid, kw = tasks.constrained(rng, 1.0)
        label = json.dumps({"instruction_id_list": [iid], "kwargs": [kw]})
        if iid != "change_case:english_capital":  # langdetect calls some short all-caps English "de"
            assert V.verify("tiny_if", good, label) == 1.0, (iid, good)
            kinds += 1
    assert kinds > 50


def test_tiny_task_splits_are_disjoint():
    """README: the 600 held-out prompts are disjoint from every training prompt (SFT, DPO's, RL's)."""
    import tasks
    splits = tasks.make_tasks(0)
    prompts = [[r["messages"][0]["content"] for r in rows] for rows in splits]
    assert [len(p) for p in prompts] == [3000, 1000, 1000, 600]
    assert sum(map(len, map(set, prompts))) == len(set().union(*prompts)) == 5600


def test_tiny_task_mix_and_imperfect_demonstrations():
    """make_tasks' promise, on the default's own rows: every split alternates arithmetic and constrained
    writing; a p_wrong (0.25) share of the SFT arithmetic shows a result 1 or 2 off (its work and its final
    number agree), a p_follow (0.5) share of the constrained demonstrations honours the constraint and the
    rest break it; all six constraints occur; the seed reaches every split."""
    import tasks
    splits = tasks.make_tasks(0)
    for rows in splits[1:]:
        assert [r["dataset"] for r in rows] == ["tiny_arith", "tiny_if"] * (len(rows) // 2)
    arith, writing = splits[0][0::2], splits[0][1::2]
    assert not any("####" in r["messages"][1]["content"] for r in writing)
    off = []
    for r in arith:
        work, shown = re.fullmatch(r"(\d+ [-+*] \d+) = (\d+)\.\n#### (\d+)", r["messages"][1]["content"]).group(1, 2)
        off.append(int(shown) - eval(work))
        assert int(shown) == int(r["messages"][1]["content"].split()[-1])
    assert set(off) == {-2, -1, 0, 1, 2} and abs(sum(o != 0 for o in off) / len(off) - 0.25) < 0.03
    # the constrained demonstrations: each honours its constraint (strict IFEval) or breaks it, p_follow of them
    rng, scores, kinds = random.Random(0), [], set()
    for _ in range(1000):
        q, demo, iid, kw = tasks.constrained(rng, 0.5)
        kinds.add(iid)
        if iid == "change_case:english_capital":  # langdetect calls some short all-caps English "de"
            scores.append(float(demo == demo.upper()))
        else:
            scores.append(V.verify("tiny_if", demo, json.dumps({"instruction_id_list": [iid], "kwargs": [kw]})))
    assert set(scores) == {0.0, 1.0} and abs(sum(scores) / len(scores) - 0.5) < 0.05 and len(kinds) == 6
    assert {json.loads(r["ground_truth"])["instruction_id_list"][0] for r in splits[3][1::2]} == kinds
    assert tasks.make_tasks(1, n_sft=4, n_prefs=4, n_rl=4, n_eval=4) != tasks.make_tasks(0, n_sft=4, n_prefs=4,
                                                                                            n_rl=4, n_eval=4)


def test_tiny_task_knobs_change_only_the_sft_demonstrations():
    """make_tasks' promise: p_wrong and p_follow change the SFT demonstrations, never a prompt (so the
    held-out, RL and preference sets stay the same while the knobs are tuned)."""
    import tasks
    base = tasks.make_tasks(0, n_sft=200, n_prefs=50, n_rl=50, n_eval=100)
    for kw in [dict(p_wrong=0.1), dict(p_wrong=1.0), dict(p_follow=0.9)]:
        other = tasks.make_tasks(0, n_sft=200, n_prefs=50, n_rl=50, n_eval=100, **kw)
        assert other[1:] == base[1:], kw
        assert [r["messages"][0] for r in other[0]] == [r["messages"][0] for r in base[0]], kw
        assert other[0] != base[0], kw


# ------------------------------------------------------------------------------------------------
# hostile input: nothing raises, every call is bounded, failures are counted

HOSTILE = {
    "open_brackets": "[" * V.MAX_CHARS, "angles": "<<" * (V.MAX_CHARS // 2), "newlines": "\n" * V.MAX_CHARS,
    "dollars": "$" * V.MAX_CHARS, "boxes": "\\boxed{" * (V.MAX_CHARS // 7), "braces": "{" * V.MAX_CHARS,
    "final": "Final Answer: The final answer is" * (V.MAX_CHARS // 34), "dot_space": ". " * (V.MAX_CHARS // 2),
    "star_lines": "*\n" * (V.MAX_CHARS // 2), "text": "\\text{" * (V.MAX_CHARS // 6), "digits": "9" * V.MAX_CHARS,
    "nested": "\\boxed{" + "{" * 5000 + "}" * 5000 + "}", "nulls": "\x00" * 1000, "surrogate": "\ud800x\udfff",
}
LABELS = [  # one label per verifier; the IFEval one holds the slowest checks
    ("gsm8k", "#### 1,234"), ("math", "\\frac{1}{2}"),
    ("ifeval", {"instruction_id_list": ["language:response_language", "length_constraints:number_sentences",
                                        "change_case:capital_word_frequency", "detectable_format:title"],
                "kwargs": [{"language": "en"}, {"num_sentences": 3, "relation": "less than"},
                           {"capital_frequency": 2, "capital_relation": "at least"}, {}]}),
    ("ifeval", json.dumps({"func_name": "verify_sentence_constraint", "N": 3, "quantifier": "around"})),
]


def call_bound(dataset):
    return 8.0 + (2 * V.SYMPY_TIMEOUT if dataset == "math" else 0.0)  # seconds, on a busy 2-core machine
    # (math: the Minerva line and the last box, each with its own symbolic-check deadline)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_inputs_are_bounded(name):
    for dataset, label in LABELS:
        t = time.monotonic()
        score = V.verify(dataset, HOSTILE[name], label)
        assert 0.0 <= score <= 1.0
        assert time.monotonic() - t < call_bound(dataset), (name, dataset)


def test_fuzz_seeded_random_strings():
    rng = random.Random(1234)
    alphabet = "0123456789abcxyzABC .,;:!?$%&*#-+=/\\^_{}[]()<>\"'\n\t~`|@" + "éß中文\u200b\x00\x7f"
    pieces = ["\\boxed{", "\\frac", "\\sqrt", "Final Answer: The final answer is", " I hope it is correct.",
              "####", "******", "***", "<<", ">>", "P.S.", "Section 1", "\\left(", "\\text{", "```json", "1,000"]
    worst = {}
    for i in range(200):
        n = rng.choice([0, 1, 5, 50, 500, 3000])
        s = "".join(rng.choice(pieces) if rng.random() < 0.1 else rng.choice(alphabet) for _ in range(n))
        for dataset, label in LABELS:
            t = time.monotonic()
            score = V.verify(dataset, s, label)
            assert 0.0 <= score <= 1.0
            worst[dataset] = max(worst.get(dataset, 0), time.monotonic() - t)
    assert all(worst[d] < call_bound(d) for d in worst), worst


def test_unusable_responses_score_zero_and_are_counted():
    before = sum(V.FAILURES.values())
    assert V.verify("gsm8k", "1" * (V.MAX_CHARS + 1), "1") == 0.0
    assert V.verify("gsm8k", None, "1") == 0.0
    assert V.verify("math", b"\\boxed{1}", "1") == 0.0
    assert V.ifeval(None, ["punctuation:no_comma"], [{}]) == [False]
    assert sum(V.FAILURES.values()) == before + 4
