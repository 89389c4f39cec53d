"""
verifiers.py: verifiable rewards (RLVR) and benchmark scoring for GSM8K, MATH and IFEval.

    from verifiers import verify, gsm8k, math, ifeval, FAILURES
    verify("gsm8k", "... so the answer is 1,234.", "#### 1234")                       # -> 1.0
    verify("math", "... Final Answer: The final answer is $\\frac12$. I hope it is correct.",
           "\\frac{1}{2}")                                                            # -> 1.0
    verify("ifeval", response, '{"instruction_id_list": [...], "kwargs": [...]}')      # -> fraction followed
    python -m pytest tests/test_verifiers.py -v

The semantics are the references' (Tülu 3 / OLMES, Hendrycks, Minerva, Google IFEval), with their
known bugs fixed; each fix is pinned by a test:
  1. last_boxed_only_string takes the last box; the reference jumps to the last "\\boxed " whenever the
     text has one anywhere, and never looks at \\fbox when a \\boxed exists.
  2. Symbolic equivalence runs in a worker process with a wall-clock timeout; the reference's SIGALRM
     fails outside the main thread and silently turns every sympy check into False.
  3. Hendrycks normalisation uses the original MATH code: "%" is removed like "\\%", and "x/2" no
     longer makes the whole normalisation fall back to raw string equality (lm-eval catches only
     AssertionError where the original caught everything).
  4. GSM8K keeps the sign of integers ("-3" is not "3") and compares numerically ("18.00" == "18",
     "2,125" == "2125"), where Tülu 3 compared strings.
  5. Tülu 3's IFEval functions (`func_name` labels): the placeholder check returned a tuple (always
     truthy), validate_choice tested `text in option`, "around" meant "exactly" for capital words, the
     sentence split ignored "!", and a lone '"', an empty half, digit-only text or an empty <<>> passed.
Scoring never raises on model output: anything that goes wrong scores 0 and is counted in FAILURES.
Bad ground truth (a data error) raises ValueError.
"""
import ast
import atexit
import collections
import decimal
import fractions
import json
import os
import re
import select
import subprocess
import sys
import threading
import time

import verifiers_ifeval as vif

MAX_CHARS = 100_000  # longer responses score 0 (a counted failure): no model of ours writes that much
SYMPY_TIMEOUT = 5.0  # seconds of wall clock per symbolic comparison of a candidate (the reference: 5 s)
FAILURES = collections.Counter()  # "verifier:reason" -> number of responses scored 0 because of it
_FAILURES_LOCK = threading.Lock()


def _failed(name, e):
    with _FAILURES_LOCK:  # verifiers run in threads (RL reward workers)
        FAILURES[f"{name}:{type(e).__name__}"] += 1


def _guarded(name, fn, response, *args, default=0.0):
    """fn(response, *args), or `default` (counted in FAILURES) if the response is unusable or fn fails."""
    try:
        if not isinstance(response, str):
            raise TypeError("response is not a str")
        if len(response) > MAX_CHARS:
            raise ValueError("response longer than MAX_CHARS")
        return fn(response, *args)
    except Exception as e:  # noqa: BLE001 any failure on model output scores 0, by design
        _failed(name, e)
        return default


# --------------------------------------------------------------------------------------------------
# GSM8K: the last number of the response equals the number after '####'

# open-instruct's (fixed) regex: a sign, then a decimal or an integer. The Tülu 3 original
# r"[-+]?\d*\.\d+|\d+" attached the sign to decimals only, so "-3" was read as "3".
_NUMBER = re.compile(r"[-+]?(?:\d*\.\d+|\d+)", re.ASCII)  # ASCII digits: "١٢" is no 12 to a string compare


def gsm8k_gold(ground_truth):
    """Decimal value of a GSM8K answer ("... #### 1,234") or of a bare number ("-3", "$18.00")."""
    s = str(ground_truth).split("####")[-1].strip().replace(",", "").removeprefix("$").rstrip(".")
    try:
        value = decimal.Decimal(s)
        if value.is_finite():
            return value
    except decimal.InvalidOperation:
        pass
    raise ValueError(f"gsm8k: ground truth {str(ground_truth)[-80:]!r} does not end in a number")


def gsm8k_pred(response):
    """The number the GSM8K verifier reads from a response, or None: thousands commas between digits dropped,
    then the last number ("$1,200." -> "1200")."""
    nums = _NUMBER.findall(re.sub(r"(\d),(\d)", r"\1\2", response, flags=re.ASCII))
    return nums[-1] if nums else None


def _gsm8k(response, gold):
    pred = gsm8k_pred(response)
    return float(pred is not None and decimal.Decimal(pred) == gold)  # numeric: "18.00" == "18"


def gsm8k(response, ground_truth):
    """1.0 if the last number in `response` equals the ground truth's number, else 0.0."""
    return _guarded("gsm8k", _gsm8k, response, gsm8k_gold(ground_truth))


# --------------------------------------------------------------------------------------------------
# MATH: answer extraction and normalisation (Hendrycks et al. 2021; Minerva, Lewkowycz et al. 2022)

