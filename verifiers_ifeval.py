"""
IFEval's 25 instruction checks (Zhou et al. 2023, google-research/instruction_following_eval) and the
Tülu 3 RLVR `func_name` constraints, as pure functions. verifiers.py validates kwargs, builds the loose
variants and guards every call; this file only says what "followed" means.

    python -m pytest tests/test_verifiers.py -k ifeval -v

The reference counts sentences with NLTK's punkt model and words for capital_word_frequency with
nltk.word_tokenize. NLTK downloads its models at run time, so both are re-implemented here (punkt's
rules with its English abbreviation list; the Treebank splitting rules that change a token's
isupper()); split_sentences says how closely they agree.
"""
import ast
import collections
import functools
import json
import re

import langdetect

# langdetect is random unless seeded; the reference never seeds it, so its verdicts on short or mixed
# text could change between runs. Seeding makes ours reproducible.
langdetect.DetectorFactory.seed = 0

# --------------------------------------------------------------------------------------------------
# sentence splitting: punkt (Kiss & Strunk 2006) as NLTK runs it with its English model

# punkt's English model: abbreviations (a '.' after them is not a sentence end), words that start
# sentences, and (word before '.', word after) collocations that never straddle a sentence break.
ABBREV = set("""a.a a.c a.d a.g a.h a.m a.m.e a.s a.t adm ala ariz aug ave b.f b.v bros c c.i.t c.o.m.b
c.v calif chg cie co col colo conn corp cos ct d d.c d.h d.w dec dr e e.f e.h e.l e.m f f.g f.j feb fla
fri ft g g.d g.f g.k ga gen h h.c h.f h.m i.m.s ill inc j.b j.c j.j j.k j.p j.r jan jr k kan ky l l.a l.f
l.p lt ltd m m.b.a m.d.c m.j maj messrs mg mich minn mr mrs ms n n.c n.d n.h n.j n.m n.v n.y nev nov
oct ok okla ore p p.a.m p.m pa ph.d prof r r.a r.h r.i r.j r.k r.t rep reps s s.a s.a.y s.c s.g s.p.a
s.s sen sep sept sr st sw t t.j tenn tues u.k u.n u.s u.s.a u.s.s.r v va vs vt w w.c w.r w.va w.w wash
wed wis yr""".split()) | {". . "}
STARTERS = set("""according although among both but despite even he however i if in indeed instead it
many meanwhile moreover most nevertheless nonetheless nor sales separately similarly since so some the
there these they this though thus under when while yet""".split())
COLLOC = {("##number##", w) for w in """abreast aes business cbot colgate commodities cooper corrections
credit dividend financing genentech henley insider international leisure letters notable pay-fone
pegasus pepper review rj wedgestone who zimmer""".split()} | {
    ("b", "edelman"), ("b", "levine"), ("b", "smith"), ("b", "stewart"), ("b", "wigton"),
    ("i", "magnin"), ("i", "toussie"), ("j", "aron"), ("j", "fialka"), ("j", "walter"), ("o", "ludcke")}

# What punkt's word statistics say about some common words, capitalised after a '.': it has seen all of
# them in lower case (so after an initial, "B. Then" is a break), and the second group never inside a
# sentence in upper case (so after an abbreviation, "p.m. Finally" is a break too). A sample of punkt's
# table (20k words), enough for the words that usually start a sentence.
SEEN_LOWER = set("""a actually after again all also although an and another answer are as at basically be because
before both but by can clearly could day did do each even every first five for four from good great had has
have he his how however if in is it its just less let many may maybe meanwhile might more most my next no
not now on once one only or other our perhaps second she should since some sure that the their then there
these they third this those three time to today total two until was we well what when where while who why
will with would year you""".split())
STARTS_AFTER_ABBREV = set("""accordingly adding altogether besides certainly combining course dividing does
either final finally furthermore given hence her here indeed instead likewise moreover neither note okay
otherwise overall please similarly so solving step still substituting subtracting thank thanks therefore
though thus tomorrow unless using were whereas which yes yesterday yet your""".split())
SEEN_LOWER |= STARTS_AFTER_ABBREV

