"""
Tokenizer and chat templates: text <-> token ids, and chat messages -> the exact tokens a checkpoint
was trained on, plus the mask of the assistant tokens that SFT/DPO learn from.

    tok = Tokenizer.from_pretrained("path/to/hf_checkpoint")   # reads tokenizer.json & friends
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids, mask = tokenize_conversation(tok, messages, max_len=4096)

What it reads from an HF checkpoint directory:
- tokenizer.json            the fast tokenizer itself (vocab, merges, added/special tokens), loaded
                            with the `tokenizers` package. Required.
- tokenizer_config.json     named special tokens (bos/eos/pad/...), the chat_template
- special_tokens_map.json   older spelling of the special tokens; fills in what the config lacks
- chat_template.jinja       newer transformers put the template here; it wins over the config's
- generation_config.json,   `eos_token_id` (an int or a list): every id the model may stop on, e.g.
  config.json               Llama 3's <|eot_id|> besides <|end_of_text|>
Checkpoints without a chat template get the Tülu 3 template (TULU_TEMPLATE), as open-instruct does.

Rendering mirrors transformers' `apply_chat_template` (utils/chat_template_utils.py): the same
sandboxed jinja2 environment (trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, `tojson`,
`strftime_now`, the `{% generation %}` tag) and the same variables (messages, tools, documents,
add_generation_prompt, every named special token as a string). tests/test_tokenizer.py checks
the output against transformers for the Tülu, Llama-3 and ChatML templates.
"""

import json
import os
import shutil
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Tok
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

from model import read_json

# The Tülu 3 chat template, verbatim from open-instruct (CHAT_TEMPLATES["tulu"] in
# dataset_processor.py@bf5774953, unchanged at HEAD in dataset_transformation.py), the double
# space included. No BOS; <|user|> etc. are plain text, not special tokens. Renders:
#   system:    <|system|>\n{content}\n
#   user:      <|user|>\n{content}\n
#   assistant: <|assistant|>\n{content}{eos}\n   (no trailing \n when it is the last message)
#   add_generation_prompt: <|assistant|>\n
TULU_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}"
    "{{ '<|assistant|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
)

# -----------------------------------------------------------------------------
# jinja environment, the same as transformers' _compile_jinja_template


class _Generation(Extension):
    # `{% generation %}...{% endgeneration %}` marks assistant text in some templates (transformers
    # uses it for return_assistant_tokens_mask). It renders its body unchanged; we only parse it.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes <, >, & and ': templates expect plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source):
    # templates come from the Hub: render them in jinja's sandbox, like transformers
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama 3.1 prints today's date
    return env.from_string(source)


# -----------------------------------------------------------------------------
# reading the checkpoint's json files


# the source checkpoint's files that describe the same tokenizer in other forms (slow tokenizers: vocab.json
# and merges.txt, sentencepiece's tokenizer.model; transformers 5's named templates) or the terms the weights
# come with (a derivative of Llama must carry its license): copied unchanged into every checkpoint saved
CARRIED = ("vocab.json", "merges.txt", "tokenizer.model", "additional_chat_templates", "LICENSE", "LICENSE.txt",
           "LICENSE.md", "USE_POLICY.md", "NOTICE", "NOTICE.txt")


def _content(v):
    # special tokens are stored as "<s>" or as AddedToken dicts {"content": "<s>", "lstrip": false, ...}
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


