"""
model.py against transformers (the numerical oracle) on tiny random checkpoints made on the spot.

    python -m pytest tests/test_model.py -v
"""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model import Llama, LlamaConfig

torch.manual_seed(0)

# initializer_range 0.2 (not 0.02): attention must be far from uniform, or RoPE errors would hide
BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, max_position_embeddings=256,
            initializer_range=0.2)
CONFIGS = {
    # Llama 2: no GQA, theta 1e4, untied, its rms_norm_eps 1e-5 (not transformers' default: read, not assumed)
    "llama2": ("llama", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0,
                             rms_norm_eps=1e-5)),
    # Llama 3: GQA, theta 5e5
    "llama3": ("llama", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0)),
    # Llama 3.1: llama3 rope scaling factor 8
    "llama31": ("llama", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                              rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=64))),
    # Llama 3.2: tied embeddings, llama3 scaling factor 32
    "llama32": ("llama", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                              tie_word_embeddings=True,
                              rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=64))),
    # Qwen2: q/k/v biases, GQA
    "qwen2": ("qwen2", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0,
                            rms_norm_eps=1e-6)),
    # odd sizes: vocab not a multiple of 8, 3 kv heads, head_dim set explicitly (24, not hidden / heads = 16)
    "odd": ("llama", dict(vocab_size=251, hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                          head_dim=24, intermediate_size=100, rope_theta=500000.0)),
}


def make_hf(name, path, dtype=torch.float32):
    """A random HF model with config `name`, saved to `path` as safetensors; returns the HF model."""
    arch, kw = CONFIGS[name]
    kw = {**BASE, **kw}
    if arch == "llama":
        cfg, cls = transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    else:
        cfg, cls = transformers.Qwen2Config(**kw, use_sliding_window=False), transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    with torch.no_grad():  # random biases/norms so that every parameter matters
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(1.0 if "norm" in n else 0.0, 0.1)
    hf.save_pretrained(path)
    return hf.to(dtype)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    hf = make_hf(request.param, path)
    return request.param, path, hf