# A '.', '?' or '!' is a candidate end when punctuation or whitespace + a token follows it.
_NONWORD = r"[)\";}\]*:@'({\[!?]"
_MULTI = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_CANDIDATE = re.compile(r"[.?!](?=(?P<after>" + _NONWORD + r"|\s+(?P<next>\S+)))")
# punkt's word tokenizer: a word runs until whitespace, punctuation, '...' or a word-final comma
_PUNKT_WORD = re.compile(
    _MULTI + r"|(?=[^(\"`{\[:;&#*@)}\]\-,])\S+?(?=\s|$|" + _NONWORD + "|" + _MULTI
    + r"|,(?=$|\s|" + _NONWORD + "|" + _MULTI + r"))|\S")
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.\-]*\.?$")
_REALIGN = re.compile(r"[\"')\]}]+?(?:\s+|(?=--)|$)", re.M)


def _type(tok):
    return _NUMBER.sub("##number##", tok.lower())  # numbers share one type


@functools.lru_cache(maxsize=65536)  # contexts repeat ("...", "Mr. Smith") within and across texts
def _punkt_break(context):
    """True if punkt puts a sentence break inside `context` (word before, the mark, what follows)."""
    toks = [t for line in context.split("\n") for t in _PUNKT_WORD.findall(line)]
    # first pass: '?', '!' and a '.' after a non-abbreviation end a sentence; '...' is undecided
    brk, abbr, ell = [], [], []
    for t in toks:
        b, a, e = t in (".", "?", "!"), False, False
        if not b and re.fullmatch(r"\.\.+", t):
            e = True
        elif not b and t.endswith(".") and not t.endswith(".."):
            low = t[:-1].lower()
            a = low in ABBREV or low.split("-")[-1] in ABBREV
            b = not a
        brk.append(b), abbr.append(a), ell.append(e)
    # second pass: a '.'-final token is reconsidered in the light of the next token
    for i in range(len(toks) - 1):
        t, n = toks[i], toks[i + 1]
        if t.endswith("."):
            typ, ntyp = _type(t), _type(n)
            typ = typ[:-1] if typ.endswith(".") and len(typ) > 1 else typ
            ntyp = ntyp[:-1] if brk[i + 1] and ntyp.endswith(".") and len(ntyp) > 1 else ntyp
            initial = re.fullmatch(r"[^\W\d]\.", t) is not None
            upper = n[:1].isupper()
            if (typ, ntyp) in COLLOC:
                brk[i] = False
            elif (abbr[i] or ell[i]) and not initial and upper and (ntyp in STARTERS
                                                                    or ntyp in STARTS_AFTER_ABBREV):
                brk[i] = True  # "p.m. The", "Wait... So"
            elif initial or typ == "##number##":
                # "1. the", "x. and", "J. Smith" are not breaks; "B. Then" and "1. First" stay breaks
                if n in ";:,.!?" or n[:1].islower() or (initial and upper and ntyp not in SEEN_LOWER):
                    brk[i] = False
        if brk[i]:
            return True
    return False


def split_sentences(text):
    """NLTK punkt (English) sentence split. Punkt's per-word statistics are shipped only for common
    words (SEEN_LOWER), so after an initial or abbreviation a rarer capitalised word may be split
    differently ("Movie B. Movie ..."). Measured against NLTK: the same count on 3,676 of 3,679 real
    texts (GSM8K questions and solutions, MATH-500 solutions, IFEval prompts)."""
    # Find candidate ends; each gets the word before it (punkt drops a candidate whose word overlaps the
    # next candidate's, so "?!" is decided once, at the '!').
    ends, prev, prev_start, prev_stop = [], None, 0, 0
    for m in _CANDIDATE.finditer(text):
        before = text[prev_stop:m.start()]
        ws = max(before.rfind(c) for c in " \t\n\r\f\v")
        start = prev_stop + ws + 1 if ws > 0 else prev_start
        if prev is not None and prev_stop <= start:
            ends.append((prev, text[prev_start:prev_stop] + prev.group() + prev.group("after")))
        prev, prev_start, prev_stop = m, start, m.start()
    if prev is not None:
        ends.append((prev, text[prev_start:prev_stop] + prev.group() + prev.group("after")))
    # Cut at the ends that punkt calls breaks; a sentence resumes at the next token.
    spans, last = [], 0
    for m, context in ends:
        if _punkt_break(context):
            spans.append((last, m.end()))
            last = m.start("next") if m.group("next") else m.end()
    spans.append((last, len(text.rstrip())))
    # Closing quotes/brackets at the start of a sentence belong to the previous one.
    out = []
    for i, (a, b) in enumerate(spans):
        if out:
            r = _REALIGN.match(text, a, b)
            if r:
                out[-1] = (out[-1][0], a + len(r.group().rstrip()))
                a = r.end()
        out.append((a, b))
    return [text[a:b] for a, b in out if text[a:b]]


