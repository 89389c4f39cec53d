"""
The embedded default: small built-in tasks whose answers a verifier checks, in the spirit of Tülu 3's
skill mix, generated deterministically from a seed so that `python sft.py` needs no download.

  tiny_arith  arithmetic word problems answered GSM8K-style ("... 7 + 5 = 12.\n#### 12"),
              scored by verifiers.gsm8k on the bare number
  tiny_if     a short text about a topic under one IFEval-style constraint (all lowercase, no commas,
              end with a phrase, wrap in quotes, ...), scored by verifiers.ifeval (strict) with the
              real IFEval instruction ids and kwargs

Like real SFT data, the demonstrations are imperfect: a share of the arithmetic demonstrations carry
a wrong result (`p_wrong`), and a share of the constrained prompts are answered without honouring the
constraint (`1 - p_follow`). That leaves room for the later stages, which never see a demonstration:
DPO learns from on-policy samples the verifier judged, RLVR from the verifier's reward alone.

    sft, prefs, rl, held_out = make_tasks(seed=0)   # lists of rows, see make_tasks
"""
import json
import random

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lea", "Max", "Nia",
         "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tess", "Uma", "Vic", "Wes", "Yara", "Zoe"]
THINGS = ["apples", "books", "coins", "pens", "shells", "stamps", "cards", "eggs", "marbles", "stickers",
          "cookies", "plums", "rocks", "toys", "beads"]
TOPICS = ["sea", "cat", "moon", "garden", "rain", "train", "city", "forest", "lake", "river", "sun", "dog",
          "song", "bridge", "sky", "farm", "bread", "storm", "house", "road"]
ADJS = ["calm", "bright", "quiet", "old", "green", "cold", "warm", "small", "big", "soft", "wild", "slow"]
VERBS = ["shines", "moves", "waits", "sings", "rests", "grows", "glows", "turns", "sleeps", "drifts"]
ENDINGS = ["Is there anything else I can help with?", "Let me know if you have additional questions.",
           "Any other questions?"]
KEYWORDS = ["light", "home", "time", "dream", "gold", "stone"]


def arith(rng, p_wrong):
    """-> (prompt, demonstration, answer). Three problem shapes, small numbers."""
    name, other, thing = rng.choice(NAMES), rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.choice(["add", "sub", "mul"])
    # small numbers: 262 distinct facts (81 sums, 117 differences, 64 products), so a tiny model can learn them
    if kind == "add":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        q = f"{name} has {a} {thing}. {name} finds {b} more {thing}. How many {thing} does {name} have now?"
        ans, work = a + b, f"{a} + {b}"
    elif kind == "sub":
        a = rng.randint(2, 18)
        b = rng.randint(1, min(9, a - 1))
        q = f"{name} has {a} {thing} and gives {b} of them to {other}. How many {thing} does {name} have left?"
        ans, work = a - b, f"{a} - {b}"
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{name} has {a} bags with {b} {thing} in each bag. How many {thing} does {name} have?"
        ans, work = a * b, f"{a} * {b}"
    # imperfect data. Both draws are made whatever p_wrong is, so that p_wrong changes no other problem
    off, wrong = rng.choice([-2, -1, 1, 2]), rng.random() < p_wrong
    shown = ans + off if wrong else ans
    return q, f"{work} = {shown}.\n#### {shown}", ans


def base_text(rng, topic):
    """A two-sentence text about `topic`, with a comma, capitals and a period."""
    a1, a2, v = rng.sample(ADJS, 2) + [rng.choice(VERBS)]
    return f"{topic.capitalize()} is {a1}, {a2} and {rng.choice(ADJS)}. It {v} all day."