def last_boxed_only_string(s):
    """The last \\boxed{...}, \\boxed ... or \\fbox{...} of s, braces balanced; None if none closes.
    The "\\boxed x" form runs to the next '$'."""
    i = max(s.rfind("\\boxed"), s.rfind("\\fbox"))
    if i < 0:
        return None
    if s.startswith("\\boxed ", i):
        return "\\boxed " + s[i + 7:].split("$")[0]
    depth = 0
    for j in range(i, len(s)):  # walk to the brace that closes the first '{'
        if s[j] == "{":
            depth += 1
        elif s[j] == "}":
            depth -= 1
            if depth == 0:
                return s[i:j + 1]
    return None


def remove_boxed(s):
    """Content of a box from last_boxed_only_string, or None if it is not a well-formed box."""
    if s is None:
        return None
    if s.startswith("\\boxed "):
        return s[7:]
    for left in ("\\boxed{", "\\fbox{"):
        if s.startswith(left) and s.endswith("}"):
            return s[len(left):-1]
    return None


INVALID = "[invalidanswer]"


def get_unnormalized_answer(text):
    """Minerva's answer line: re.search(r"Final Answer: The final answer is(.*?). I hope it is
    correct.", text + "I hope it is correct."), group stripped, else INVALID. Quirks kept for parity:
    the character before " I hope" is dropped, '.' does not match a newline, so the answer cannot
    contain one, and "...is $x$." at the very end is invalid (the appended sentence has no space).
    Written with str.find so that long lines cannot make the lazy regex quadratic."""
    text += "I hope it is correct."
    head, tail = "Final Answer: The final answer is", " I hope it is correct"
    i = text.find(head)
    while i >= 0:
        g = i + len(head)
        eol = text.find("\n", g)
        eol = len(text) if eol < 0 else eol
        k = text.find(tail, g + 1, eol)  # first tail after >= 1 character (the regex's '.')
        if k >= 0 and k + len(tail) < eol:  # and one more character for the final '.'
            return text[g:k - 1].strip()
        i = text.find(head, eol)  # a later head on this line would find the same tail
    return INVALID


# Minerva's normalize_final_answer (Lewkowycz et al. 2022, appendix D), lists verbatim.
SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""),
                 ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