# --------------------------------------------------------------------------------------------------
# capital words: nltk.word_tokenize splits that change whether a token is all-caps

# Treebank separates these from words: brackets, most punctuation, '--', '...', a ':' or ',' that is
# not inside a number, and clitics ('S, 'LL, N'T, ...) and contractions like CANNOT or GONNA.
_TB_SPLIT = re.compile(r"[;@#$%&?!\[\](){}<>\"*‘’“”]|--|\.\.+|[:,](?!\d)")
_TB_CLITIC = re.compile(r"(?i)(?<=[^' ])('s|'m|'d|'ll|'re|'ve|n't|')$")
_TB_CONTRACT = re.compile(r"(?i)^(can)(not)$|^(d)('ye)$|^(gim)(me)$|^(gon)(na)$|^(got)(ta)$"
                          r"|^(lem)(me)$|^(more)('n)$|^(wan)(na)$|^('t)(is)$|^('t)(was)$")


def capital_words(text):
    """Count nltk.word_tokenize tokens for which str.isupper() holds ("I" and "USA" count, "USA's"
    counts once, "DON'T" twice as DO + N'T). Periods do not change isupper(), so where Treebank splits
    them off does not matter."""
    n = 0
    for chunk in text.split():
        for piece in _TB_SPLIT.split(chunk):
            piece = piece.rstrip(".") or piece  # "CANNOT." at a sentence end is CAN NOT .
            m = _TB_CONTRACT.match(piece)
            parts = [p for p in m.groups() if p] if m else list(_TB_CLITIC.split(piece)[:2])
            n += sum(p.isupper() for p in parts)
    return n


# --------------------------------------------------------------------------------------------------
# the 25 IFEval instructions: check(response, **kwargs) -> bool, reference semantics

RELATIONS = {"less than": lambda a, b: a < b, "at least": lambda a, b: a >= b}


def _rel(count, relation, n):
    return RELATIONS[relation](count, n)


def _lang(text, want):
    # The reference counts text that langdetect cannot classify (no letters, ...) as followed.
    try:
        return langdetect.detect(text) == want
    except langdetect.LangDetectException:
        return True


def _paragraphs(resp, num_paragraphs):
    parts = re.split(r"\s?\*\*\*\s?", resp)
    k = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if 0 < i < len(parts) - 1:
                return False  # an empty paragraph between two dividers
            k -= 1
    return k == num_paragraphs


def _nth_first_word(resp, num_paragraphs, nth_paragraph, first_word):
    ps = re.split(r"\n\n", resp)
    count = sum(bool(p.strip()) for p in ps)
    # NOTE the reference counts non-empty paragraphs but indexes the raw list, empties included
    if nth_paragraph > count or not ps[nth_paragraph - 1].strip():
        return False
    word = ps[nth_paragraph - 1].strip().split()[0].strip().lstrip("'").lstrip('"')
    word = re.split(r"[.,?!'\"]", word)[0].lower()
    return count == num_paragraphs and word == first_word.lower()


def _postscript(resp, postscript_marker):
    # The reference's findall(r"\s*MARKER.*$", re.M) finds something iff MARKER occurs (the \s* and .*$
    # can match empty), so search for the marker alone: same verdict, no quadratic \s* scan.
    low, m = resp.lower(), postscript_marker.strip()
    pat = {"P.P.S": r"p\.\s?p\.\s?s", "P.S.": r"p\.\s?s\."}.get(m, m.lower())
    return re.search(pat, low, flags=re.M) is not None


