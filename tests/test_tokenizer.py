"""
Tokenizer and chat-template tests, against transformers as the oracle. No downloads: a tiny
byte-level BPE is trained on the spot, wrapped as a transformers PreTrainedTokenizerFast with each
checkpoint's special tokens and chat template, saved with transformers, and loaded with ours.

    python -m pytest tests/test_tokenizer.py -v
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from tokenizers import processors

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tokenizer import TULU_TEMPLATE, Tokenizer, tokenize_conversation, train_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")

# Meta-Llama-3-8B-Instruct's chat_template
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2.5-Instruct's chat_template (ChatML, with its tool-calling branches)
CHATML_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Exercises the rest of transformers' jinja environment: trim_blocks/lstrip_blocks on an indented
# multi-line template, loopcontrols, namespace, tojson (no HTML escaping), strftime_now,
# raise_exception, the {% generation %} tag, and a non-standard *_token variable.
FEATURES_TEMPLATE = """{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ ns.n }}:{{ message['role'] }}>
    {% if message['role'] == 'assistant' %}
        {% generation %}{{ message['content'] + eos_token }}{% endgeneration %}
    {% else %}
        {{ message['content'] }} {{ message | tojson }}
    {% endif %}
    {% if ns.n > 5 %}{% break %}{% endif %}
{% endfor %}
[{{ strftime_now('%Y') }}|{{ bos_token }}|{{ tools }}|{{ image_token }}]
{% if add_generation_prompt %}<gen>{% endif %}"""

# Prefix-unstable (like Qwen3's): earlier assistant turns lose their <think> block
THINK_TEMPLATE = (
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIALS = ["<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<pad>", "<image>"]

# name -> (template or None for a checkpoint without one, tokenizer_config special tokens, generation_config eos)
CHECKPOINTS = {
    "tulu": (None, dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<pad>"), None),
    "llama3": (LLAMA3_TEMPLATE, dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
               ["<|end_of_text|>", "<|eot_id|>"]),
    "chatml": (CHATML_TEMPLATE, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
               ["<|im_end|>", "<|endoftext|>"]),
}

CONVERSATIONS = [
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": "2 + 3 = 5."},
     {"role": "user", "content": "And times 4?\nShow it."},
     {"role": "assistant", "content": "(2 + 3) * 4 = 20.\nDone!"},
     {"role": "user", "content": "Naïve café 🙂?"},
     {"role": "assistant", "content": "Oui, très naïve 🙂."}],
    [{"role": "user", "content": "Say hi."},
     {"role": "assistant", "content": "Hi."}],
    [{"role": "system", "content": "Be kind."},
     {"role": "user", "content": "Tell me a story."},
     {"role": "assistant", "content": "Once upon a time, a cat ran fast."},
     {"role": "user", "content": "Thanks!"}],
]

CORPUS = [m["content"] for c in CONVERSATIONS for m in c] * 3 + [
    "The quick brown fox jumps over the lazy dog. 0123456789 <|user|> <|assistant|> <|system|> user assistant",
] * 5 + ["First paragraph.\n\nSecond paragraph.\n\n\nThird."] * 5


@pytest.fixture(scope="module")
def base():
    # one tiny byte-level BPE shared by every checkpoint below
    return train_tokenizer(CORPUS, 400, SPECIALS)


@pytest.fixture(scope="module")
def ckpts(base, tmp_path_factory):
    # name -> (directory saved by transformers, the transformers tokenizer)
    out = {}
    for name, (template, special, gen_eos) in CHECKPOINTS.items():
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=base.tok, **special)
        if template is not None:
            hf.chat_template = template
        path = str(tmp_path_factory.mktemp(name))
        hf.save_pretrained(path)
        if gen_eos is not None:
            with open(os.path.join(path, "generation_config.json"), "w") as f:
                json.dump({"eos_token_id": [base.token_to_id(t) for t in gen_eos]}, f)
        out[name] = (path, transformers.AutoTokenizer.from_pretrained(path))
    return out


def hf_render(hf, name, messages, **kw):
    # the Tülu checkpoint has no template of its own; transformers gets Tülu's explicitly
    template = TULU_TEMPLATE if CHECKPOINTS[name][0] is None else None
    return hf.apply_chat_template(messages, chat_template=template, **kw)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_render_matches_transformers(ckpts, name):
    path, hf = ckpts[name]
    tok = Tokenizer.from_pretrained(path)
    assert tok.chat_template == (CHECKPOINTS[name][0] or TULU_TEMPLATE)
    for conv in CONVERSATIONS:
        for gen in (False, True):
            for n in range(1, len(conv) + 1):  # every prefix, so single-turn and final-user cases too
                ours = tok.apply_chat_template(conv[:n], add_generation_prompt=gen)
                assert ours == hf_render(hf, name, conv[:n], add_generation_prompt=gen, tokenize=False)
                ids = tok.apply_chat_template(conv[:n], add_generation_prompt=gen, tokenize=True)
                assert ids == hf_render(hf, name, conv[:n], add_generation_prompt=gen, return_dict=False)
    # templates see the special tokens: Llama 3 starts with BOS, Tülu ends each assistant turn with EOS
    if name == "llama3":
        assert ours.startswith("<|begin_of_text|><|start_header_id|>system")
    if name == "tulu":
        assert tok.apply_chat_template(CONVERSATIONS[1]) == "<|user|>\nSay hi.\n<|assistant|>\nHi.<|end_of_text|>"


def test_chatml_tools_and_features_match_transformers(ckpts, base):
    path, hf = ckpts["chatml"]
    tok = Tokenizer.from_pretrained(path)
    tools = [{"type": "function", "function": {"name": "add", "description": "a <b> & 'c' é",
                                                "parameters": {"type": "object", "properties": {}}}}]
    conv = CONVERSATIONS[0][1:3] + [
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "3"}]
    for gen in (False, True):
        ours = tok.apply_chat_template(conv, add_generation_prompt=gen, tools=tools)
        assert ours == hf.apply_chat_template(conv, add_generation_prompt=gen, tools=tools, tokenize=False)
    assert '"description": "a <b> & \'c\' é"' in ours  # tojson without HTML escaping or \u escapes

    # the rest of the environment, on a tokenizer with an extra named special token
    hf2 = transformers.PreTrainedTokenizerFast(tokenizer_object=base.tok, bos_token="<|begin_of_text|>",
                                               eos_token="<|eot_id|>", extra_special_tokens={"image_token": "<image>"})
    hf2.chat_template = FEATURES_TEMPLATE
    hf2.save_pretrained(path + "_features")
    hf2 = transformers.AutoTokenizer.from_pretrained(path + "_features")
    tok2 = Tokenizer.from_pretrained(path + "_features")
    conv = CONVERSATIONS[0] * 2  # long enough to hit {% break %}
    # None-valued keys are dropped and reasoning is aliased, as transformers does (tojson shows the keys)
    conv[1] = {**conv[1], "name": None, "reasoning": "think first"}
    for gen in (False, True):
        ours = tok2.apply_chat_template(conv, add_generation_prompt=gen)
        assert ours == hf2.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
    assert '"thinking": "think first"' in ours and '"name"' not in ours
    assert "|<image>]" in ours and "<6:assistant>" in ours and "<7:" not in ours
    with pytest.raises(Exception, match="unknown role narrator"):
        tok2.apply_chat_template([{"role": "narrator", "content": "x"}])


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_save_pretrained_round_trip(ckpts, name, tmp_path):
    path, _ = ckpts[name]
    tok = Tokenizer.from_pretrained(path)
    tok.save_pretrained(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))  # reads our files
    back = Tokenizer.from_pretrained(str(tmp_path))
    assert back.special_tokens == tok.special_tokens and back.chat_template == tok.chat_template
    text = "Hello naïve 🙂 world<|im_end|> and <|eot_id|>"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text) == back.encode(text)
    for conv in CONVERSATIONS:
        for gen in (False, True):
            ours = tok.apply_chat_template(conv, add_generation_prompt=gen)
            # the Tülu fallback is now the checkpoint's own template: no chat_template= needed
            assert hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False) == ours
            assert back.apply_chat_template(conv, add_generation_prompt=gen) == ours


def expected_pieces(name, conv, eos):
    # An independent construction of the rendered text: (piece, trained?) per template, written out
    # by hand from each template's definition. The trained pieces are each assistant's content + EOS.
    pieces = []
    if name == "chatml" and conv[0]["role"] != "system":  # Qwen's default system prompt
        pieces.append(("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                       "<|im_end|>\n", False))
    for i, m in enumerate(conv):
        role, c, last = m["role"], m["content"], i == len(conv) - 1
        a = role == "assistant"
        if name == "tulu":
            pieces += [(f"<|{role}|>\n", False), (c, a)]
            pieces += [(eos, True)] + ([] if last else [("\n", False)]) if a else [("\n", False)]
        elif name == "llama3":
            bos = "<|begin_of_text|>" if i == 0 else ""
            pieces += [(f"{bos}<|start_header_id|>{role}<|end_header_id|>\n\n", False), (c, a), ("<|eot_id|>", a)]
        else:
            pieces += [(f"<|im_start|>{role}\n", False), (c, a), ("<|im_end|>", a), ("\n", False)]
    return pieces


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_assistant_mask_is_exact(ckpts, name):
    path, hf = ckpts[name]
    tok = Tokenizer.from_pretrained(path)
    for conv in CONVERSATIONS:
        ids, mask = tokenize_conversation(tok, conv)
        assert ids == hf_render(hf, name, conv, return_dict=False) and len(mask) == len(ids)
        # 1) tokenizing the pieces alone and concatenating gives the same ids, so the pieces' flags
        #    give the expected mask token by token
        pieces = expected_pieces(name, conv, tok.eos_token)
        assert "".join(p for p, _ in pieces) == tok.apply_chat_template(conv)
        # encode runs of same-flag pieces: only the trained/untrained boundaries must be token boundaries
        chunks = []
        for p, trained in pieces:
            if chunks and chunks[-1][1] == trained:
                chunks[-1][0] += p
            else:
                chunks.append([p, trained])
        want_ids, want_mask = [], []
        for p, trained in chunks:
            pid = tok.encode(p)
            want_ids += pid
            want_mask += [trained] * len(pid)
        assert want_ids == ids
        assert mask == want_mask
        # 2) the trained runs decode to exactly each assistant's content + EOS, in order
        runs, prev = [], False
        for t, m in zip(ids, mask):
            if m and not prev:
                runs.append([])
            if m:
                runs[-1].append(t)
            prev = m
        assert [tok.decode(r) for r in runs] == [m["content"] + tok.eos_token for m in conv if m["role"] == "assistant"]
        assert all(tok.decode([t]) == tok.eos_token for t, m in zip(ids, mask) if m and t in tok.eos_token_ids)
        # 3) truncation keeps ids and mask aligned
        ids8, mask8 = tokenize_conversation(tok, conv, max_len=8)
        assert ids8 == ids[:8] and mask8 == mask[:8]


def test_mask_token_straddling_the_header(base):
    # Content that starts with whitespace can merge with the header's last newline into one token:
    # "<|assistant|>\n" + "\nSecond" splits as "<|", "assistant", "|>", "\n\n", "Second". That
    # "\n\n" token is half header, so it is not trained (see tokenize_conversation); the rest is.
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nSecond paragraph."}]
    ids, mask = tokenize_conversation(base, conv)
    first = mask.index(True)
    assert base.decode(ids[first - 2:first + 1]) == "|>\n\nSecond" and base.decode([ids[first - 1]]) == "\n\n"
    assert base.decode([t for t, m in zip(ids, mask) if m]) == "Second paragraph.<|endoftext|>"
    # GPT-2 style tokenizer.json files trim whitespace off the offsets in their post-processor,
    # which would move token boundaries; the mask must not depend on it
    # (e.g. "assistant: " + "Hello" gives " Hello", whose space is header: trimmed, it would look inside)
    space = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if m['role'] == 'assistant' %}"
             "{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    gpt2 = base.tok.from_str(base.tok.to_str())
    gpt2.post_processor = processors.ByteLevel(trim_offsets=True)
    assert gpt2.encode("a b").offsets != base.tok.encode("a b").offsets  # trimming is active
    convs = CONVERSATIONS + [conv, [conv[0], {"role": "assistant", "content": " \n \nSecond  "}]]
    for template in (None, space):
        tok, ref = Tokenizer(gpt2, base.special_tokens, template), Tokenizer(base.tok, base.special_tokens, template)
        for c in convs:
            ids, mask = tokenize_conversation(tok, c)
            assert (ids, mask) == tokenize_conversation(ref, c)
            if template and c in CONVERSATIONS:  # the first trained token is not " Word" (space from header)
                assert not base.decode([ids[mask.index(True)]]).startswith(" ")


def test_mask_refuses_prefix_unstable_templates(base):
    tok = Tokenizer(base.tok, {"eos_token": "<|im_end|>"}, THINK_TEMPLATE)
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>hm</think>hello"}]
    ids, mask = tokenize_conversation(tok, ok)  # one assistant turn, the last: stable
    assert sum(mask) > 0
    with pytest.raises(ValueError, match=r"not prefix-stable at messages\[1\]"):
        tokenize_conversation(tok, ok + ok)
    with pytest.raises(ValueError, match=r"messages\[0\] is an assistant turn"):
        tokenize_conversation(tok, ok[1:])
    # a template whose assistant turns carry no EOS token: SFT would never teach the model to stop
    with pytest.raises(ValueError, match=re.escape("assistant turn messages[1] renders without any EOS token")):
        tokenize_conversation(Tokenizer(base.tok, {"eos_token": "<|endoftext|>"}, THINK_TEMPLATE), ok)


def test_every_eos_id_ends_a_trained_span(base):
    # Llama 3 base style: eos_token <|end_of_text|>, while the chat template ends turns with <|eot_id|>, an EOS
    # id of generation_config.json: trained, as the token the model must learn to stop on
    tok = Tokenizer(base.tok, dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"), LLAMA3_TEMPLATE,
                    eos_token_ids=[base.token_to_id("<|eot_id|>")])
    ids, mask = tokenize_conversation(tok, CONVERSATIONS[0])
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "".join(
        m["content"] + "<|eot_id|>" for m in CONVERSATIONS[0] if m["role"] == "assistant")


def test_a_turn_closed_by_two_eos_tokens_trains_both(base):
    # a template that closes an assistant turn with two EOS tokens in a row: the span runs to the last of them
    # (the whole closing sequence is learnt, whichever of the two a server stops on)
    tpl = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] }}"
           "{% if m['role'] == 'assistant' %}{{ '<|eot_id|><|end_of_text|>' }}{% else %}{{ '<|eot_id|>' }}{% endif %}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    tok = Tokenizer(base.tok, dict(eos_token="<|eot_id|>"), tpl, eos_token_ids=[base.token_to_id("<|end_of_text|>")])
    ids, mask = tokenize_conversation(tok, CONVERSATIONS[0])
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "".join(
        m["content"] + "<|eot_id|><|end_of_text|>" for m in CONVERSATIONS[0] if m["role"] == "assistant")


def test_a_special_token_the_checkpoint_never_names_is_its_fault(base, tmp_path):
    # tokenizer.json without tokenizer_config.json (EOS ids from generation_config.json only): the Tülu template
    # writes eos_token, which is undefined. Every conversation fails alike, so the message names the checkpoint's
    # file, not "the chat template refuses this conversation" (which would send one looking at the data)
    base.tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": base.token_to_id("<|im_end|>")}))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError) as e:
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert str(e.value) == (f"the chat template writes eos_token, which {tmp_path}/tokenizer_config.json "
                            "(or special_tokens_map.json) does not set")
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"  # the conversation's fault: said so
    with pytest.raises(ValueError, match="refuses this conversation: roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_a_later_turn_without_eos_is_refused(base):
    # a template that drops the EOS from the second assistant turn on: an earlier turn's EOS must not count
    t = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
         "{% if m['role'] != 'assistant' or loop.index0 < 3 %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok = Tokenizer(base.tok, {"eos_token": "<|im_end|>"}, t)
    with pytest.raises(ValueError, match=r"messages\[4\] renders without any EOS"):
        tokenize_conversation(tok, CONVERSATIONS[0][:5])


def test_special_tokens_and_eos_ids(ckpts, base, tmp_path):
    llama = Tokenizer.from_pretrained(ckpts["llama3"][0])
    eot, eot_text = base.token_to_id("<|eot_id|>"), base.token_to_id("<|end_of_text|>")
    assert llama.eos_token == "<|eot_id|>" and llama.eos_id == eot
    assert llama.eos_token_ids == [eot, eot_text]  # tokenizer's eos first, then generation_config's
    assert llama.bos_id == base.token_to_id("<|begin_of_text|>")
    assert llama.pad_id == eot  # no pad token: falls back to EOS
    llama.save_pretrained(str(tmp_path / "resaved"))  # every EOS id survives a save (generation_config)
    assert Tokenizer.from_pretrained(str(tmp_path / "resaved")).eos_token_ids == [eot, eot_text]
    # in the source's order (transformers pads with the first when a config names no pad token)
    gen = json.load(open(tmp_path / "resaved" / "generation_config.json"))
    assert gen["eos_token_id"] == [eot_text, eot]
    assert gen["bos_token_id"] == llama.bos_id  # (as transformers' GenerationConfig.from_model_config writes it)
    tulu = Tokenizer.from_pretrained(ckpts["tulu"][0])
    assert tulu.eos_token_ids == [base.token_to_id("<|end_of_text|>")] and tulu.pad_id == base.token_to_id("<pad>")
    chatml = Tokenizer.from_pretrained(ckpts["chatml"][0])
    assert chatml.bos_token is None and chatml.bos_id is None
    assert chatml.vocab_size == len(ckpts["chatml"][1]) == 400

    # older layout: special tokens as AddedToken dicts, eos only in special_tokens_map.json,
    # generation_config eos as a single int, and config.json's eos list
    d = tmp_path / "old"
    d.mkdir()
    base.tok.save(str(d / "tokenizer.json"))
    def added(t):
        return {"__type": "AddedToken", "content": t, "lstrip": False, "normalized": False, "rstrip": False}

    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": added("<|begin_of_text|>"), "eos_token": None}))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": added("<|end_of_text|>"),
                                                           "bos_token": "<|im_start|>"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eot}))
    (d / "config.json").write_text(json.dumps({"eos_token_id": [eot_text, base.token_to_id("<|im_end|>")]}))
    old = Tokenizer.from_pretrained(str(d))
    # no added_tokens_decoder in the config: the map wins where they disagree, as in transformers 5
    hf_old = transformers.AutoTokenizer.from_pretrained(str(d))
    assert old.bos_token == hf_old.bos_token == "<|im_start|>" and old.eos_token == "<|end_of_text|>"
    assert old.eos_token_ids == [eot_text, eot, base.token_to_id("<|im_end|>")]
    assert old.chat_template == TULU_TEMPLATE
    text = "Naïve café 🙂 <|eot_id|>!"
    assert old.decode(old.encode(text)) == text
    assert old.decode(old.encode(text), skip_special_tokens=True) == "Naïve café 🙂 !"


def test_disagreeing_special_token_files_read_as_transformers(ckpts, tmp_path):
    # tokenizer_config.json and special_tokens_map.json naming different tokens: transformers 5 believes the
    # config when it carries added_tokens_decoder (as transformers writes it), else the map
    import shutil
    for keep_decoder in (True, False):
        d = tmp_path / str(keep_decoder)
        shutil.copytree(ckpts["chatml"][0], d)
        cfg = json.load(open(d / "tokenizer_config.json"))
        cfg.pop("added_tokens_decoder", None)  # (transformers 5 itself no longer writes it; 4.x did)
        if keep_decoder:
            cfg["added_tokens_decoder"] = {str(ours_id): {"content": t, "lstrip": False, "normalized": False,
                                                          "rstrip": False, "single_word": False, "special": True}
                                           for t in ("<|endoftext|>", "<|im_end|>", "<pad>")
                                           for ours_id in [Tokenizer.from_pretrained(str(d)).token_to_id(t)]}
        json.dump(cfg, open(d / "tokenizer_config.json", "w"))
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<pad>"}, open(d / "special_tokens_map.json", "w"))
        hf = transformers.AutoTokenizer.from_pretrained(str(d))
        ours = Tokenizer.from_pretrained(str(d))
        assert ours.pad_token == hf.pad_token == ("<|endoftext|>" if keep_decoder else "<pad>")


def test_clear_errors(ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        Tokenizer.from_pretrained(str(tmp_path))
    path = ckpts["llama3"][0]
    d = tmp_path / "bad"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(open(os.path.join(path, "tokenizer.json"), "rb").read())
    (d / "tokenizer_config.json").write_text('{"eos_token": "<|eot_id|>",\n "bos_token": }')
    with pytest.raises(ValueError, match=r"tokenizer_config.json: invalid JSON at line 2"):
        Tokenizer.from_pretrained(str(d))
    (d / "tokenizer_config.json").write_text('{"eos_token": "<|not_a_token|>"}')
    with pytest.raises(ValueError, match=re.escape("eos_token='<|not_a_token|>' (tokenizer_config.json or")):
        Tokenizer.from_pretrained(str(d))
    (d / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no EOS token"):
        Tokenizer.from_pretrained(str(d))
    (d / "generation_config.json").write_text('{"eos_token_id": 100000}')
    with pytest.raises(ValueError, match=re.escape("eos_token_id 100000 (generation_config.json or config.json) is")):
        Tokenizer.from_pretrained(str(d))
    with pytest.raises(ValueError, match="empty conversation"):
        Tokenizer.from_pretrained(path).apply_chat_template([])
    tok = Tokenizer.from_pretrained(path)  # a template's raise_exception is a ValueError the data loaders name
    tok.chat_template = "{% if messages[0].role != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}"
    with pytest.raises(ValueError, match="the chat template refuses this conversation: roles must alternate"):
        tok.apply_chat_template([{"role": "system", "content": "s"}])


def test_named_chat_templates(ckpts, tmp_path):
    # tokenizer_config.json may hold a list of named templates: "default" is the chat template; a list
    # without one is an error, not a silent fall back to the Tülu template
    path = ckpts["llama3"][0]
    d = tmp_path / "named"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(open(os.path.join(path, "tokenizer.json"), "rb").read())
    cfg = json.load(open(os.path.join(path, "tokenizer_config.json")))
    cfg.pop("chat_template", None)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for names, ok in ((["tool_use", "default"], True), (["tool_use"], False)):
        cfg["chat_template"] = [{"name": n, "template": LLAMA3_TEMPLATE if n == "default" else "x"} for n in names]
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))  # (no chat_template.jinja in d to win)
        if ok:
            tok = Tokenizer.from_pretrained(str(d))
            assert tok.apply_chat_template(conv) == Tokenizer.from_pretrained(path).apply_chat_template(conv)
            # saved, the other named templates are still there for transformers (and vLLM's tool calls)
            tok.save_pretrained(str(tmp_path / "saved"))
            hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
            assert hf.apply_chat_template(conv, chat_template="tool_use", tokenize=False) == "x"
            assert hf.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(conv)
        else:
            with pytest.raises(ValueError, match="no 'default' one"):
                Tokenizer.from_pretrained(str(d))


def test_stored_truncation_and_padding_do_not_apply(ckpts, tmp_path):
    # A tokenizer.json saved after a call with truncation/padding keeps them (transformers writes the backend's
    # last per-call state; fine-tunes uploaded that way carry e.g. "truncation": {"max_length": 2048}).
    # transformers turns both off for a plain call, so the conversation and the prompt are whole and unpadded:
    # ours must be too, not cut at max_length (every longer example silently truncated) or padded.
    from data import encode_prompt
    path, _ = ckpts["chatml"]
    bent = str(tmp_path / "bent")
    shutil.copytree(path, bent)
    with open(os.path.join(bent, "tokenizer.json")) as f:
        j = json.load(f)
    pad = next(t["id"] for t in j["added_tokens"] if t["content"] == "<|endoftext|>")
    j["truncation"] = {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0}
    j["padding"] = {"strategy": {"Fixed": 256}, "direction": "Left", "pad_to_multiple_of": None, "pad_id": pad,
                    "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    with open(os.path.join(bent, "tokenizer.json"), "w") as f:
        json.dump(j, f)
    hf = transformers.AutoTokenizer.from_pretrained(bent)
    tok, plain = Tokenizer.from_pretrained(bent), Tokenizer.from_pretrained(path)
    for conv in CONVERSATIONS:
        ids, mask = tokenize_conversation(tok, conv)
        assert len(ids) > 16 and ids == hf.apply_chat_template(conv, return_dict=False)
        assert (ids, mask) == tokenize_conversation(plain, conv)
        prompt = encode_prompt(tok, conv[:2])
        assert prompt == hf.apply_chat_template(conv[:2], add_generation_prompt=True, return_dict=False)
        assert prompt == encode_prompt(plain, conv[:2])


def test_source_files_carried(ckpts, tmp_path):
    # the vocabulary never changes: tokenizer.json is the source's bytes (a re-serialisation by tokenizers
    # >= 0.20 writes merges in a form older readers refuse), and the source's slow-tokenizer files,
    # transformers 5's extra templates and its license go along; a tokenizer trained here is written out
    src = tmp_path / "src"
    shutil.copytree(ckpts["llama3"][0], src)
    text = json.load(open(src / "tokenizer.json"))
    (src / "tokenizer.json").write_text(json.dumps(text, indent=1) + "\n")  # bytes a re-save would not keep
    for name in ("vocab.json", "merges.txt", "LICENSE", "USE_POLICY.md", "additional_chat_templates/tool_use.jinja"):
        os.makedirs(os.path.dirname(src / name), exist_ok=True)
        (src / name).write_text(f"the source's {name}")
    (src / "README.md").write_text("about the source model")
    Tokenizer.from_pretrained(str(src)).save_pretrained(str(tmp_path / "out"))
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "LICENSE", "USE_POLICY.md",
                 "additional_chat_templates/tool_use.jinja"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes(), name
    assert not (tmp_path / "out" / "README.md").exists()
    trained = Tokenizer.from_pretrained(str(tmp_path / "out"))
    trained.source = None
    trained.save_pretrained(str(tmp_path / "again"))
    assert json.load(open(tmp_path / "again" / "tokenizer.json"))["model"]["vocab"] == text["model"]["vocab"]


def test_use_chat_template(ckpts, tmp_path):
    # sft.py --chat-template: own keeps the checkpoint's, tulu forces Tülu 3's (open-instruct's default, and
    # what a base model shipping its own template, Qwen2.5's ChatML, is trained with in Tülu 3), or a file
    tok = Tokenizer.from_pretrained(ckpts["chatml"][0])
    own = tok.chat_template
    tok.use_chat_template("own")
    assert tok.chat_template == own and own != TULU_TEMPLATE
    tok.use_chat_template("tulu")
    assert tok.chat_template == TULU_TEMPLATE
    assert tok.apply_chat_template(CONVERSATIONS[0]).startswith("<|system|>\nYou are a terse assistant.\n<|user|>")
    (tmp_path / "t.jinja").write_text(own)
    tok.use_chat_template(str(tmp_path / "t.jinja"))
    assert tok.chat_template == own
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}\n{{ m.content }}\n")
    with pytest.raises(ValueError, match=r"bad.jinja:\d+: not a jinja template: Unexpected end of template"):
        tok.use_chat_template(str(tmp_path / "bad.jinja"))
    with pytest.raises(FileNotFoundError):
        tok.use_chat_template(str(tmp_path / "missing.jinja"))


def test_add_bos(ckpts, tmp_path):
    # open-instruct's --add_bos: BOS before the rendered conversation, never trained, saved with the template;
    # a template that already writes BOS (Llama 3's) is refused rather than doubled
    from tokenizer import tokenize_conversation
    tok = Tokenizer.from_pretrained(ckpts["tulu"][0])
    conv = CONVERSATIONS[1]
    ids0, mask0 = tokenize_conversation(tok, conv)
    tok.add_bos()
    ids, mask = tokenize_conversation(tok, conv)
    assert ids == [tok.bos_id] + ids0 and mask == [False] + mask0
    tok.save_pretrained(str(tmp_path / "t"))
    assert Tokenizer.from_pretrained(str(tmp_path / "t")).apply_chat_template(conv, tokenize=True) == ids
    with pytest.raises(ValueError, match="already starts with <.begin_of_text.>"):
        Tokenizer.from_pretrained(ckpts["llama3"][0]).add_bos()
    with pytest.raises(ValueError, match="no bos_token to add"):
        Tokenizer.from_pretrained(ckpts["chatml"][0]).add_bos()


def test_train_tokenizer_is_deterministic(base, tmp_path):
    assert base.eos_token == "<|endoftext|>" and base.pad_id == base.eos_id == base.token_to_id("<|endoftext|>") == 0
    assert base.chat_template == TULU_TEMPLATE and base.vocab_size == 400
    # special tokens are single tokens; byte-level BPE round-trips any text
    assert base.encode("<|im_start|>x") == [base.token_to_id("<|im_start|>"), *base.encode("x")]
    text = "héllo\n\n  wörld\t🙂 <|endoftext|>"
    assert base.decode(base.encode(text)) == text
    # what the embedded default model ships: transformers loads it and renders the same Tülu chat
    base.save_pretrained(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token == hf.pad_token == "<|endoftext|>" and hf.encode(text, add_special_tokens=False) == base.encode(text)
    for gen in (False, True):
        want = hf.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=gen, tokenize=False)
        assert base.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=gen) == want
    # same input -> same tokenizer.json, in this process and in a fresh one (Rust hash seeds differ)
    digest = hashlib.sha256(train_tokenizer(CORPUS, 400, SPECIALS).tok.to_str().encode()).hexdigest()
    assert digest == hashlib.sha256(base.tok.to_str().encode()).hexdigest()
    code = ("import hashlib, json, sys, tokenizer; texts, specials = json.load(sys.stdin); "
            "print(hashlib.sha256(tokenizer.train_tokenizer(texts, 400, specials).tok.to_str().encode()).hexdigest())")
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps([CORPUS, SPECIALS]), capture_output=True,
                         text=True, check=True, cwd=root)
    assert out.stdout.strip() == digest