def _ids(v):
    # eos_token_id in generation_config.json / config.json: absent, an int, or a list of ints
    return [] if v is None else [v] if isinstance(v, int) else list(v)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of one checkpoint."""

    def __init__(self, tok, special_tokens, chat_template=None, eos_token_ids=(), config=None):
        self.tok = tok  # tokenizers.Tokenizer
        self.special_tokens = dict(special_tokens)  # {"eos_token": "<|eot_id|>", ...}, strings only
        self.chat_template = chat_template or TULU_TEMPLATE
        self.config = dict(config or {})  # the raw tokenizer_config.json, kept for save_pretrained
        self.source, self.named_templates = None, {}  # from_pretrained's directory; its other named templates
        for name, t in self.special_tokens.items():  # the ones we use must exist; others only reach templates
            if name in ("bos_token", "eos_token", "pad_token", "unk_token") and tok.token_to_id(t) is None:
                raise ValueError(f"special token {name}={t!r} (tokenizer_config.json or special_tokens_map.json) "
                                 "is not in the vocabulary of tokenizer.json")
        # every id generation may stop on: the tokenizer's eos first, then eos_token_ids (from_pretrained: those of
        # generation_config.json, then config.json's)
        eos = [tok.token_to_id(self.eos_token)] if self.eos_token else []
        self.eos_token_ids = list(dict.fromkeys(eos + [int(i) for i in eos_token_ids]))
        for i in self.eos_token_ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"eos_token_id {i} (generation_config.json or config.json) is outside the "
                                 f"vocabulary of tokenizer.json (size {self.vocab_size})")
        if not self.eos_token_ids:
            raise ValueError("no EOS token: set eos_token in tokenizer_config.json or eos_token_id in "
                             "generation_config.json")
        # A tokenizer.json saved after a call with truncation=True / padding (a trainer's last batch) stores
        # them, e.g. "truncation": {"max_length": 2048}. transformers sets both per call (off unless asked:
        # set_truncation_and_padding), so they never cut or pad a plain encode; here they would cut every
        # conversation and pad every prompt, silently. Off, as there. (The file itself is copied unchanged.)
        tok.no_truncation()
        tok.no_padding()
        # A copy without the post-processor, for character offsets: GPT-2 style ByteLevel
        # post-processors trim whitespace off the offsets (trim_offsets), which would blur token
        # boundaries. Without special tokens the post-processor never changes the ids themselves.
        self._plain = _Tok.from_str(tok.to_str())
        self._plain.post_processor = None

    @classmethod
    def from_pretrained(cls, path):
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found: a fast-tokenizer tokenizer.json is required "
                                    "(convert a sentencepiece-only checkpoint once with transformers and save it)")
        try:
            tok = _Tok.from_file(file)
        except Exception as e:
            raise ValueError(f"{file}: cannot be read by the tokenizers package: {e}") from None
        cfg = read_json(os.path.join(path, "tokenizer_config.json")) or {}
        smap = read_json(os.path.join(path, "special_tokens_map.json")) or {}
        # where the two files disagree (released checkpoints agree), transformers 5's rule: tokenizer_config.json
        # wins when it carries added_tokens_decoder (as transformers writes it), else special_tokens_map.json;
        # either fills in the tokens the other leaves unset
        first, second = (cfg, smap) if "added_tokens_decoder" in cfg else (smap, cfg)
        # every `*_token` string of the two files (bos_token, eos_token, ..., any other, as transformers v5 does)
        # becomes a template variable; one the files leave unset is not passed at all
        special = {}
        for k in list(smap) + list(cfg):
            t = _content(first.get(k)) or _content(second.get(k))
            if k.endswith("_token") and t:
                special[k] = t
        # chat template: chat_template.jinja > tokenizer_config's string, or its list of named
        # templates [{"name": "default", "template": ...}, {"name": "tool_use", ...}] (we use "default";
        # the others are written back unchanged)
        template, named = cfg.get("chat_template"), {}
        if isinstance(template, list):
            named = {t["name"]: t["template"] for t in template}
            if "default" not in named:  # (transformers would ask for a name too; silently using ours would not do)
                raise ValueError(f"{path}/tokenizer_config.json: chat_template lists {sorted(named)} but no "
                                 "'default' one")
            template = named.pop("default")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        gen = read_json(os.path.join(path, "generation_config.json")) or {}
        mcfg = read_json(os.path.join(path, "config.json")) or {}
        eos_ids = _ids(gen.get("eos_token_id")) + _ids(mcfg.get("eos_token_id"))
        out = cls(tok, special, template, eos_ids, cfg)
        out.generation_config = gen  # written back on save, so every EOS id survives fine-tuning
        out.named_templates, out.source = named, path
        return out

    # --- text <-> ids

    def encode(self, text, add_special_tokens=False):
        # add_special_tokens=True applies tokenizer.json's post-processor (e.g. Llama's BOS); chat
        # text must not use it: the template writes BOS itself where the checkpoint wants one
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False):
        # NOTE: no clean_up_tokenization_spaces: we return exactly what the tokens spell
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    @property
    def vocab_size(self):
        # all ids the tokenizer can produce, added tokens included (transformers' len(tokenizer));
        # a model's embedding may have more rows (e.g. Tülu 3's 128264, padded to a multiple of 8)
        return self.tok.get_vocab_size(with_added_tokens=True)

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    bos_id = property(lambda self: self.tok.token_to_id(self.bos_token) if self.bos_token else None)
    eos_id = property(lambda self: self.eos_token_ids[0])

    @property
    def pad_id(self):
        # no pad token (Llama 3): pad with EOS. Safe because padding is masked by position
        # (labels = IGNORE there), never by token id, so real EOS labels are still learned.
        return self.tok.token_to_id(self.pad_token) if self.pad_token else self.eos_id

    # --- chat

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False, **kwargs):
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's template.
        Extra kwargs (tools=, date_string=, enable_thinking=...) reach the template as variables."""
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        # like transformers: drop None-valued keys (templates test presence, not None), copy each
        # message, and expose reasoning under "reasoning_content" whatever the dataset called it
        chat = []
        for m in messages:
            m = {k: v for k, v in m.items() if v is not None}
            r = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
            chat.append(m if r is None else {"thinking": r, **m, "reasoning_content": r})
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        template = compile_template(self.chat_template)
        try:
            text = template.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.UndefinedError as e:
            # a special token the template writes but the checkpoint never names (no tokenizer_config.json, or one
            # without eos_token): the checkpoint's fault, not the conversation's, which every row would be blamed for
            token = str(e).removesuffix(" is undefined").strip("'")
            if not token.endswith("_token"):
                raise ValueError(f"the chat template refuses this conversation: {e}") from None
            raise ValueError(f"the chat template writes {token}, which {self.source or 'the tokenizer'}"
                             "/tokenizer_config.json (or special_tokens_map.json) does not set") from None
        except jinja2.exceptions.TemplateError as e:  # raise_exception("roles must alternate ...") and kin
            raise ValueError(f"the chat template refuses this conversation: {e}") from None
        return self.encode(text) if tokenize else text

    def use_chat_template(self, spec):
        """spec: "own" keeps the checkpoint's template (Tülu's when it has none); "tulu" sets Tülu 3's
        whatever the checkpoint has, as open-instruct's --chat_template_name tulu (its default) does; any
        other value is a .jinja file to read. A template that does not compile is an error naming it."""
        if spec == "own":
            return
        if spec == "tulu":
            self.chat_template = TULU_TEMPLATE
            return
        with open(spec, encoding="utf-8") as f:
            source = f.read()
        try:
            compile_template(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"{spec}:{e.lineno}: not a jinja template: {e.message}") from None
        self.chat_template = source

    def add_bos(self):
        """Prepends {{ bos_token }} to the chat template, open-instruct's --add_bos: for a base model
        pretrained with BOS first whose template (or the Tülu fallback) does not write one. Saved with the
        checkpoint, so later stages, eval and vLLM render it too. A template that already starts with
        BOS is an error (it would be doubled)."""
        if self.bos_token is None:
            raise ValueError("the tokenizer has no bos_token to add")
        if self.apply_chat_template([{"role": "user", "content": "x"}]).startswith(self.bos_token):
            raise ValueError(f"the chat template already starts with {self.bos_token}")
        self.chat_template = "{{ bos_token }}" + self.chat_template

    def save_pretrained(self, path):
        """Write tokenizer.json, tokenizer_config.json (special tokens + chat_template) and
        special_tokens_map.json so that transformers' AutoTokenizer loads the same tokenizer; the source
        checkpoint's other tokenizer files (CARRIED) are copied along."""
        os.makedirs(path, exist_ok=True)
        source = self.source
        if source is None:  # trained here (the tiny default)
            self.tok.save(os.path.join(path, "tokenizer.json"))
        elif os.path.realpath(source) != os.path.realpath(path):
            # the vocabulary never changes: the source's own bytes, not a re-serialisation (tokenizers >= 0.20
            # writes merges as pairs, which tokenizers < 0.20, i.e. transformers <= 4.44, cannot read)
            for name in ("tokenizer.json",) + CARRIED:
                src = os.path.join(source, name)
                if os.path.isdir(src):
                    shutil.copytree(src, os.path.join(path, name), dirs_exist_ok=True)
                elif os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(path, name))
        # keep the source config's other fields (tokenizer_class, add_bos_token, ...); the added
        # tokens are in tokenizer.json, from which transformers rebuilds added_tokens_decoder
        cfg = {k: v for k, v in self.config.items()
               if k not in ("chat_template", "added_tokens_decoder") and not (k.endswith("_token") and _content(v))}
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        named = [{"name": k, "template": v} for k, v in self.named_templates.items()]
        cfg.update(self.special_tokens, chat_template=[{"name": "default", "template": self.chat_template}] + named
                   if named else self.chat_template)
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
        with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump(self.special_tokens, f, indent=2, ensure_ascii=False)
        # generation_config.json carries the EOS ids (often several) that transformers and vLLM stop on
        gen = dict(getattr(self, "generation_config", {}))
        first = _ids(gen.get("eos_token_id"))  # the source's order first (transformers pads with the first)
        gen["eos_token_id"] = first + [i for i in self.eos_token_ids if i not in first]
        if self.bos_id is not None:
            gen.setdefault("bos_token_id", self.bos_id)
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(gen, f, indent=2)
        # a chat_template.jinja left in `path` would win over the config's template: keep them equal
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, "w", encoding="utf-8") as f:
                f.write(self.chat_template)