def _bullets(resp, num_bullets):
    """len(findall(r"^\\s*\\*[^\\*].*$", re.M)) + len(findall(r"^\\s*-.*$", re.M)) == n, counted in
    one linear pass (the regexes backtrack quadratically over long runs of blank lines)."""
    def count(mark, needs_next):
        n, i, L = 0, 0, len(resp)
        while i < L:
            q = i
            while q < L and resp[q].isspace():  # ^\s* may run over several blank lines
                q += 1
            if q < L and resp[q] == mark and (not needs_next or (q + 1 < L and resp[q + 1] != "*")):
                n += 1
                # [^\*] may consume a newline, so a lone '*' line swallows the next line
                j = q + 2 if needs_next else q + 1
                e = resp.find("\n", j if j <= L else L)
                i = L if e < 0 else e
                if i < L and not (i > 0 and resp[i - 1] == "\n"):
                    i = i + 1  # the next match must start at a line start
            else:
                e = resp.find("\n", q)
                i = L if e < 0 else e + 1
        return n
    return count("*", True) + count("-", False) == num_bullets


def _highlights(resp, num_highlights):
    n = sum(bool(h.strip("*").strip()) for h in re.findall(r"\*[^\n*]*\*", resp))
    n += sum(bool(h[2:-2].strip()) for h in re.findall(r"\*\*[^\n*]*\*\*", resp))
    return n >= num_highlights


def _placeholders(resp, num_placeholders):
    """len(findall(r"\\[.*?\\]")) >= n, in one pass: a '[' with no ']' later on its line ends the
    line's matches (the lazy regex rescans the line once per '[')."""
    n, i = 0, 0
    while True:
        j = resp.find("[", i)
        if j < 0:
            return n >= num_placeholders
        eol = resp.find("\n", j)
        eol = len(resp) if eol < 0 else eol
        k = resp.find("]", j + 1, eol)
        n, i = (n + 1, k + 1) if k >= 0 else (n, eol)


def _title(resp):
    """Some match of <<[^\\n]+>> has non-empty text. Per line the greedy match runs from the first '<<'
    to the last '>>' at least one character later (later '<<' cannot do better)."""
    for line in resp.split("\n"):
        j, k = line.find("<<"), line.rfind(">>")
        if j >= 0 and k >= j + 3 and line[j:k + 2].lstrip("<").rstrip(">").strip():
            return True
    return False


def _json(resp):
    v = resp.strip()
    for p in ("```json", "```Json", "```JSON", "```"):  # a chain of removeprefix, as the reference
        v = v.removeprefix(p)
    v = v.removesuffix("```").strip()
    try:
        json.loads(v)
        return True
    except (ValueError, RecursionError):  # "[[[[...": RecursionError would crash the reference
        return False


def _two_responses(resp):
    parts = resp.split("******")
    valid = []
    for i, p in enumerate(parts):
        if not p.strip():
            if 0 < i < len(parts) - 1:
                return False
        else:
            valid.append(p)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