def tokens(V, B=2, T=33, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_fp32_parity(pair):
    name, path, hf = pair
    ours = Llama.from_pretrained(path).eval()
    x = tokens(ours.cfg.vocab_size)
    d = (ours(x).float() - hf(x).logits.float()).abs().max().item()
    assert d <= 1e-4, f"{name}: max |dlogits| {d}"


@torch.no_grad()
def test_bf16_within_noise(pair):
    """bf16 error against the fp32 oracle is no worse than transformers' own bf16 error."""
    name, path, hf = pair
    x = tokens(hf.config.vocab_size)
    ref = hf(x).logits.float()
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours16 = Llama.from_pretrained(path, dtype=torch.bfloat16).eval()
    err_hf = (hf16(x).logits.float() - ref).abs().max().item()
    err_ours = (ours16(x).float() - ref).abs().max().item()
    assert err_ours <= 1.5 * err_hf + 1e-3, f"{name}: ours {err_ours} vs transformers {err_hf}"


@torch.no_grad()
def test_round_trip_through_transformers(pair, tmp_path):
    """ours -> save_pretrained -> transformers gives the same logits; tied models write no lm_head."""
    name, path, hf = pair
    ours = Llama.from_pretrained(path)
    out = str(tmp_path / "saved")
    ours.save_pretrained(out)
    keys = load_file(os.path.join(out, "model.safetensors")).keys()
    assert ("lm_head.weight" in keys) == (not ours.cfg.tie_embeddings)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = tokens(ours.cfg.vocab_size)
    assert (back(x).logits - hf(x).logits).abs().max().item() <= 1e-5
    assert type(back) is type(hf)


@torch.no_grad()
def test_sharded_checkpoint(tmp_path):
    path = str(tmp_path / "src")
    hf = make_hf("llama3", path)
    ours = Llama.from_pretrained(path)
    out = str(tmp_path / "sharded")
    ours.save_pretrained(out, max_shard_bytes=100_000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 2 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    x = tokens(256)
    again = Llama.from_pretrained(out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (again(x) - hf(x).logits).abs().max().item() <= 1e-5
    assert (back(x).logits - hf(x).logits).abs().max().item() <= 1e-5


def test_rope_parameters_and_rope_scaling_spellings(tmp_path):
    """Both config.json spellings of RoPE settings give the same model."""
    path = str(tmp_path / "m")
    make_hf("llama31", path)
    d = json.load(open(os.path.join(path, "config.json")))
    rope = d.get("rope_parameters") or {**d["rope_scaling"], "rope_theta": d["rope_theta"]}
    old = {k: v for k, v in d.items() if k != "rope_parameters"}
    old.update(rope_theta=rope["rope_theta"], rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"})
    new = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = rope
    a, b = LlamaConfig.from_hf(old), LlamaConfig.from_hf(new)
    assert a.rope_theta == b.rope_theta == 500000.0
    assert a.rope_scaling["factor"] == b.rope_scaling["factor"] == 8.0
    # what we write from a transformers-5 file carries both spellings: a reader of either one alone
    # (transformers 4 and vLLM on it read only rope_theta/rope_scaling) gets the same RoPE
    out = b.to_hf()
    for only in ({k: v for k, v in out.items() if k != "rope_parameters"},
                 {k: v for k, v in out.items() if k not in ("rope_scaling", "rope_theta")}):
        c = LlamaConfig.from_hf(only)
        assert (c.rope_theta, c.rope_scaling) == (b.rope_theta, b.rope_scaling)


def test_misplaced_rope_layout_is_caught(tmp_path):
    """The parity test can fail: Meta's interleaved q/k row order (the classic conversion bug)
    changes the logits far beyond the tolerance."""
    path = str(tmp_path / "m")
    hf = make_hf("llama3", path)
    ours = Llama.from_pretrained(path)
    with torch.no_grad():
        w = ours.layers[0].self_attn.q_proj.weight
        n, hd = 4, w.shape[0] // 4
        w.copy_(w.view(n, hd // 2, 2, -1).transpose(1, 2).reshape_as(w))
        x = tokens(256)
        assert (ours(x) - hf(x).logits).abs().max().item() > 1e-2


@torch.no_grad()
def test_missing_rope_scaling_is_caught(tmp_path):
    """Likewise for llama3 RoPE scaling: ignoring it changes the logits measurably."""
    path = str(tmp_path / "m")
    hf = make_hf("llama32", path)
    ours = Llama.from_pretrained(path)
    ours.cfg.rope_scaling, ours._inv_freq = None, None
    x = tokens(256, T=64)
    assert (ours(x) - hf(x).logits).abs().max().item() > 1e-2


LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)


def edit_config(path, **changes):
    """Rewrites config.json with `changes` (a value of None deletes the key); -> the new dict."""
    f = os.path.join(path, "config.json")
    d = json.load(open(f))
    d.update(changes)
    d = {k: v for k, v in d.items() if v is not None}
    json.dump(d, open(f, "w"))
    return d


def rope_key(d):
    """The RoPE dict of the config, in whichever spelling the installed transformers wrote."""
    return "rope_parameters" if "rope_parameters" in d else "rope_scaling"


@torch.no_grad()
@pytest.mark.parametrize("name, edit", [
    # both RoPE spellings present and disagreeing: transformers believes rope_scaling
    ("llama3", lambda d: dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                              rope_scaling={**LLAMA3_ROPE, "rope_theta": 10000.0})),
    # llama3 scaling with a top-level original_max_position_embeddings (it wins over the inner one)
    ("llama3", lambda d: {rope_key(d): {**LLAMA3_ROPE, "rope_theta": 500000.0},
                          "original_max_position_embeddings": 48}),
    # llama3 scaling without original_max_position_embeddings: max_position_embeddings stands in
    ("llama3", lambda d: {rope_key(d): {k: v for k, v in {**LLAMA3_ROPE, "rope_theta": 500000.0}.items()
                                             if k != "original_max_position_embeddings"}}),
    ("llama3", lambda d: dict(hidden_act="swish")),                  # transformers' name for silu
    ("qwen2", lambda d: dict(mlp_bias=True)),                        # Qwen2 has no MLP bias: ignored
    ("qwen2", lambda d: dict(use_sliding_window=True, sliding_window=8, max_window_layers=2, layer_types=None)),
], ids=["both-rope-keys", "top-level-original-max", "no-original-max", "swish", "qwen2-mlp-bias", "qwen2-no-window"])
def test_config_variants_read_as_transformers_reads_them(tmp_path, name, edit):
    path = str(tmp_path / "m")
    make_hf(name, path)
    d = json.load(open(os.path.join(path, "config.json")))
    edit_config(path, **edit(d))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    x = tokens(256, T=80)  # past original_max_position_embeddings and the window
    assert (Llama.from_pretrained(path)(x) - hf(x).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("edit, msg", [
    (lambda d: {rope_key(d): {k: v for k, v in LLAMA3_ROPE.items() if k != "factor"}}, "'factor'"),
    (lambda d: {rope_key(d): {k: v for k, v in LLAMA3_ROPE.items() if k != "low_freq_factor"}},
     "'low_freq_factor'"),
    (lambda d: dict(num_key_value_heads=3), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (lambda d: {rope_key(d): {**LLAMA3_ROPE, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
])
def test_config_errors_name_the_key(ckpt, edit, msg):
    d = json.load(open(os.path.join(ckpt, "config.json")))
    edit_config(ckpt, **edit(d))
    with pytest.raises(ValueError, match=f"config.json: .*{msg}"):
        Llama.from_pretrained(ckpt)


def test_attention_dropout_is_said_not_applied(ckpt):
    edit_config(ckpt, attention_dropout=0.1)
    with pytest.warns(UserWarning, match="attention_dropout 0.1 is not applied"):
        Llama.from_pretrained(ckpt)


def test_tied_head_that_differs_is_refused(tmp_path):
    """tie_word_embeddings with an lm_head.weight in the file: the same tensor loads; a different one is
    refused (transformers would use it, vLLM the embedding)."""
    path = str(tmp_path / "m")
    make_hf("llama32", path)
    rewrite(path, lambda sd: sd.__setitem__("lm_head.weight", sd["model.embed_tokens.weight"].clone()))
    Llama.from_pretrained(path)
    rewrite(path, lambda sd: sd.__setitem__("lm_head.weight", sd["lm_head.weight"] + 1))
    with pytest.raises(ValueError, match="tie_word_embeddings is true but .* holds an 'lm_head.weight' that differs"):
        Llama.from_pretrained(path)


def test_broken_index_is_named(tmp_path):
    path = str(tmp_path / "m")
    make_hf("llama3", path)
    index = os.path.join(path, "model.safetensors.index.json")
    for text, msg in [("{", "invalid JSON"), ("{}", "'weight_map' is missing")]:
        open(index, "w").write(text)
        with pytest.raises(ValueError, match=f"model.safetensors.index.json: .*{msg}"):
            Llama.from_pretrained(path)


def test_seeded_keys_do_not_collide():
    """model.seeded: a deterministic 63-bit seed, different for every key, however its numbers are arranged
    (arithmetic mixing collides: seed * 1000 + epoch, or a polynomial whose nesting equals a longer key)."""
    from model import seeded
    keys = {(name, *k) for name in ("order", "rollout") for k in
            [(s, e) for s in range(-3, 30) for e in range(0, 1001, 50)] + [(0,), (0, 0, 0), (1000,)]}
    seeds = [seeded(*k) for k in keys]
    assert len(set(seeds)) == len(keys) and all(0 <= s < 2 ** 63 for s in seeds)
    assert seeded("a", seeded("a", 1, 2), 3) != seeded("a", 1, 2, 3)
    assert seeded("order", 2, 5) == seeded("order", 2, 5)  # (a pure function: a resumed run gets the same)


def test_grad_checkpoint_recomputes_and_gives_the_same_gradients(tmp_path):
    """--grad-checkpoint: each block runs twice (forward, then again in backward) and the gradients are
    those of the plain model, with a packed (block-diagonal) mask too. load_model passes the flag."""
    import common
    path = str(tmp_path / "m")
    make_hf("llama3", path)
    x = tokens(256, B=1, T=40)
    doc_ids = torch.tensor([[0] * 15 + [1] * 25])
    pos = torch.cat([torch.arange(15), torch.arange(25)])[None]
    grads, calls = [], []
    for ckpt in (False, True):
        model = common.load_model(path, torch.device("cpu"), grad_checkpoint=ckpt).train()
        n = [0]
        model.layers[0].register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))  # (recompute: no post-hook)
        model(x, targets=x.roll(-1, 1), position_ids=pos, doc_ids=doc_ids).sum().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
        calls.append(n[0])
    assert calls == [1, 2]
    assert max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0]) < 1e-6


@torch.no_grad()
@pytest.mark.parametrize("name", ["qwen2", "llama2"])  # GQA and not: two attention branches take a mask
def test_packed_documents_equal_separate_forwards(tmp_path, name):
    path = str(tmp_path / "m")
    make_hf(name, path)
    model = Llama.from_pretrained(path).eval()
    docs = [tokens(256, 1, T, seed=T)[0] for T in (5, 11, 7)]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    doc = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    packed = model(ids, position_ids=pos, doc_ids=doc)[0]
    alone = torch.cat([model(d[None])[0] for d in docs])
    assert (packed - alone).abs().max().item() <= 1e-5


# ---- corrupt or unsupported checkpoints: one clear error naming the problem


@torch.no_grad()
def test_config_without_architectures_gets_one(tmp_path):
    # a config.json written by config.save_pretrained alone has no `architectures`, by which vLLM picks the
    # model class: the saved checkpoint names it (and still loads in transformers as the same model)
    src = str(tmp_path / "src")
    hf = make_hf("qwen2", src)
    cfg = json.load(open(os.path.join(src, "config.json")))
    del cfg["architectures"]
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    out = str(tmp_path / "out")
    Llama.from_pretrained(src).save_pretrained(out)
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == ["Qwen2ForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(back).__name__ == "Qwen2ForCausalLM" and type(back) is type(hf)


def test_saved_dtype_is_what_transformers_reads(tmp_path):
    # a transformers-5 bf16 checkpoint carries "dtype": "bfloat16"; saved by us in fp32 it must read as fp32
    # (and the other way round), whichever of dtype / torch_dtype the reader looks at
    src = str(tmp_path / "src")
    make_hf("llama3", src).to(torch.bfloat16).save_pretrained(src)
    ours = Llama.from_pretrained(src)
    for dtype in (torch.float32, torch.bfloat16):
        out = str(tmp_path / str(dtype))
        ours.save_pretrained(out, dtype=dtype)
        cfg = json.load(open(os.path.join(out, "config.json")))
        name = str(dtype).removeprefix("torch.")
        assert cfg["dtype"] == cfg["torch_dtype"] == name
        back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
        assert next(back.parameters()).dtype == dtype


@pytest.fixture
def ckpt(tmp_path):
    path = str(tmp_path / "m")
    make_hf("llama3", path)
    return path


def rewrite(path, fn):
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing .*layers.1.mlp.up_proj.weight"):
        Llama.from_pretrained(ckpt)


def test_unexpected_tensor(ckpt):
    rewrite(ckpt, lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        Llama.from_pretrained(ckpt)


def test_misshaped_tensor(ckpt):
    rewrite(ckpt, lambda sd: sd.__setitem__("model.norm.weight", torch.zeros(63)))
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(63,\), expected \(64,\)"):
        Llama.from_pretrained(ckpt)


def test_truncated_file(ckpt):
    f = os.path.join(ckpt, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: cannot read safetensors"):
        Llama.from_pretrained(ckpt)


def test_missing_config(ckpt):
    os.remove(os.path.join(ckpt, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        Llama.from_pretrained(ckpt)


def test_unsupported_config_fields(ckpt):
    f = os.path.join(ckpt, "config.json")
    d = json.load(open(f))
    qwen_window = {"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 1}  # layer 1 slides
    for bad, msg in [(qwen_window, "sliding-window"), ({**qwen_window, "layer_types": None, "sliding_window": 8},
                                                       "sliding-window"),
                     ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
                     ({**qwen_window, "max_window_layers": None}, "sliding-window"),
                     ({"model_type": "mistral"}, "mistral"),
                     ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}, "yarn"),
                     ({"hidden_act": "gelu"}, "gelu")]:
        json.dump({**d, **bad}, open(f, "w"))
        with pytest.raises(ValueError, match=msg):
            Llama.from_pretrained(ckpt)


def test_atomic_save_keeps_old_checkpoint_on_failure(ckpt, tmp_path, monkeypatch):
    model = Llama.from_pretrained(ckpt)
    out = str(tmp_path / "out")
    model.save_pretrained(out)
    before = open(os.path.join(out, "model.safetensors"), "rb").read()
    import model as model_mod

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(model_mod, "save_file", boom)
    with pytest.raises(OSError):
        model.save_pretrained(out)
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == before
    assert not os.path.exists(tmp_path / ".out.tmp")  # the half-written temp directory is gone


def test_a_save_after_a_crash_between_the_renames_takes_the_old_one_back(ckpt, tmp_path):
    """A crash between replace_dir's renames leaves out.old and no out. The next save (one with no find_checkpoint
    before it: sft.py's default base) treats out.old as the old checkpoint: its other files go along into the new
    one and out.old is gone, not left beside it for good."""
    model = Llama.from_pretrained(ckpt)
    out = tmp_path / "out"
    model.save_pretrained(str(out))
    (out / "notes.txt").write_text("keep me")
    (out / "metrics.jsonl.tmp").write_text("half a log")  # left by a kill mid-write: not carried along
    (out / ".write-test-x1").mkdir()
    os.rename(out, tmp_path / "out.old")
    model.save_pretrained(str(out))
    assert (out / "notes.txt").read_text() == "keep me" and (out / "model.safetensors").exists()
    assert not (out / "metrics.jsonl.tmp").exists() and not (out / ".write-test-x1").exists()
    assert sorted(f for f in os.listdir(tmp_path) if "out" in f) == ["out"]  # no out.old, no temp directory


@torch.no_grad()
def test_rope_dict_theta_wins_over_a_top_level_one(tmp_path):
    """A file with theta in its rope dict and a disagreeing top-level rope_theta: transformers keeps the
    dict's, so must we."""
    path = str(tmp_path / "m")
    make_hf("llama3", path)
    d = json.load(open(os.path.join(path, "config.json")))
    edit_config(path, **{rope_key(d): {**LLAMA3_ROPE, "rope_theta": 500000.0}, "rope_theta": 10000.0})
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    x = tokens(256, T=80)
    assert (Llama.from_pretrained(path)(x) - hf(x).logits).abs().max().item() <= 1e-5


def test_rmsnorm_bitwise_as_transformers_in_bf16():
    """The cast order (weight * normed.to(bf16)), not only the fp32 statistics: bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from model import RMSNorm
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    ours, theirs = RMSNorm(64, 1e-5), LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        w = torch.randn(64, generator=torch.Generator().manual_seed(1))
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
    assert torch.equal(ours.bfloat16()(x), theirs.bfloat16()(x))


def test_loads_in_the_dtype_asked_for(tmp_path):
    make_hf("llama32", str(tmp_path / "m"))
    model = Llama.from_pretrained(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}



@torch.no_grad()
@pytest.mark.parametrize("arch, heads", [("llama", 4), ("qwen2", 64)])
def test_a_config_of_only_the_required_keys_reads_as_transformers_reads_it(tmp_path, arch, heads):
    """Every optional key left out (rms_norm_eps, rope_theta, num_key_value_heads, head_dim,
    tie_word_embeddings, ...): the defaults are transformers' own, not ours (an eps of 1e-5 for its 1e-6, a
    tied head for its untied one would load and quietly compute another model). Qwen2's is 32 kv heads
    when the key is absent (as many as the heads only when it is null), hence its 64 heads of 2 here."""
    path = str(tmp_path / "m")
    d = dict(model_type=arch, vocab_size=256, hidden_size=2 * heads, num_hidden_layers=2, num_attention_heads=heads,
             intermediate_size=160)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**d, initializer_range=0.2))
    for n, p in hf.named_parameters():
        if n.endswith("bias") or "norm" in n:
            p.normal_(1.0 if "norm" in n else 0.0, 0.1)
    hf.save_pretrained(path)
    json.dump({**d, "architectures": [type(hf).__name__]}, open(os.path.join(path, "config.json"), "w"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    # what the test relies on: transformers' defaults differ from the tempting ones
    assert (hf.config.rms_norm_eps, hf.config.tie_word_embeddings) == (1e-6, False)
    assert hf.config.num_key_value_heads == {"llama": heads, "qwen2": 32}[arch]
    x = tokens(256)
    assert (Llama.from_pretrained(path)(x) - hf(x).logits).abs().max().item() <= 1e-5


def test_swish_is_written_back_as_silu(tmp_path):
    """The same activation: vLLM's registry knows it only as silu, so the saved config.json says silu."""
    path, out = str(tmp_path / "m"), str(tmp_path / "out")
    make_hf("llama3", path)
    edit_config(path, hidden_act="swish")
    Llama.from_pretrained(path).save_pretrained(out)
    assert json.load(open(os.path.join(out, "config.json")))["hidden_act"] == "silu"


def test_shards_smaller_than_a_tensor(tmp_path):
    """max_shard_bytes below every tensor's size: one tensor per shard, no empty shard, all indexed."""
    path, out = str(tmp_path / "m"), str(tmp_path / "out")
    make_hf("llama3", path)
    model = Llama.from_pretrained(path)
    model.save_pretrained(out, max_shard_bytes=1)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    assert len(files) == len(model.state_dict()) == len(index) and sorted(set(index.values())) == files
    assert all(len(load_file(os.path.join(out, f))) == 1 for f in files)
    assert all(torch.equal(a, b) for a, b in zip(Llama.from_pretrained(out).state_dict().values(),
                                                 model.state_dict().values()))


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    """Two shards holding the same tensor: which one wins would depend on file order, so it is an error."""
    path = str(tmp_path / "m")
    make_hf("llama3", path)
    Llama.from_pretrained(path).save_pretrained(path, max_shard_bytes=100_000)
    first, last = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0::2][:2]
    sd = load_file(os.path.join(path, last))
    sd["model.embed_tokens.weight"] = load_file(os.path.join(path, first))["model.embed_tokens.weight"]
    save_file(sd, os.path.join(path, last), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{last}: tensor 'model.embed_tokens.weight' also in {first}"):
        Llama.from_pretrained(path)


def test_the_default_base_checkpoint_is_an_hf_llama(tmp_path):
    """tasks.make_base_checkpoint, the model `python sft.py` starts from: transformers loads it as a Llama with
    tied embeddings, initialised as HF initialises one for training (N(0, 0.02) matrices, unit norms); its EOS,
    in config.json and generation_config.json, is the chat template's end-of-turn token, and it has no BOS
    (the template writes none). The same seed gives the same model."""
    import tasks
    from tokenizers import Tokenizer as RawTokenizer
    sft = tasks.make_tasks(0, n_sft=96, n_prefs=2, n_rl=2, n_eval=2)[0]
    kw = dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128, vocab_size=300)
    path = tasks.make_base_checkpoint(str(tmp_path / "a"), sft, **kw)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    gen = transformers.GenerationConfig.from_pretrained(path)
    eos = RawTokenizer.from_file(os.path.join(path, "tokenizer.json")).token_to_id("<|endoftext|>")
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert hf.config.eos_token_id == eos and gen.eos_token_id in (eos, [eos])
    assert hf.config.bos_token_id is None and gen.bos_token_id is None
    for name, p in hf.named_parameters():
        if p.dim() == 2:
            assert abs(p.std().item() - 0.02) < 0.002 and abs(p.mean().item()) < 0.002, name
        else:
            assert torch.equal(p, torch.ones_like(p)), name
    again = tasks.make_base_checkpoint(str(tmp_path / "b"), sft, **kw)
    w = [load_file(os.path.join(d, "model.safetensors")) for d in (path, again)]
    assert w[0].keys() == w[1].keys() and all(torch.equal(w[0][k], w[1][k]) for k in w[0])


def test_per_token_outputs_are_tensors_of_their_own():
    """With targets the model returns (B, T) log-probs (and lsq) computed as (B*T,): returned as views, FSDP2 warns on
    every forward of the root module ("returned a view tensor"), once per rank and step under torchrun."""
    from model import LlamaConfig
    torch.manual_seed(0)
    m = Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64))
    x = tokens(64, B=2, T=5)
    logp = m(x, targets=x)
    assert logp.shape == (2, 5) and logp._base is None
    for t in m(x, targets=x, return_lsq=True):
        assert t.shape == (2, 5) and t._base is None


def test_compiled_blocks_leave_room_for_every_variant(monkeypatch):
    # the blocks of PPO's policy, reference and value model share one compiled code object, recompiled per grad mode,
    # weight dtype and requires_grad, and length (7 variants measured); at Dynamo's default limit of 8 one more would
    # send every block back to eager
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)).compile_blocks()
    assert torch._dynamo.config.recompile_limit >= 64