def constrained(rng, p_follow):
    """-> (prompt, demonstration, instruction_id, kwargs). The demonstration honours the constraint
    with probability p_follow, else it is the plain text (which breaks the constraint)."""
    topic = f"the {rng.choice(ADJS)} {rng.choice(TOPICS)}"
    text = base_text(rng, topic)
    kind = rng.choice(["lower", "upper", "end", "comma", "quote", "keyword"])
    if kind == "lower":
        iid, kw, suffix, good = "change_case:english_lowercase", {}, \
            "Your entire response should be in English, and in all lowercase letters.", text.lower()
    elif kind == "upper":
        iid, kw, suffix, good = "change_case:english_capital", {}, \
            "Your entire response should be in English, and in all capital letters.", text.upper()
    elif kind == "end":
        end = rng.choice(ENDINGS)
        iid, kw, suffix, good = "startend:end_checker", {"end_phrase": end}, \
            f'Finish your response with this exact phrase "{end}".', f"{text} {end}"
    elif kind == "comma":
        iid, kw, suffix, good = "punctuation:no_comma", {}, \
            "Do not use any commas in your response.", text.replace(",", "")
    elif kind == "quote":
        iid, kw, suffix, good = "startend:quotation", {}, \
            "Wrap your entire response with double quotation marks.", f'"{text}"'
    else:
        word = rng.choice(KEYWORDS)
        iid, kw, suffix, good = "keywords:existence", {"keywords": [word]}, \
            f"Include the keyword {word} in your response.", f"{text} It is like {word}."
    ask = rng.choice(["Write two sentences about {}.", "Describe {} in two sentences.", "Tell me about {}."])
    prompt = f"{ask.format(topic)} {suffix}"
    return prompt, good if rng.random() < p_follow else text, iid, kw


def rlvr_row(prompt, dataset, ground_truth):
    """A prompt in open-instruct's RLVR format."""
    return {"messages": [{"role": "user", "content": prompt}], "ground_truth": ground_truth, "dataset": dataset}


def make_tasks(seed=0, n_sft=3000, n_prefs=1000, n_rl=1000, n_eval=600, p_wrong=0.25, p_follow=0.5):
    """Returns four disjoint lists (no prompt text is shared between them):
      sft       conversations {"messages": [user, assistant]} (imperfect demonstrations)
      prefs     RLVR rows: prompts the DPO stage samples from and judges (no demonstrations)
      rl        RLVR rows for the RL stage
      held_out  RLVR rows for evaluation, the same for every stage
    Half arithmetic, half constrained writing. The held-out set and the RL/preference prompts depend
    on `seed` only through separate streams, so the SFT knobs never change them."""
    seen, out = set(), []
    for split, n in [("held_out", n_eval), ("rl", n_rl), ("prefs", n_prefs), ("sft", n_sft)]:
        rng = random.Random(f"{seed}-{split}")
        rows = []
        while len(rows) < n:
            if len(rows) % 2 == 0:
                q, demo, ans = arith(rng, p_wrong)
                row = rlvr_row(q, "tiny_arith", str(ans))
            else:
                q, demo, iid, kw = constrained(rng, p_follow)
                row = rlvr_row(q, "tiny_if", json.dumps({"instruction_id_list": [iid], "kwargs": [kw]}))
            if q in seen:  # disjoint splits: held-out prompts are never trained on
                continue
            seen.add(q)
            if split == "sft":
                row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": demo}]}
            rows.append(row)
        out.append(rows)
    held_out, rl, prefs, sft = out
    return sft, prefs, rl, held_out


def make_base_checkpoint(path, sft_rows, seed=0, vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                         ffn_dim=384):
    """The tiny default's "pretrained" model: a byte-level BPE trained on the SFT conversations (with
    the Tülu chat template) and a randomly initialised Llama, written as an HF checkpoint to `path`."""
    import torch

    from model import Llama, LlamaConfig, new_dir_beside, replace_dir
    from tokenizer import TULU_TEMPLATE, train_tokenizer
    from jinja2 import Template

    render = Template(TULU_TEMPLATE)
    texts = [render.render(messages=r["messages"], eos_token="<|endoftext|>", add_generation_prompt=False)
             for r in sft_rows]
    tok = train_tokenizer(texts, vocab_size)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      ffn_dim=ffn_dim, rope_theta=10000.0, tie_embeddings=True, max_seq_len=1024)
    cfg.hf = {**cfg.to_hf(), "bos_token_id": None, "eos_token_id": tok.eos_token_ids[0]}
    torch.manual_seed(seed)
    model = Llama(cfg)
    model.init_weights()
    tmp = new_dir_beside(path)  # written whole, then swapped in: a reader never sees half a tokenizer
    model.save_pretrained(tmp, atomic=False)
    tok.save_pretrained(tmp)
    replace_dir(tmp, path)
    return path