IFEVAL = {  # id -> (check, required kwargs)
    "keywords:existence": (lambda r, keywords: all(re.search(k, r, re.I) for k in keywords),
                           ("keywords",)),
    "keywords:frequency": (lambda r, keyword, frequency, relation:
                           _rel(len(re.findall(keyword.strip(), r, re.I)), relation, frequency),
                           ("keyword", "frequency", "relation")),
    "keywords:forbidden_words": (lambda r, forbidden_words:
                                 not any(re.search(r"\b" + w + r"\b", r, re.I) for w in forbidden_words),
                                 ("forbidden_words",)),
    # The reference replaces a letter outside a-z (data keys 1122 '#', 1129 '!') with a random one;
    # we count the given character, as Google's current code does.
    "keywords:letter_frequency": (lambda r, letter, let_frequency, let_relation:
                                  _rel(collections.Counter(r.lower())[letter.strip().lower()],
                                       let_relation, let_frequency),
                                  ("letter", "let_frequency", "let_relation")),
    "language:response_language": (lambda r, language: _lang(r, language), ("language",)),
    "length_constraints:number_sentences": (lambda r, num_sentences, relation:
                                            _rel(len(split_sentences(r)), relation, num_sentences),
                                            ("num_sentences", "relation")),
    "length_constraints:number_paragraphs": (_paragraphs, ("num_paragraphs",)),
    "length_constraints:number_words": (lambda r, num_words, relation:
                                        _rel(len(re.findall(r"\w+", r)), relation, num_words),
                                        ("num_words", "relation")),
    "length_constraints:nth_paragraph_first_word": (_nth_first_word,
                                                    ("num_paragraphs", "nth_paragraph", "first_word")),
    "detectable_content:number_placeholders": (_placeholders, ("num_placeholders",)),
    "detectable_content:postscript": (_postscript, ("postscript_marker",)),
    "detectable_format:number_bullet_lists": (_bullets, ("num_bullets",)),
    "detectable_format:constrained_response": (
        lambda r: any(o in r.strip() for o in ("My answer is yes.", "My answer is no.",
                                                "My answer is maybe.")), ()),
    "detectable_format:number_highlighted_sections": (_highlights, ("num_highlights",)),
    "detectable_format:multiple_sections": (lambda r, section_spliter, num_sections: len(re.split(
        r"\s?" + section_spliter.strip() + r"\s?\d+\s?", r)) - 1 >= num_sections,
                                            ("section_spliter", "num_sections")),
    "detectable_format:json_format": (_json, ()),
    "detectable_format:title": (_title, ()),
    "combination:two_responses": (_two_responses, ()),
    "combination:repeat_prompt": (lambda r, prompt_to_repeat:
                                  r.strip().lower().startswith(prompt_to_repeat.strip().lower()),
                                  ("prompt_to_repeat",)),
    "startend:end_checker": (lambda r, end_phrase:
                             r.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
                             ("end_phrase",)),
    "change_case:capital_word_frequency": (lambda r, capital_frequency, capital_relation:
                                           _rel(capital_words(r), capital_relation, capital_frequency),
                                           ("capital_frequency", "capital_relation")),
    "change_case:english_capital": (lambda r: r.isupper() and _lang(r, "en"), ()),
    "change_case:english_lowercase": (lambda r: r.islower() and _lang(r, "en"), ()),
    "punctuation:no_comma": (lambda r: "," not in r, ()),
    "startend:quotation": (lambda r: len(r.strip()) > 1 and r.strip()[0] == '"' == r.strip()[-1], ()),
}


# --------------------------------------------------------------------------------------------------
# Tülu 3's RLVR constraints (open-instruct if_functions.py at 9c2d44b, the `func_name` labels of
# allenai/RLVR-IFeval): simpler than IFEval and exact-count in places. Kept as they were, except for
# their bugs (marked FIX), so that Tülu 3's IF reward can be reproduced.

def _quantified(count, n, quantifier, tolerance):
    return {"at least": count >= n, "at most": count <= n, "around": abs(count - n) <= tolerance}.get(
        quantifier, False)


def _tulu3_paragraphs(text, N):
    text = "\n".join(line.strip() for line in text.splitlines()).strip()
    parts = text.split("* * *")
    return all(p.strip() for p in parts) and len(parts) == N


def _tulu3_title(text):
    for line in text.split("\n"):  # FIX: "<<>>" with nothing inside is not a title
        i = 0
        while (j := line.find("<<", i)) >= 0 and (k := line.find(">>", j + 2)) >= 0:
            if line[j + 2:k].strip():
                return True
            i = k + 2
    return False


def _tulu3_choice(text, options):
    if isinstance(options, str):  # a label may hold the options as the text of a Python tuple
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError):
            options = [options]
    return any(o in text for o in options)  # FIX: the original tested `text in option`


def _tulu3_two(text):
    if text.count("******") != 1:
        return False
    a, b = (x.strip() for x in text.split("******"))
    return bool(a) and bool(b) and a != b  # FIX: an empty half is not a response


def _tulu3_sections(text, N, section_splitter):
    parts = text.split(section_splitter)
    return len(parts[1:] if parts[0] == "" else parts) == N


def _tulu3_json(text):
    try:
        json.loads(text)
        return True
    except (ValueError, RecursionError):
        return False


def _tulu3_language(text, language):
    try:
        return langdetect.detect(text) == language
    except langdetect.LangDetectException:  # FIX: crashed the reference; no letters is not a language
        return False