REMOVED_EXPRESSIONS = [
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters",
    "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}",
    "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ",
    r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots"]


def _lines(s, fn):
    return "\n".join(fn(line) for line in s.split("\n"))


def _first_dollar_span(line):
    # re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$"): '.' stops at newlines, so per line, keep $first span$
    a = line.find("$")
    b = line.find("$", a + 1) if a >= 0 else -1
    return "$" + line[a + 1:b] + "$" if b >= 0 else line


def _unwrap_lazy(line, cmd):
    # re.sub(r"(CMD\{)(.*?)(\})", "\\2"): each CMD{...} up to its first '}' on the line
    out, i = [], 0
    while (j := line.find(cmd, i)) >= 0:
        k = line.find("}", j + len(cmd))
        if k < 0:
            break  # no '}' after it: no later CMD{ on this line matches either
        out += [line[i:j], line[j + len(cmd):k]]
        i = k + 1
    return "".join(out) + line[i:]


def _unwrap_greedy(line, cmd):
    # re.sub(r"(CMD\{)(.*)(\})", "\\2"): the first CMD{ up to the last '}' of the line
    j, k = line.find(cmd), line.rfind("}")
    return line[:j] + line[j + len(cmd):k] + line[k + 1:] if 0 <= j and k >= j + len(cmd) else line


def normalize_final_answer(s):
    """Minerva normalisation: "x = \\$1,000" -> "1000", "5 \\text{ cm}" -> "5", "\\sqrt2" ->
    "\\sqrt{2}". Its side effects are kept ("\\left" -> "\\le", "\\infty" -> "\\iny": "ft" is a unit);
    they apply to both sides of a comparison alike. The reference's regexes are rewritten per line
    (they cannot cross newlines) so that no input makes them quadratic."""
    s = s.split("=")[-1]
    for a, b in SUBSTITUTIONS:
        s = s.replace(a, b)
    for x in REMOVED_EXPRESSIONS:
        s = s.replace(x, "")
    s = _lines(s, _first_dollar_span)
    for cmd in ("\\text{", "\\textbf{", "\\overline{"):
        s = _lines(s, lambda line: _unwrap_lazy(line, cmd))
    s = _lines(s, lambda line: _unwrap_greedy(line, "\\boxed{"))
    s = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", s)  # \sqrt2 -> \sqrt{2}
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s


def _fix_fracs(s):
    parts = s.split("\\frac")
    out = parts[0]
    for p in parts[1:]:
        out += "\\frac"
        if p[0] == "{":  # IndexError on a trailing "\frac": the caller compares raw strings
            out += p
        elif len(p) < 2:
            return s
        elif p[1] != "{":
            out += "{" + p[0] + "}{" + p[1] + "}" + p[2:]  # \frac12 -> \frac{1}{2}
        else:
            out += "{" + p[0] + "}" + p[1:]  # \frac1{72} -> \frac{1}{72}
    return out


def _fix_a_slash_b(s):
    a, _, b = s.partition("/")
    try:
        if "/" not in b and s == f"{int(a)}/{int(b)}":
            return "\\frac{" + a + "}{" + b + "}"
    except ValueError:  # FIX: lm-eval catches only AssertionError, so "x/2" aborted the normalisation
        pass
    return s


def strip_string(s):
    """Hendrycks' MATH normalisation (the original code: also removes a bare '%')."""
    for a in ("\n", "\\!"):
        s = s.replace(a, "")
    s = s.replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac")
    for a in ("\\left", "\\right", "^{\\circ}", "^\\circ", "\\$"):
        s = s.replace(a, "")
    if "\\text{ " in s:  # units on the right: "5 \text{ cm}"
        parts = s.split("\\text{ ")
        if len(parts) != 2:  # the reference asserts; the caller then compares raw strings
            raise ValueError("more than one \\text{ ")
        s = parts[0]
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:  # "k = 4" -> "4"
        s = s.split("=")[1]
    parts = s.split("\\sqrt")  # \sqrt3 -> \sqrt{3}; IndexError on a trailing "\sqrt", as the reference
    s = parts[0] + "".join("\\sqrt" + (p if p[0] == "{" else "{" + p[0] + "}" + p[1:]) for p in parts[1:])
    s = _fix_fracs(s.replace(" ", ""))
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def hendrycks_equiv(a, b):
    """strip_string(a) == strip_string(b); if normalising raises, raw a == b (as the reference)."""
    try:
        return strip_string(a) == strip_string(b)
    except Exception:  # noqa: BLE001
        return a == b


def math_candidates(text):
    """OLMES "flex" answers of a response, normalised: the Minerva line and the last box; if neither,
    the last $...$; if none, the whole text."""
    out = []
    m = get_unnormalized_answer(text)
    if m != INVALID:
        out.append(normalize_final_answer(m))
    box = remove_boxed(last_boxed_only_string(text))
    if box is not None:
        out.append(normalize_final_answer(box))
    if not out:
        b = text.rfind("$")
        a = text.rfind("$", 0, b) if b > 0 else -1
        if a >= 0:
            out.append(normalize_final_answer(text[a + 1:b]))
    return out or [normalize_final_answer(text)]


def math_gold(ground_truth):
    """Normalised MATH answer from a full solution (its last box) or from an answer string."""
    gt = str(ground_truth)
    if "\\boxed" in gt or "\\fbox" in gt:
        gt = remove_boxed(last_boxed_only_string(gt))
        if gt is None:
            raise ValueError(f"math: ground truth's last box is unbalanced: {str(ground_truth)[-80:]!r}")
    return normalize_final_answer(gt)


def _math(response, gold):
    cands = math_candidates(response)
    if any(hendrycks_equiv(c, gold) for c in cands):
        return 1.0
    return float(sympy_equiv(cands, gold))


def math(response, ground_truth):
    """1.0 if any flex candidate of `response` equals the ground truth under Hendrycks normalisation or
    sympy (Minerva-normalised strings on both sides, as OLMES `exact_match_flex`), else 0.0."""
    return _guarded("math", _math, response, math_gold(ground_truth))


# --------------------------------------------------------------------------------------------------
# MATH: symbolic equivalence, simplify(a - b) == 0 as the reference's is_equiv
#
# The reference parses with sympy's parse_latex, whose ANTLR grammar needs antlr4-python3-runtime 4.11
# exactly (any other version raises, so the check never fires). We parse answers with the small
# recursive-descent parser below, written to behave like that grammar: letters are symbols (e, i and
# \pi too), "2x" and "x y" multiply, \frac12 is 1/2, "1,000" is 1000, a relation ("x<1") equals nothing,
# and parsing stops at the first token that cannot continue ("2,3" parses as 2, "x)" as x), but fails
# on a character the grammar does not know (%, $, &) met on the way. Checked against parse_latex +
# simplify: the same verdict on 9,030 of 9,037 pairs built from MATH gold answers (each against
# itself, another gold, and with junk appended); of the 7 others, 4 were "9a.m."-style (a '.' after
# a letter, since fixed), 2 reference timeouts and 1 a lexer error far ahead ("-4,4\%"). Numbers were
# then made to follow the grammar's digit-by-digit `number` rule ("10\,000", "01"): 4,500 pairs from
# 250 golds and 18 rewrites (thin spaces, spaces and \! between digits among them) all agree, and the
# tests compare our parser with parse_latex itself (antlr4-python3-runtime 4.11 is a test dependency).
# Number-only answers are compared exactly in-process; the rest go to sympy in a worker process under
# a wall-clock timeout.

_FUNCS = {"sin", "cos", "tan", "csc", "sec", "cot", "arcsin", "arccos", "arctan", "arccsc", "arcsec",
          "arccot", "sinh", "cosh", "tanh", "arsinh", "arcosh", "artanh", "log", "ln", "lg", "exp"}
_INVERTIBLE = {"sin", "cos", "tan", "csc", "sec", "cot", "sinh", "cosh", "tanh"}  # \sin^{-1} x is asin(x)
_RELATIONS = {"=", "<", ">", "le", "leq", "leqq", "leqslant", "ge", "geq", "geqq", "geqslant", "neq"}
_PRODUCTS = {"*": "*", "cdot": "*", "times": "*", "/": "/", ":": "/", "div": "/"}
_SKIPPED = {"left", "right", "quad", "qquad", "thinspace", "medspace", "thickspace", "negthinspace",
            "negmedspace", "negthickspace", "vrule", "vcenter", "vbox", "vskip", "vspace", "hfil"}
# commands that are tokens of their own in the grammar (never a plain symbol like \alpha)
# (not \cfrac: parse_latex reads it as a symbol, so the gold "\cfrac{25}{16}" is cfrac*25*16 there)
_KEYWORDS = _FUNCS | _RELATIONS | {"cdot", "times", "div", "frac", "dfrac", "tfrac", "binom",
                                   "dbinom", "tbinom", "sqrt", "overline", "mathit", "lfloor", "rfloor",
                                   "lceil", "rceil", "int", "sum", "prod", "lim", "to", "rightarrow",
                                   "Rightarrow", "longrightarrow", "Longrightarrow", "langle", "rangle"}
_SKIPPED_SYMBOLS = ("\\,", "\\:", "\\;", "\\!", "\\*", "\\-", "\\.", "\\/", '\\"', "\\(", "\\=")
# what the grammar's lexer skips, as a regex: inside a number too, since its `number` is a parser rule over
# one-digit tokens (DIGIT+ (',' DIGIT DIGIT DIGIT)* ('.' DIGIT+)?): "1\,000" is 1000 and "2 3" is 23
_SEP = (r"(?:\s|" + "|".join(re.escape(x) for x in _SKIPPED_SYMBOLS) + r"|\\(?:"
        + "|".join(sorted(_SKIPPED, key=len, reverse=True)) + r")(?![a-zA-Z]))*")
# a decimal part takes no further digit that a '.' or a thousands group follows, as the grammar's adaptive
# prediction decides: "1.5 2.5" and "1.52,000" are products, "3.14." is 3.1
_TEX_NUMBER = (rf"\d(?:{_SEP}\d)*(?:{_SEP},{_SEP}\d{_SEP}\d{_SEP}\d)*"
               rf"(?:{_SEP}\.{_SEP}\d(?:{_SEP}\d(?!{_SEP}(?:\.|,{_SEP}\d{_SEP}\d{_SEP}\d)))*)?")
_DOT_NEXT = re.compile(_SEP + r"\.")  # a '.' after a number, separators skipped
_TEX_TOKEN = re.compile(rf"\\[a-zA-Z]+|\\.|d(?:[a-zA-Z]|\\[a-zA-Z]+)|{_TEX_NUMBER}|.", re.S | re.ASCII)


class _NoParse(Exception):
    pass


class _TexParser:
    """PEG parser over a LaTeX answer; methods return list-based ASTs (JSON-able for the worker)."""

    def __init__(self, s):
        self.s, self.pos, self.memo = s, 0, {}

    def tok(self):
        """(kind, text, start, end) of the token at self.pos; kinds: num sym cmd op eof."""
        if self.pos not in self.memo:
            i = self.pos
            while True:
                m = _TEX_TOKEN.match(self.s, i)
                if m is None:
                    t = ("eof", "", i, i)
                    break
                x = m.group()
                if x.isspace() or x[1:] in _SKIPPED or x in _SKIPPED_SYMBOLS:
                    i = m.end()
                    continue
                kind = ("num" if x[0] in "0123456789" else
                        "sym" if x[0].isalpha() else "cmd" if x[0] == "\\" and x[1:].isalpha() else "op")
                if kind == "op" and x not in "+-*/:^_!|()[]{},'=<>." and x not in ("\\{", "\\}"):
                    raise ValueError(f"unknown character {x!r}")  # the reference's lexer error
                if kind == "num":
                    if "." not in x and _DOT_NEXT.match(self.s, i + len(x)):
                        raise ValueError("a number ending in '.'")  # so does "2." (but "a." parses as a)
                    x = "".join(c for c in x if c in "0123456789.")
                    if re.fullmatch(r"0+[1-9]\d*", x):  # sympy.Number("01") is Python's syntax error
                        raise ValueError(f"a number with a leading zero: {x}")
                t = (kind, x, i, m.end())
                break
            self.memo[self.pos] = t
        return self.memo[self.pos]

    def take(self, *texts):
        t = self.tok()
        if t[1] not in texts or t[0] in ("num", "eof"):
            raise _NoParse
        self.pos = t[3]
        return t[1]

    def attempt(self, fn, *args):
        save = self.pos
        try:
            return fn(*args)
        except _NoParse:
            self.pos = save
            return None

    def loop(self, x, ops, operand):
        # left-associative "x (op operand)*"; an operator whose operand fails is left unconsumed
        while self.tok()[1] in ops and self.tok()[0] in ("op", "cmd"):
            save, op = self.pos, self.tok()[1]
            self.pos = self.tok()[3]
            y = self.attempt(operand)
            if y is None:
                self.pos = save
                break
            x = [ops[op], x, y] if isinstance(ops, dict) else ["rel"]
        return x

    def relation(self):
        return self.loop(self.expr(), {"=", "<", ">"} | {"\\" + r for r in _RELATIONS}, self.expr)

    def expr(self):
        return self.loop(self.mul(), {"+": "+", "-": "-"}, self.mul)

    def mul(self, nofunc=False):
        # nofunc: a function's argument without parentheses (the grammar's mp_nofunc), in which only the
        # first factor of an implicit product may be a function: "\sin x\cos x" is sin(x) cos(x)
        return self.loop(self.unary(nofunc), {("\\" + k if k.isalpha() else k): v for k, v in _PRODUCTS.items()},
                         lambda: self.unary(nofunc))

    def unary(self, nofunc=False):
        t = self.tok()
        if t[0] == "op" and t[1] in ("+", "-"):
            self.pos = t[3]
            x = self.unary(nofunc)
            return x if t[1] == "+" else ["neg", x]
        factors = [self.postfix()]
        while (y := self.attempt(self.postfix, nofunc)) is not None:  # implicit product: "2x", "x(1+x)"
            factors.append(y)
        # as parse_latex (convert_postfix_list): a lone x between two factors without symbols is a times
        # sign, so "2x3" is 6 and "4x10^5" is 400000
        x = factors[0]
        for i in range(1, len(factors)):
            if not (factors[i] == ["sym", "x"] and i < len(factors) - 1
                    and not _has_symbol(factors[i - 1]) and not _has_symbol(factors[i + 1])):
                x = ["*", x, factors[i]]
        return x

    def postfix(self, nofunc=False):
        x = self.power(nofunc)
        while self.tok()[:2] == ("op", "!"):
            self.pos = self.tok()[3]
            x = ["!", x]
        return x

    def power(self, nofunc=False):
        x = self.comp(nofunc)
        while self.tok()[:2] == ("op", "^"):
            save = self.pos
            self.pos = self.tok()[3]
            e = self.attempt(self.group, "{", "}") or self.attempt(self.atom)
            if e is None:
                self.pos = save  # "2^-1" parses as 2, like the reference
                break
            x = ["^", x, e]
        return x

    def comp(self, nofunc=False):
        for alt in (self.group, self.bars, self.atom) if nofunc else (self.group, self.bars, self.func, self.atom):
            x = self.attempt(alt)
            if x is not None:
                return x
        raise _NoParse

    def group(self, *pair):
        pairs = [pair] if pair else [("(", ")"), ("[", "]"), ("{", "}"), ("\\{", "\\}")]
        for a, b in pairs:
            save = self.pos
            try:
                self.take(a)
                x = self.expr()
                self.take(b)
                return x
            except _NoParse:
                self.pos = save
        raise _NoParse

    def bars(self):
        t = self.take("|", "\\lfloor", "\\lceil")
        x = self.expr()
        self.take({"|": "|", "\\lfloor": "\\rfloor", "\\lceil": "\\rceil"}[t])
        return [{"|": "abs", "\\lfloor": "floor", "\\lceil": "ceil"}[t], x]

    def script(self, mark, func=False, greedy=True):
        # "_x" / "^{...}": an atom or a braced expression after `mark`; -> (script, could it leave a digit)
        self.take(mark)
        t = self.tok()
        if func and t[0] == "num" and t[1].isdigit() and len(t[1]) > 1:
            if not greedy:  # \log_28: base 2 of 8
                self.pos = t[3] - 1
                return ["num", t[1][:-1]], True
            return self.atom(), True
        return self.attempt(self.group, "{", "}") or self.atom(), False

    def func(self):
        t = self.tok()
        name = t[1][1:]
        if t[0] == "cmd" and name in _FUNCS:  # \sin x, \log_2(8), \sin^2 x
            # A number after _ or ^ keeps all its digits if an argument still follows ("\log_23+1" is
            # log base 23 of +1), else leaves its last digit as the argument ("\log_28"): the grammar's
            # greedy DIGIT+ loop, which exits only where continuing cannot parse. A base that leaves its
            # last digit has no ^ after it: three tries at most, and one unless a number can split.
            splits = None  # (base, sup) of the first try: a number that could leave its last digit?
            for greedy_base, greedy_sup in ((True, True), (True, False), (False, False)):
                if splits and not splits[1 if greedy_base else 0]:
                    continue  # this try would parse as the first did
                self.pos = t[3]
                base, split_base = self.attempt(self.script, "_", True, greedy_base) or (None, False)
                sup, split_sup = self.attempt(self.script, "^", True, greedy_sup) or (None, False)
                splits = splits or (split_base, split_sup)
                arg = self.attempt(self.group, "(", ")") or self.attempt(self.mul, True)
                if arg is not None:
                    break
            else:
                raise _NoParse
            if name in ("log", "ln", "lg") and (base or name == "lg"):  # \ln_2 has a base too; \lg's is 10
                x = ["log", arg, base or ["num", "10"]]
            elif name in _INVERTIBLE and sup == ["neg", ["num", "1"]]:
                return ["fn", "a" + name, arg]  # as parse_latex: \sin^{-1} x is asin(x), not 1/sin(x)
            else:
                x = ["fn", name, arg]
            return ["^", x, sup] if sup else x
        if t[0] == "cmd" and name == "sqrt":
            self.pos = t[3]
            n = self.attempt(self.group, "[", "]")
            x = self.group("{", "}")
            return ["root", x, n] if n else ["sqrt", x]
        if t[0] == "cmd" and name == "overline":
            self.pos = t[3]
            return ["conj", self.group("{", "}")]
        if t[0] == "sym" or (t[0] == "cmd" and name not in _KEYWORDS):  # f(x): an undefined function
            sym = self.atom()
            self.take("(")
            args = [self.expr()]
            while self.tok()[:2] == ("op", ","):
                self.pos = self.tok()[3]
                args.append(self.expr())
            self.take(")")
            return ["call", sym[1], args]
        raise _NoParse

    def atom(self):
        t = self.tok()
        name = t[1][1:]
        if t[0] == "num":
            self.pos = t[3]
            return ["num", t[1]]
        if t[0] == "cmd" and name in ("frac", "dfrac", "tfrac", "binom", "dbinom", "tbinom"):
            self.pos = t[3]
            a, b = self.frac_arg(), self.frac_arg()
            return ["/", a, b] if "frac" in name else ["binom", a, b]
        if t[0] == "cmd" and name == "mathit":
            self.pos = t[3]
            self.take("{")
            letters = ""
            while self.tok()[0] == "sym" and len(self.tok()[1]) == 1:
                letters += self.tok()[1]
                self.pos = self.tok()[3]
            self.take("}")
            return ["sym", letters]
        if t[0] == "sym" or (t[0] == "cmd" and name not in _KEYWORDS):
            self.pos = t[3]
            if name == "infty":
                return ["oo"]
            start = self.pos
            sub = self.attempt(self.script, "_")  # x_1, x_{10}: part of the symbol's name
            text = t[1].lstrip("\\")
            if sub is not None:
                text += "_{" + self.s[start:self.pos].lstrip("_ ").removeprefix("{").removesuffix("}") + "}"
            return ["sym", text]
        raise _NoParse

    def frac_arg(self):
        t = self.tok()
        if t[0] == "num" and self.s[t[2]].isdigit():  # \frac12: one digit each
            self.pos = t[2] + 1
            return ["num", self.s[t[2]]]
        return self.group("{", "}")


def _has_symbol(t):
    """Does an AST hold a symbol? (As sympy's atoms(Symbol): an undefined function's name is none.)"""
    if t[0] == "sym":
        return True
    if t[0] == "call":
        return any(_has_symbol(a) for a in t[2])
    return any(isinstance(a, list) and _has_symbol(a) for a in t[1:])


def latex_ast(s):
    """AST of a normalised LaTeX answer, or None if it does not parse or is a relation."""
    if len(s) > 2000:
        return None  # whole-text candidates of long responses: never an answer
    try:
        x = _TexParser(s).relation()
    except (_NoParse, ValueError, RecursionError):
        return None
    return None if x == ["rel"] else x


def _exact(t):
    """Exact rational value of a number-only AST (Fraction), else None."""
    op = t[0]
    if op == "num":
        return fractions.Fraction(t[1])
    if op == "neg":
        v = _exact(t[1])
        return None if v is None else -v
    if op in ("+", "-", "*", "/", "^"):
        a, b = _exact(t[1]), _exact(t[2])
        if a is None or b is None:
            return None
        if op == "/":
            return a / b if b else None
        if op == "^":  # only small integer powers: 10^{100} yes, 2^{2^{100}} is left to sympy
            if b.denominator != 1 or abs(b) > 1000 or (a == 0 and b < 0):
                return None
            if max(abs(a.numerator), a.denominator).bit_length() * abs(b) > 20000:
                return None
            return a ** int(b)
        return a + b if op == "+" else a - b if op == "-" else a * b
    return None


def _decimals(t):
    """The decimal literals of an AST."""
    if t and t[0] == "num":
        return [t[1]] if "." in t[1] else []
    return [d for x in t if isinstance(x, list) for d in _decimals(x)]


def _exact_equal(a, b):
    """True/False when both ASTs are numbers sympy would compare the same way, else None (ask sympy).
    A decimal literal of up to 15 significant digits is a sympy Float of 53 bits, so it equals a rational
    iff their floats are equal. A longer one keeps all its digits (Float("0.6666666666666666") has 16, and
    is not 2/3), so that comparison is left to sympy."""
    va, vb = _exact(a), _exact(b)
    if va is None or vb is None:
        return None
    if any(len(decimal.Decimal(d).as_tuple().digits) > 15 for d in _decimals(a) + _decimals(b)):
        return None
    lone = lambda t: t[0] == "num" or (t[0] == "neg" and t[1][0] == "num")  # noqa: E731
    dec_a, dec_b = "." in json.dumps(a), "." in json.dumps(b)
    if not (dec_a or dec_b):
        return va == vb
    if (lone(a) or not dec_a) and (lone(b) or not dec_b):
        try:
            return float(va) == float(vb)
        except OverflowError:
            return None
    return None


def sympy_equiv(candidates, gold, timeout=None):
    """True if some candidate is symbolically equal to gold (simplify(c - gold) == 0)."""
    g = latex_ast(gold)
    if g is None:
        return False
    pairs = []
    for c in candidates:
        a = latex_ast(c)
        if a is None:
            continue
        same = _exact_equal(a, g)
        if same:
            return True
        if same is None:
            pairs.append([a, g])
    for pair in pairs:  # each with its own deadline, as the reference gives each is_equiv call its own
        try:
            if _sympy_worker_call(pair, SYMPY_TIMEOUT if timeout is None else timeout):
                return True
        except TimeoutError as e:  # this candidate counts as not equal (and is counted); the next is tried
            _failed("math", e)
    return False


def _to_sympy(t, S):
    """AST -> unevaluated sympy expression, built the way parse_latex builds it."""
    op, args = t[0], t[1:]
    if op == "num":
        return S.Number(args[0])
    if op == "sym":
        return S.Symbol(args[0])
    if op == "oo":
        return S.oo
    if op == "call":
        return S.Function(args[0])(*[_to_sympy(a, S) for a in args[1]])
    if op == "fn":
        name = {"ln": "log", "arsinh": "asinh", "arcosh": "acosh", "artanh": "atanh"}.get(args[0], args[0])
        return getattr(S, re.sub(r"^arc", "a", name))(_to_sympy(args[1], S), evaluate=False)
    x = [_to_sympy(a, S) if a is not None else None for a in args]
    if op == "log":
        return S.log(x[0], x[1], evaluate=False)
    if op in ("+", "-"):
        return S.Add(x[0], x[1] if op == "+" else S.Mul(-1, x[1], evaluate=False), evaluate=False)
    if op in ("*", "/"):
        return S.Mul(x[0], x[1] if op == "*" else S.Pow(x[1], -1, evaluate=False), evaluate=False)
    if op == "^":
        return S.Pow(x[0], x[1], evaluate=False)
    if op == "neg":
        return S.Mul(-1, x[0], evaluate=False)
    if op == "root":
        return S.root(x[0], x[1], evaluate=False)
    f = {"!": S.factorial, "abs": S.Abs, "floor": S.floor, "ceil": S.ceiling, "conj": S.conjugate,
         "sqrt": S.sqrt, "binom": S.binomial}[op]
    return f(*x, evaluate=False)


def _sympy_worker():
    """Worker loop (run as `python verifiers.py --sympy-worker`): one JSON pair of ASTs per line in, "1"
    (equal) or "0" out."""
    try:  # a runaway power (2^{10^{10}}) raises MemoryError instead of eating the machine's memory
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    except (ImportError, ValueError, OSError):
        pass
    import sympy as S
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        a, b = json.loads(line)
        try:
            ok = S.simplify(_to_sympy(a, S) - _to_sympy(b, S)) == 0
        except Exception:  # noqa: BLE001 as the reference: a failed comparison is "not equal"
            ok = False
        sys.stdout.write("1\n" if ok else "0\n")
        sys.stdout.flush()


# Idle workers, shared by threads. A worker that overruns its deadline is killed, never reused; a
# forked child starts its own (the parent's pipes are not its to use).
_IDLE, _IDLE_LOCK, _IDLE_PID = [], threading.Lock(), [os.getpid()]


def _readline(p, deadline):
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([p.stdout], [], [], left)[0]:
            return None  # select() is a wall-clock wait that works in any thread
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk:
            return None  # the worker died
        buf += chunk
    return buf.strip()


def _sympy_worker_call(pair, timeout):
    with _IDLE_LOCK:
        if _IDLE_PID[0] != os.getpid():
            _IDLE.clear()
            _IDLE_PID[0] = os.getpid()
        p = _IDLE.pop() if _IDLE else None
    if p is not None and p.poll() is not None:
        p = None  # it died (killed from outside): start another
    if p is None:  # start-up (importing sympy, ~1 s) is not charged to the call's timeout
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--sympy-worker"], bufsize=0,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if _readline(p, time.monotonic() + 120) != b"ready":
            p.kill()
            raise RuntimeError("the sympy worker process did not start")
    try:
        p.stdin.write(json.dumps(pair).encode() + b"\n")
        out = _readline(p, time.monotonic() + timeout)
    except OSError:
        out = None
    if out is None:
        p.kill()
        p.wait()
        raise TimeoutError(f"sympy took longer than {timeout} s")
    with _IDLE_LOCK:
        _IDLE.append(p)
    return out == b"1"


@atexit.register
def _stop_workers():
    if _IDLE_PID[0] == os.getpid():
        for p in _IDLE:
            p.kill()


# --------------------------------------------------------------------------------------------------
# IFEval (checks in verifiers_ifeval.py) and routing

_INT_KWARGS = {"frequency", "let_frequency", "num_sentences", "num_paragraphs", "num_words", "nth_paragraph",
               "num_placeholders", "num_bullets", "num_highlights", "num_sections", "capital_frequency"}


def ifeval_kwargs(instruction_id, kwargs):
    """kwargs with None values dropped, validated; an error names what is wrong (the reference would
    silently draw a random value for a missing or negative number)."""
    if not isinstance(instruction_id, str) or instruction_id not in vif.IFEVAL:
        raise ValueError(f"ifeval: unknown instruction id {instruction_id!r}")
    if not isinstance(kwargs, (dict, type(None))):
        raise ValueError(f"ifeval: {instruction_id} has kwargs {kwargs!r}, not a JSON object")
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    need = vif.IFEVAL[instruction_id][1]
    if set(kw) != set(need):
        raise ValueError(f"ifeval: {instruction_id} takes kwargs {sorted(need)}, got {sorted(kw)}")
    for k, v in kw.items():
        bad = ((k in _INT_KWARGS and (not isinstance(v, int) or isinstance(v, bool) or v < 0))
               or (k.endswith("relation") and v not in vif.RELATIONS)
               or (k == "letter" and len(str(v).strip()) != 1)
               or (k == "nth_paragraph" and not (isinstance(kw["num_paragraphs"], int) and
                                                 1 <= v <= kw["num_paragraphs"])))
        if bad:
            raise ValueError(f"ifeval: {instruction_id} has an invalid {k}={v!r}")
    return kw


def loose_variants(r):
    """IFEval's loose mode: the response, without its first and/or last line, each also without '*'."""
    lines = r.split("\n")
    v = [r, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return v + [x.replace("*", "") for x in v]


def _follows(response, check, kw, loose):
    for v in loose_variants(response) if loose else [response]:
        try:
            if v.strip() and check(v, **kw):  # an empty response follows nothing
                return True
        except Exception as e:  # noqa: BLE001
            _failed("ifeval", e)
    return False


def ifeval_checks(instruction_id_list, kwargs):
    """[(check function, its kwargs)] of an IFEval label; a bad label raises ValueError naming what is wrong."""
    kwargs = kwargs if kwargs is not None else [{}] * len(instruction_id_list)
    if not isinstance(kwargs, list) or len(kwargs) != len(instruction_id_list):
        raise ValueError("ifeval: kwargs must be a list as long as instruction_id_list")
    kw = [ifeval_kwargs(i, k) for i, k in zip(instruction_id_list, kwargs)]  # raises on an unknown id first
    return [(vif.IFEVAL[i][0], k) for i, k in zip(instruction_id_list, kw)]


def ifeval(response, instruction_id_list, kwargs, loose=False):
    """One bool per instruction: does `response` follow it (strict, or loose: any of 8 variants)?"""
    checks = ifeval_checks(instruction_id_list, kwargs)
    return [bool(_guarded("ifeval", _follows, response, c, kw, loose, default=False)) for c, kw in checks]


def ifeval_label(ground_truth):
    """Parse an IFEval ground truth: a row {"instruction_id_list", "kwargs"} (dict or JSON), open-instruct's
    str([{"instruction_id": [...], "kwargs": [...]}]), or Tülu 3's {"func_name": ..., **args}.
    Returns ("ifeval", ids, kwargs) or ("tulu3", func_name, args)."""
    gt = ground_truth
    for _ in range(3):  # peel JSON / Python-literal strings and one-element lists
        if isinstance(gt, str):
            try:
                gt = json.loads(gt)
            except json.JSONDecodeError:
                try:
                    gt = ast.literal_eval(gt)
                except (ValueError, SyntaxError):
                    raise ValueError(f"ifeval: cannot parse ground truth {ground_truth[:80]!r}") from None
        if isinstance(gt, list) and len(gt) == 1:
            gt = gt[0]
    if isinstance(gt, dict) and "func_name" in gt:
        args = {k: v for k, v in gt.items() if k != "func_name" and v is not None}
        return "tulu3", gt["func_name"], args
    if isinstance(gt, dict):
        ids = gt.get("instruction_id_list", gt.get("instruction_id"))
        if isinstance(ids, list) and ids:
            return "ifeval", ids, gt.get("kwargs")
    raise ValueError(f"ifeval: ground truth has no instruction ids: {str(ground_truth)[:80]!r}")


def scorer(dataset, ground_truth):
    """-> score(response), in [0, 1], against `ground_truth` for `dataset`. The ground truth is read here,
    once: an unknown dataset or a label that cannot be read (no final number, an unbalanced box, an unknown
    instruction) raises ValueError in one sentence, which is how data.rlvr_row rejects a bad row when it is
    loaded rather than mid-training."""
    name = str(dataset).lower()
    if name in ("gsm8k", "tiny_arith"):
        gold = gsm8k_gold(ground_truth)
        return lambda response: _guarded("gsm8k", _gsm8k, response, gold)
    if name == "math":
        gold = math_gold(ground_truth)
        return lambda response: _guarded("math", _math, response, gold)
    if name in ("ifeval", "tiny_if"):
        kind, a, b = ifeval_label(ground_truth)
        if kind == "tulu3":
            fn, args = vif.tulu3_check(a, b)
            return lambda response: float(bool(_guarded("ifeval", lambda r: fn(r.strip(), **args), response)))
        checks = ifeval_checks(a, b)
        return lambda response: sum(bool(_guarded("ifeval", _follows, response, c, kw, False, default=False))
                                    for c, kw in checks) / len(checks)
    raise ValueError(f"verify: unknown dataset {dataset!r}; known: gsm8k, math, ifeval, tiny_arith, tiny_if")


def verify(dataset, response, ground_truth):
    """Score in [0, 1] of `response` against `ground_truth` for `dataset` (RL rewards 10 x this, as
    Tülu 3). gsm8k/tiny_arith: last number; math: flex; ifeval/tiny_if: the fraction of instructions
    followed (strict), or Tülu 3's binary function check for a `func_name` label."""
    return scorer(dataset, ground_truth)(response)


if __name__ == "__main__" and sys.argv[1:] == ["--sympy-worker"]:
    _sympy_worker()