# -----------------------------------------------------------------------------
# conversation -> (ids, mask of the tokens to train on)


def tokenize_conversation(tok, messages, max_len=None):
    """Return (ids, mask): the token ids of the rendered conversation and, per token, True where
    SFT trains on it: each assistant message's content and its EOS token; never the assistant
    header (<|assistant|>\\n, <|start_header_id|>assistant<|end_header_id|>\\n\\n,
    <|im_start|>assistant\\n), never system/user/tool turns.

    As open-instruct HEAD does (dataset_transformation.py, _tokenize_tulu_sft_with_assistant_labels):
    render the whole conversation to one string, tokenize it once with character offsets, and
    find assistant message i's characters as
        [len(render(messages[:i], add_generation_prompt=True)), len(render(messages[:i+1])))
    That needs a prefix-stable template (rendering a prefix of the conversation gives a prefix of
    the text); templates that rewrite earlier turns (e.g. Qwen3 dropping past <think> blocks) are
    refused with an error rather than silently mis-masked.

    The span is cut right after its last EOS string, so text a template writes after the EOS is
    not trained: ChatML's "\\n" after <|im_end|>, and the Tülu template's "\\n" after a non-final
    assistant turn. For Tülu that is also what open-instruct trained: @Tülu3 (finetune.py@bf5774953)
    masked each user turn from len(tokens(render(messages[:j]))), and that prefix ends at the EOS
    (the assistant is its last message), so the "\\n" fell into the masked user span; HEAD's span
    ends at the same place. (The Tülu 2 era `encode_with_messages_format` did train that "\\n".)
    An assistant turn without any EOS token is an error.

    A token is trained when its characters lie inside a span. EOS tokens are special, so spans end
    on token boundaries. A span can start mid-token: content beginning with "\n" after a header
    ending in "\n" can give one "\n\n" token, and a header ending in a space ("assistant: ") gives
    " Hello". Such a token holds header text, so it is not trained.
    """
    text = tok.apply_chat_template(messages)
    enc = tok._plain.encode(text, add_special_tokens=False)  # ids equal tok.encode(text)
    eos_strs = [s for s in (tok.decode([i]) for i in tok.eos_token_ids) if s]
    spans = []  # (start, end) character spans to train on, in order
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        if i == 0:
            raise ValueError("messages[0] is an assistant turn: a conversation must start with a system or user turn")
        head = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[:i + 1])
        if not (upto.startswith(head) and text.startswith(upto)):
            raise ValueError(f"the chat template is not prefix-stable at messages[{i}]: rendering the first {i} "
                             f"messages (with the generation prompt) or the first {i + 1} is not a prefix of the whole "
                             "conversation, so the assistant tokens cannot be located")
        s, e = len(head), len(upto)
        ends = [upto.rfind(t, s, e) + len(t) for t in eos_strs if upto.rfind(t, s, e) >= 0]
        if not ends:  # the model would never learn to stop (a classic silent SFT bug)
            raise ValueError(f"assistant turn messages[{i}] renders without any EOS token {eos_strs}: set eos_token "
                             "(tokenizer_config.json) or eos_token_id (generation_config.json) to the template's "
                             "end-of-turn token")
        spans.append((s, max(ends)))
    mask, k = [], 0
    for a, b in enc.offsets:  # offsets are (start, end) characters of each token, increasing
        while k < len(spans) and a >= spans[k][1]:
            k += 1
        mask.append(k < len(spans) and spans[k][0] <= a and b <= spans[k][1])
    ids = enc.ids
    if max_len is not None:  # right truncation, as open-instruct's truncation=True
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


# -----------------------------------------------------------------------------
# a small byte-level BPE, for the tiny default model trained from scratch


# the split regex of Llama 3's tokenizer.json (GPT-4's cl100k pattern)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_tokenizer(texts, vocab_size, special_tokens=("<|endoftext|>",)):
    """Train a byte-level BPE (Llama 3's pre-tokenizer) on `texts` (any iterable of strings). <|endoftext|> is
    EOS and pad (added if missing); the chat template is Tülu's. Deterministic: the same texts and
    vocab_size give the same tokenizer.json."""
    special = list(dict.fromkeys(["<|endoftext|>", *special_tokens]))
    if vocab_size < 256 + len(special):
        raise ValueError(f"vocab_size {vocab_size} < 256 bytes + {len(special)} special tokens")
    tok = _Tok(models.BPE())
    # Llama 3's pre-tokenizer: its split regex (numbers in chunks of <= 3 digits, runs of newlines
    # kept whole), then bytes -> printable unicode. All 256 bytes are in the alphabet: no <unk>.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    eos = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    return Tokenizer(tok, eos, TULU_TEMPLATE, config={"tokenizer_class": "PreTrainedTokenizerFast"})
