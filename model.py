"""
A hand-written Llama-family decoder that reads and writes Hugging Face checkpoints.

Covers Llama 2, 3, 3.1, 3.2 (GQA, rope_theta, llama3 RoPE scaling, tied embeddings) and Qwen2/2.5
(biases on q/k/v). Parameter names are HF's minus the leading "model.", and RoPE uses HF's rotate-half
layout, so loading is a prefix strip with strict checking and no weight permutation.

    model = Llama.from_pretrained("path/to/hf-checkpoint", device="cuda", dtype=torch.bfloat16)
    logits = model(input_ids)                      # (B, T, V)
    hidden = model(input_ids, return_hidden=True)  # (B, T, C): the loss can then skip full logits
    model.save_pretrained("out/dir")               # config.json + safetensors (+ index), atomically

Tested for exact parity with transformers in tests/test_model.py.
"""
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# -----------------------------------------------------------------------------
# config


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096              # hidden_size
    n_layers: int = 32           # num_hidden_layers
    n_heads: int = 32            # num_attention_heads
    n_kv_heads: int = 32         # num_key_value_heads (GQA when < n_heads)
    head_dim: int = 0            # 0 -> dim // n_heads
    ffn_dim: int = 11008         # intermediate_size: read it, never recompute it
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # llama3 scaling: {rope_type, factor, low/high_freq_factor, original_max_...}
    tie_embeddings: bool = False
    qkv_bias: bool = False       # Qwen2 has biases on q/k/v projections
    max_seq_len: int = 4096      # max_position_embeddings (informational: RoPE is computed per position)
    hf: dict = field(default_factory=dict, repr=False)  # the source config.json, written back on save

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"

    @classmethod
    def from_hf(cls, d: dict, name: str = "config.json"):
        """Builds the config from an HF config.json dict; fields we do not implement are an error."""
        arch = d.get("model_type", "llama")
        if arch not in ("llama", "qwen2"):
            raise ValueError(f"{name}: model_type {arch!r} is not supported (llama, qwen2 are)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{name}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
        if d.get("mlp_bias") or (arch == "llama" and d.get("attention_bias")):
            raise ValueError(f"{name}: attention_bias/mlp_bias on a llama model is not supported")
        layer_types = d.get("layer_types") or []
        if d.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
            raise ValueError(f"{name}: sliding-window attention is not supported")
        # RoPE: newer transformers writes `rope_parameters` (with rope_theta inside), older `rope_scaling`
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"{name}: rope type {kind!r} is not supported (default, llama3 are)")
        return cls(
            vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0, ffn_dim=d["intermediate_size"],
            norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=dict(rope) if kind == "llama3" else None,
            tie_embeddings=bool(d.get("tie_word_embeddings", False)), qkv_bias=arch == "qwen2",
            max_seq_len=d.get("max_position_embeddings", 4096), hf=dict(d))

    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict:
        """The config.json to write: the source one (unknown keys kept) with our fields and dtype."""
        d = dict(self.hf) or {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                              "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                              "initializer_range": 0.02, "bos_token_id": None, "eos_token_id": None}
        d.update(vocab_size=self.vocab_size, hidden_size=self.dim, num_hidden_layers=self.n_layers,
                 num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                 head_dim=self.head_dim, intermediate_size=self.ffn_dim, rms_norm_eps=self.norm_eps,
                 tie_word_embeddings=self.tie_embeddings, max_position_embeddings=self.max_seq_len,
                 torch_dtype=str(dtype).removeprefix("torch."))
        if "rope_parameters" in d:  # keep the spelling of the source file
            d["rope_parameters"] = {**(self.rope_scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta}
        else:
            d.update(rope_theta=self.rope_theta, rope_scaling=self.rope_scaling)
        return d


# -----------------------------------------------------------------------------
# building blocks


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies, with llama3 scaling when configured (as HF computes them)."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    s = cfg.rope_scaling
    if s:  # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x, cos, sin):
    """HF's rotate-half RoPE: pairs (i, i + D/2). x (B, H, T, D), cos/sin (B, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, cast back, then scale: the order HF uses (matters in bf16)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, kv=None, cache_pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)   # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # rotate before the GQA repeat
        if kv is not None:
            # KV cache: write this step's keys/values into their slots of the preallocated
            # (B, nkv, S, hd) buffers, then attend over all S slots (the mask hides empty ones).
            # Static shapes, no reallocation: friendly to CUDA graphs.
            kv[0].index_copy_(2, cache_pos, k)
            kv[1].index_copy_(2, cache_pos, v)
            k, v = kv
        gqa = self.nkv != self.nh
        if mask is None:  # plain causal: lets SDPA pick its fastest (flash) kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv=None, cache_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# the model


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        # NOTE: under `with torch.device("meta")` no data exists after __init__: call
        # init_weights() (training from scratch) or load a checkpoint (from_pretrained).
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # tied models have no lm_head module at all: the output projection *is* the embedding,
        # so there is one tensor to load, shard and save (HF writes no lm_head.weight then).
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.grad_checkpoint = False  # recompute each block in backward: trades compute for memory
        self._inv_freq = None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, C) output projection, for losses that fuse it with the log-softmax (kernels/)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """HF's init for training from scratch: N(0, std) matrices, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    def rope(self, position_ids, dtype):
        """cos, sin (B, 1, T, head_dim) for integer positions (B, T); angles in fp32 like HF."""
        if self._inv_freq is None or self._inv_freq.device != position_ids.device:
            self._inv_freq = rope_inv_freq(self.cfg).to(position_ids.device)
        freqs = position_ids[..., None].float() * self._inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]          # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids, position_ids=None, doc_ids=None, mask=None, kv_cache=None,
                cache_pos=None, return_hidden=False):
        """
        input_ids (B, T). Attention is causal; optionally also
          doc_ids (B, T): packed sequences, a token attends only to earlier tokens of the same doc id
                          (padding can take its own id); position_ids should then restart per document.
          mask (B, 1, T, S) bool: an explicit attention mask (True = attend), e.g. for decoding.
          kv_cache: list of (k, v) buffers (B, nkv, S, hd) per layer, written at slots cache_pos (T,).
        Returns logits (B, T, V) in the parameters' dtype, or the final normed hidden (B, T, C).
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        if doc_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal  # (B, T, T)
            mask = mask[:, None]                                          # (B, 1, T, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            kv = None if kv_cache is None else kv_cache[i]
            if self.grad_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, kv, cache_pos,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv, cache_pos)
        x = self.norm(x)
        return x if return_hidden else F.linear(x, self.lm_head_weight)

    # -------------------------------------------------------------------------
    # HF checkpoints in and out

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32):
        """Loads config.json + model.safetensors or shards listed in model.safetensors.index.json.
        Strict: every parameter must be present once with the right shape, nothing extra.
        Built on the meta device and filled tensor by tensor: no second full copy in memory."""
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path} not found: not a Hugging Face checkpoint directory")
        with open(cfg_path) as f:
            cfg = LlamaConfig.from_hf(json.load(f), cfg_path)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        # which file holds which tensor
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            weight_map = None
        else:
            raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        sd, seen = {}, {}
        for fname in files:
            fpath = os.path.join(path, fname)
            try:
                with safe_open(fpath, framework="pt", device="cpu") as f:
                    for key in f.keys():
                        name = key.removeprefix("model.")
                        if name.endswith("rotary_emb.inv_freq"):
                            continue  # old exports saved this buffer; we recompute it
                        if name == "lm_head.weight" and cfg.tie_embeddings:
                            continue  # tied: the output projection is the embedding
                        if name not in expected:
                            raise ValueError(f"{fpath}: unexpected tensor {key!r}")
                        if name in seen:
                            raise ValueError(f"{fpath}: tensor {key!r} also in {seen[name]}")
                        t = f.get_tensor(key)
                        if t.shape != expected[name]:
                            raise ValueError(f"{fpath}: tensor {key!r} has shape {tuple(t.shape)}, "
                                             f"expected {tuple(expected[name])}")
                        sd[name], seen[name] = t.to(device=device, dtype=dtype), fname
            except ValueError:
                raise
            except Exception as e:  # header or data truncated/corrupt, file missing
                raise ValueError(f"{fpath}: cannot read safetensors file ({e})") from e
        missing = sorted(set(expected) - set(sd))
        if missing:
            raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
        model.load_state_dict(sd, strict=True, assign=True)
        return model

    def save_pretrained(self, path, state_dict=None, max_shard_bytes=5 * 2**30, dtype=None, atomic=True):
        """Writes config.json and HF-named safetensors (sharded with an index past max_shard_bytes),
        atomically: everything goes to a temp dir next to `path`, which is then renamed into place
        (atomic=False writes straight into `path`, for callers that swap a whole directory themselves).
        `state_dict` lets FSDP callers pass the gathered full state dict (rank 0 only)."""
        sd = self.state_dict() if state_dict is None else state_dict
        sd = {("" if k.startswith("lm_head.") else "model.") + k: v.detach().to("cpu", dtype or v.dtype).contiguous()
              for k, v in sd.items()}
        dtype = next(iter(sd.values())).dtype
        # greedy shards in parameter order
        shards, cur, size = [], {}, 0
        for k, v in sd.items():
            n = v.numel() * v.element_size()
            if cur and size + n > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + n
        shards.append(cur)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        if atomic:
            tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(path))
        else:
            tmp = path
            os.makedirs(tmp, exist_ok=True)
        try:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(self.cfg.to_hf(dtype), f, indent=2)
            meta = {"format": "pt"}
            if len(shards) == 1:
                save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata=meta)
            else:
                weight_map = {}
                for i, shard in enumerate(shards):
                    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    save_file(shard, os.path.join(tmp, fname), metadata=meta)
                    weight_map.update({k: fname for k in shard})
                total = sum(v.numel() * v.element_size() for v in sd.values())
                with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            if atomic:
                replace_dir(tmp, path)
        except BaseException:
            if atomic:
                shutil.rmtree(tmp, ignore_errors=True)
            raise


def replace_dir(tmp, path):
    """Moves a fully written directory `tmp` to `path`, replacing an existing one; the old one is
    only deleted once the new one is in place, so a crash leaves either the old or the new."""
    old = None
    if os.path.exists(path):
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)