TULU3 = {  # func_name -> (check(text, **args), args)
    "verify_keywords": (lambda t, keyword_list: all(k.lower() in t.lower() for k in keyword_list),
                        ("keyword_list",)),
    "verify_keyword_frequency": (lambda t, word, N: re.findall(r"\b\w+\b", t.lower()).count(word.lower()) == N,
                                 ("word", "N")),
    "validate_forbidden_words": (lambda t, forbidden_words: not any(w.lower() in t.lower()
                                                                    for w in forbidden_words),
                                 ("forbidden_words",)),
    "verify_letter_frequency": (lambda t, letter, N: len(letter) == 1 and t.count(letter) == N,
                                ("letter", "N")),
    "validate_response_language": (_tulu3_language, ("language",)),
    "verify_paragraph_count": (_tulu3_paragraphs, ("N",)),
    "validate_word_constraint": (lambda t, N, quantifier: _quantified(len(t.split()), N, quantifier,
                                                                      max(round(N * 0.1), 1)),
                                 ("N", "quantifier")),
    # FIX: the original split only after '.' and '?'
    "verify_sentence_constraint": (lambda t, N, quantifier: _quantified(
        len(re.split(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?|!)\s", t)), N, quantifier, 1),
                                   ("N", "quantifier")),
    "validate_paragraphs": (lambda t, N, first_word, i: len(t.split("\n\n")) == N and 1 <= i <= N
                            and t.split("\n\n")[i - 1].strip().startswith(first_word),
                            ("N", "first_word", "i")),
    "verify_postscript": (lambda t, postscript_marker: postscript_marker in t and len(
        t[t.find(postscript_marker):].strip()) > len(postscript_marker), ("postscript_marker",)),
    # FIX: returned (bool, list), a tuple, which is always truthy
    "validate_placeholders": (lambda t, N: IFEVAL["detectable_content:number_placeholders"][0](t, N), ("N",)),
    "verify_bullet_points": (lambda t, N: sum(x.strip().startswith(("*", "-")) for x in t.split("\n")) == N,
                             ("N",)),
    "validate_title": (_tulu3_title, ()),
    "validate_choice": (_tulu3_choice, ("options",)),
    "validate_highlighted_sections": (lambda t, N: len(re.findall(r"\*(.*?)\*", t)) >= N, ("N",)),
    "validate_sections": (_tulu3_sections, ("N", "section_splitter")),
    "validate_json_format": (_tulu3_json, ()),
    "validate_repeat_prompt": (lambda t, original_prompt: t.startswith(original_prompt), ("original_prompt",)),
    "validate_two_responses": (_tulu3_two, ()),
    # FIX: t == t.upper() also held for digits-only text
    "validate_uppercase": (lambda t: t.isupper(), ()),
    "validate_lowercase": (lambda t: t.islower(), ()),
    # FIX: "around" meant exactly N; now within max(round(0.1 N), 1) as the word constraint
    "validate_frequency_capital_words": (lambda t, N, quantifier: _quantified(
        len(re.findall(r"\b[A-Z]+\b", t)), N, quantifier, max(round(N * 0.1), 1)), ("N", "quantifier")),
    "validate_end": (lambda t, end_phrase: t.endswith(end_phrase), ("end_phrase",)),
    "validate_quotation": (lambda t: len(t) > 1 and t[0] == '"' == t[-1], ()),  # FIX: a lone '"'
    "validate_no_commas": (lambda t: "," not in t, ()),
}


def tulu3_check(func_name, args):
    """(check, args) for a Tülu 3 label; unknown names and missing or unknown args are errors."""
    if func_name not in TULU3:
        raise ValueError(f"ifeval: unknown Tülu 3 func_name {func_name!r}")
    fn, need = TULU3[func_name]
    if set(args) != set(need):
        raise ValueError(f"ifeval: {func_name} takes {sorted(need)}, got {sorted(args)}")
    for k in ("N", "i"):  # counts: a "3" would silently never match
        if k in args and (not isinstance(args[k], int) or isinstance(args[k], bool)):
            raise ValueError(f"ifeval: {func_name} needs a whole number {k}, got {args[k]!r}")
    return fn, args
