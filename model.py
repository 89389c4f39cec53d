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
import hashlib
import json
import math
import os
import shutil
import warnings
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
        """Builds the config from an HF config.json dict. What we do not implement and would change the outputs
        (another model_type or activation, llama biases, sliding windows, another rope type) is an error;
        attention_dropout a warning (training only); keys we do not know are kept (self.hf) but not read."""
        arch = d.get("model_type", "llama")
        if arch not in ("llama", "qwen2"):
            raise ValueError(f"{name}: model_type {arch!r} is not supported (llama, qwen2 are)")
        need = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
        missing = [k for k in need if not isinstance(d.get(k), int)]
        if missing:
            raise ValueError(f"{name}: {missing[0]!r} is missing or not a whole number")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers' ACT2FN: swish is silu
            raise ValueError(f"{name}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
        if arch == "llama" and (d.get("mlp_bias") or d.get("attention_bias")):  # (qwen2: q/k/v bias, always)
            raise ValueError(f"{name}: attention_bias/mlp_bias on a llama model is not supported")
        # kv heads: absent or null is as many as the heads, except that transformers' Qwen2Config reads an
        # absent key as 32 (its signature default) and only a null one as the heads
        n = d["num_attention_heads"]
        nkv = d.get("num_key_value_heads", 32 if arch == "qwen2" else None) or n
        if not isinstance(nkv, int) or n % nkv:
            raise ValueError(f"{name}: num_attention_heads {n} is not a multiple of num_key_value_heads {nkv!r}")
        # sliding windows: transformers' layer_types, which a Qwen2 config without them derives from
        # use_sliding_window, sliding_window (default 4096) and max_window_layers (default 28) as here
        layer_types = d.get("layer_types") or [
            "sliding_attention" if arch == "qwen2" and d.get("use_sliding_window") and d.get("sliding_window", 4096)
            is not None and i >= (d.get("max_window_layers", 28) or 0) else "full_attention"
            for i in range(d["num_hidden_layers"])]
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"{name}: sliding-window attention is not supported")
        # RoPE: newer transformers writes `rope_parameters` (with rope_theta inside), older `rope_scaling`;
        # given both, transformers believes rope_scaling
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"{name}: rope type {kind!r} is not supported (default, llama3 are)")
        if kind == "llama3":
            # as transformers: a top-level original_max_position_embeddings wins, else the rope dict's own, else
            # max_position_embeddings; factor and the two frequency factors are required
            rope["original_max_position_embeddings"] = d.get("original_max_position_embeddings") or rope.get(
                "original_max_position_embeddings") or d.get("max_position_embeddings")
            bad = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if not isinstance(rope.get(k), (int, float))]
            if bad:
                raise ValueError(f"{name}: llama3 rope scaling needs a number for {bad[0]!r}")
            if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
                raise ValueError(f"{name}: partial_rotary_factor with llama3 rope scaling is not supported")
        if d.get("attention_dropout"):
            warnings.warn(f"{name}: attention_dropout {d['attention_dropout']} is not applied (nanopost's model has "
                          "no dropout; transformers would apply it in training)")
        return cls(
            vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
            n_heads=n, n_kv_heads=nkv,
            head_dim=d.get("head_dim") or 0, ffn_dim=d["intermediate_size"],
            norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=dict(rope) if kind == "llama3" else None,
            tie_embeddings=bool(d.get("tie_word_embeddings", False)), qkv_bias=arch == "qwen2",
            max_seq_len=d.get("max_position_embeddings", 4096), hf=dict(d))

    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict:
        """The config.json to write: the source one (unknown keys kept) with our fields and dtype."""
        name = str(dtype).removeprefix("torch.")
        d = dict(self.hf) or {"model_type": "llama", "hidden_act": "silu", "attention_bias": False,
                              "mlp_bias": False, "initializer_range": 0.02, "bos_token_id": None, "eos_token_id": None}
        # vLLM picks the model class by `architectures`; a config.json written by config.save_pretrained
        # alone has none (from_hf reads a missing model_type as llama, so the output says so)
        arch = d.setdefault("model_type", "llama")
        if d.get("hidden_act") == "swish":  # the same function; vLLM knows it as silu
            d["hidden_act"] = "silu"
        d.setdefault("architectures", [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]])
        d.update(vocab_size=self.vocab_size, hidden_size=self.dim, num_hidden_layers=self.n_layers,
                 num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                 head_dim=self.head_dim, intermediate_size=self.ffn_dim, rms_norm_eps=self.norm_eps,
                 tie_word_embeddings=self.tie_embeddings, max_position_embeddings=self.max_seq_len,
                 dtype=name, torch_dtype=name)
        # both spellings: transformers 5 reads `dtype` (and would believe a stale one from the source file),
        # transformers 4 and older tools `torch_dtype`
        # RoPE in both spellings too: transformers 4 (and vLLM on it) reads rope_theta/rope_scaling and would
        # silently take theta 10000 without scaling from a file with only transformers 5's rope_parameters
        d.update(rope_theta=self.rope_theta, rope_scaling=self.rope_scaling)
        if "rope_parameters" in d:
            d["rope_parameters"] = {**(self.rope_scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta}
        return d


# -----------------------------------------------------------------------------
# building blocks


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies, with llama3 scaling when configured (as HF computes them)."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    s = cfg.rope_scaling
    if s:  # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
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
        elif gqa:
            # SDPA's fused kernels refuse enable_gqa together with a mask and fall back to the math
            # kernel, which copies K/V once per query head (g x the KV-cache reads of a decode step).
            # Instead fold the g query heads that share a K/V head into the query-length dim:
            # (B, nkv, g*T, hd) against (B, nkv, S, hd), each of the g copies with the same mask rows.
            g = self.nh // self.nkv
            q = q.reshape(B, self.nkv, g * T, self.hd)  # head h = j*g + i reads K/V head j (HF order)
            mask = mask if T == 1 else mask.repeat(1, 1, g, 1)  # (B, 1, g*T, S), row i*T + t = row t
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(B, self.nh, T, self.hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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
    def __init__(self, cfg: LlamaConfig, body_only: bool = False):
        # NOTE: under `with torch.device("meta")` no data exists after __init__: call
        # init_weights() (training from scratch) or load a checkpoint (from_pretrained).
        # body_only: no output projection at all, for value and reward models that put their own head
        # on the final hidden states (forward(..., return_hidden=True)).
        super().__init__()
        self.cfg, self.body_only = cfg, body_only
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # tied models have no lm_head module at all: the output projection *is* the embedding,
        # so there is one tensor to load, shard and save (HF writes no lm_head.weight then).
        self.lm_head = None if cfg.tie_embeddings or body_only else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.grad_checkpoint = False  # recompute each block in backward: trades compute for memory
        self._inv_freq = None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, C) output projection, for losses that fuse it with the log-softmax (kernels/)."""
        if self.body_only:
            raise RuntimeError("this Llama was built body_only: it has no output projection (use return_hidden)")
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compile_blocks(self):
        """torch.compile each transformer block, torchtitan's recipe: per block and before FSDP2 wraps
        them. The one small graph every block shares compiles quickly, and the fused loss (opaque to the
        compiler) stays outside. generate() runs eagerly all the same (its KV cache and CUDA graph)."""
        # every block of every model (PPO's policy, reference and value model) shares Block.forward's code, so
        # its compiled variants add up: grad mode (rollouts, updates), frozen or trained weights and their dtype
        # (bf16 reference, fp32 policy on CUDA), the length turning dynamic. PPO reaches 7; past Dynamo's default
        # of 8 the blocks would run eagerly with one warning
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in self.layers:
            block.compile()
        return self

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
                cache_pos=None, return_hidden=False, targets=None, temperature=1.0, reduction="none",
                return_lsq=False):
        """
        input_ids (B, T). Attention is causal; optionally also
          doc_ids (B, T): packed sequences, a token attends only to earlier tokens of the same doc id
                          (padding can take its own id); position_ids should then restart per document.
          mask (B, 1, T, S) bool: an explicit attention mask (True = attend), e.g. for decoding.
          kv_cache: list of (k, v) buffers (B, nkv, S, hd) per layer, written at slots cache_pos (T,).
        Returns logits (B, T, V) in the parameters' dtype, or the final normed hidden (B, T, C), or with
          targets (B, T): log p(targets) (B, T) fp32 (0 where targets == -100) for reduction="none", or
          the summed NLL over the targets for reduction="sum", through the fused output-projection +
          log-softmax of kernels/ (never a full fp32 (B, T, V)). The loss is computed here, inside
          forward, so that under FSDP2 the output projection is used while it is unsharded.
          return_lsq (reduction="none"): also log sum_v p_v^2 per position (B, T), without gradient.
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
        if targets is not None:
            from kernels import fused_linear_cross_entropy, fused_linear_logprobs
            h, y = x.reshape(B * T, -1), targets.reshape(B * T)
            if reduction == "sum":  # SFT's fast path: gradient computed during the forward
                return fused_linear_cross_entropy(h, self.lm_head_weight, y, reduction="sum")
            out = fused_linear_logprobs(h, self.lm_head_weight, y, temperature=temperature, return_lsq=return_lsq)
            # (B, T) copies, not views of the (B*T,) results: FSDP2 warns about a root module returning a view
            return tuple(o.view(B, T).clone() for o in out) if return_lsq else out.view(B, T).clone()
        return x if return_hidden else F.linear(x, self.lm_head_weight)

    # -------------------------------------------------------------------------
    # HF checkpoints in and out

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, body_only=False, weights=True):
        """Loads config.json + model.safetensors or shards listed in model.safetensors.index.json.
        Strict: every parameter must be present once with the right shape, nothing extra.
        Built on the meta device and filled tensor by tensor: no second full copy in memory.
        body_only=True loads the transformer without its output projection: the body of a value model,
        from a causal LM (lm_head.weight is skipped) or from an HF *ForSequenceClassification reward model
        (whose score.weight is left for the caller: read_tensor(path, "score.weight")). weights=False: the
        config's module alone, on the meta device, for a caller that fills it from elsewhere (a resume)."""
        cfg_path = os.path.join(path, "config.json")
        d = read_json(cfg_path)
        if d is None:
            raise FileNotFoundError(f"{cfg_path} not found: not a Hugging Face checkpoint directory")
        cfg = LlamaConfig.from_hf(d, cfg_path)
        classifier = any(a.endswith("ForSequenceClassification") for a in d.get("architectures") or [])
        if classifier and not body_only:
            raise ValueError(f"{cfg_path}: {d['architectures'][0]} is a reward (sequence-classification) model "
                             "with no LM head; it can only be a value model's body")
        skip = {"lm_head.weight", "score.weight"} if body_only else set()
        with torch.device("meta"):
            model = cls(cfg, body_only=body_only)
        if not weights:
            return model
        expected = {k: v.shape for k, v in model.state_dict().items()}
        sd, seen, tied_head = {}, {}, None
        for fpath in checkpoint_files(path):
            try:
                with safe_open(fpath, framework="pt", device="cpu") as f:
                    for key in f.keys():
                        name = key.removeprefix("model.")
                        if name.endswith("rotary_emb.inv_freq") or name in skip:
                            continue  # old exports saved this buffer (we recompute it); heads we do not use
                        if name == "lm_head.weight" and cfg.tie_embeddings:
                            tied_head = (fpath, key)  # tied: the output projection is the embedding...
                            continue
                        if name not in expected:
                            raise ValueError(f"{fpath}: unexpected tensor {key!r}")
                        if name in seen:
                            raise ValueError(f"{fpath}: tensor {key!r} also in {seen[name]}")
                        t = f.get_tensor(key)
                        if t.shape != expected[name]:
                            raise ValueError(f"{fpath}: tensor {key!r} has shape {tuple(t.shape)}, "
                                             f"expected {tuple(expected[name])}")
                        sd[name], seen[name] = t.to(device=device, dtype=dtype), os.path.basename(fpath)
            except ValueError:
                raise
            except Exception as e:  # header or data truncated/corrupt, file missing
                raise ValueError(f"{fpath}: cannot read safetensors file ({e})") from e
        missing = sorted(set(expected) - set(sd))
        if missing:
            raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
        if tied_head is not None:  # ...if the file's head is the same (transformers would use a different one,
            fpath, key = tied_head  # vLLM the embedding: ambiguous)
            with safe_open(fpath, framework="pt", device="cpu") as f:
                same = torch.equal(f.get_tensor(key).to(device=device, dtype=dtype), sd["embed_tokens.weight"])
            if not same:
                raise ValueError(f"{cfg_path}: tie_word_embeddings is true but {fpath} holds an {key!r} that differs "
                                 "from the input embedding (set tie_word_embeddings to false to use it)")
        model.load_state_dict(sd, strict=True, assign=True)
        return model

    def save_pretrained(self, path, state_dict=None, max_shard_bytes=5 * 2**30, dtype=None, atomic=True):
        """Writes config.json and HF-named safetensors (sharded with an index past max_shard_bytes),
        atomically: everything goes to a temp dir next to `path`, which is then renamed into place
        (atomic=False writes straight into `path`, for callers that swap a whole directory themselves).
        `state_dict` lets FSDP callers pass the gathered full state dict (rank 0 only)."""
        if self.body_only:
            raise RuntimeError(f"save_pretrained({path!r}): a body_only Llama has no LM head to save")
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
        if atomic:
            tmp = new_dir_beside(path)
        else:
            tmp = path
            os.makedirs(tmp, exist_ok=True)
        try:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(self.cfg.to_hf(dtype), f, indent=2)
            meta = {"format": "pt"}
            umask = os.umask(0)
            os.umask(umask)

            def write(shard, fname):  # safetensors makes its files owner-only (0600): the umask's mode instead
                save_file(shard, os.path.join(tmp, fname), metadata=meta)
                os.chmod(os.path.join(tmp, fname), 0o666 & ~umask)
            if len(shards) == 1:
                write(shards[0], "model.safetensors")
            else:
                weight_map = {}
                for i, shard in enumerate(shards):
                    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    write(shard, fname)
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


def new_dir_beside(path):
    """An empty directory next to `path` to write its replacement into, for replace_dir. What a killed
    earlier save left there is removed first (an 8B checkpoint is 16 GB or more). Made by os.makedirs,
    so it gets the umask's mode as transformers' saves do (not mkdtemp's owner-only 0700, which would
    keep a vLLM server or a teammate running as another user out of the checkpoint)."""
    path = os.path.realpath(path)  # "out/sft/" is "out/sft"; a symlink's target is replaced, not the link
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What a checkpoint is made of, here or in the HF checkpoints a --out may have held: never carried from a
# directory into its replacement (an earlier save's shards, weights in another format, tokenizer files or
# optimizer state would be read as part of the new checkpoint)
CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "chat_template.jinja", "chat_template.json", "additional_chat_templates", "train_state.pt",
                    "train_state")


def checkpoint_file(name):
    return name in CHECKPOINT_FILES or name.startswith(("model.safetensors", "model-0", "pytorch_model"))


def leftover(name):
    # what a process killed mid-write leaves in a run's directory: a log's half-written .tmp (written beside, then
    # swapped in) or check_out's writability probe; not carried into the next checkpoint
    return name.endswith((".json.tmp", ".jsonl.tmp")) or name.startswith(".write-test-")


def _link(src, dst):
    try:  # a hard link: no copy, and the file outlives the old directory's removal
        os.link(src, dst)
    except OSError:  # e.g. a filesystem without hard links
        shutil.copy2(src, dst)


def replace_dir(tmp, path):
    """Moves a fully written directory `tmp` to `path` (a symlink's target), replacing an existing one;
    the old one is only deleted once the new one is in place, so a crash leaves either the old or the new.
    What else the old one holds goes along into the new one, as transformers' save_pretrained leaves other
    files alone: the run's logs (.json/.jsonl, copied: metrics.jsonl is appended to in place) and, hard-
    linked, anything else (evaluation outputs, a user's files); only the checkpoint's own files are
    replaced, and a killed write's leftovers dropped. The new files are flushed to disk (fsync) before the
    swap, so a power loss cannot leave a checkpoint in place whose shards were still in the page cache. A
    path.old left alone by a crash between the two renames (no path) is the old one: moved back first, so its
    files go along and it does not linger."""
    path = os.path.realpath(path)
    if not os.path.exists(path) and os.path.isdir(path + ".old"):
        os.rename(path + ".old", path)
    for f in os.listdir(path) if os.path.isdir(path) else []:
        src, dst = os.path.join(path, f), os.path.join(tmp, f)
        if os.path.lexists(dst) or checkpoint_file(f) or leftover(f):
            continue
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link)
        elif f.endswith((".json", ".jsonl")):
            shutil.copy2(src, dst)
        else:
            _link(src, dst)
    for f in [os.path.join(tmp, f) for f in os.listdir(tmp)] + [tmp]:  # the files, then their directory entries
        if os.path.isdir(f) or os.path.isfile(f) and not os.path.islink(f):  # (not a FIFO: opening it would block)
            _fsync(f)
    old = None
    if os.path.exists(path):
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))  # the renames themselves
    if old:
        shutil.rmtree(old, ignore_errors=True)


def read_json(path):
    """The JSON object in `path`, None if there is no such file; a file that is not one is an error naming it."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            where = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            raise ValueError(f"{path}: invalid JSON at {where}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def checkpoint_files(path):
    """The safetensors files of an HF checkpoint directory: the shards its index lists, or model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    d = read_json(index)
    if d is not None:
        shards = d.get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(n, str) for n in shards.values()):
            raise ValueError(f"{index}: 'weight_map' is missing or does not map tensor names to file names")
        return [os.path.join(path, n) for n in sorted(set(shards.values()))]
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return [os.path.join(path, "model.safetensors")]
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def read_tensor(path, key, dtype=torch.float32):
    """One tensor of an HF checkpoint by its full name (e.g. a reward model's "score.weight"), or None."""
    for fpath in checkpoint_files(path):
        with safe_open(fpath, framework="pt", device="cpu") as f:
            if key in f.keys():
                return f.get_tensor(key).to(dtype)
    return None


# -----------------------------------------------------------------------------
# generation
#
# Batched sampling with a preallocated KV cache, for RL rollouts and evaluation. A batch of B prompts
# is left-padded to the longest, P tokens, and every layer gets K/V buffers of S >= P + max_new_tokens
# slots, allocated once:
#
#   slot   0 .. P-1                  P .. P+N-1
#          [pad pad | prompt tokens] [one new token per decode step]
#
# Prefill runs the padded prompts in one forward (positions restart at 0 at each prompt's first real
# token; pad keys are masked out). Each decode step then feeds one token per row into the next slot and
# attends over all S slots, with a (B, 1, 1, S) mask of the slots written so far minus the pads. Every
# step has the same shapes and only updates tensors in place, so on CUDA the step is captured once as a
# CUDA graph and replayed: no Python or kernel-launch overhead per layer, and no host sync per token
# (sampling, the done-mask and the output buffers all stay on the device).


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, u=None):
    """Picks one token per row from logits (B, V) fp32; returns tok (B,) and its logp (B,) under the
    distribution it was drawn from: softmax(logits / temperature), restricted to the top-k / top-p set
    and renormalised. temperature == 0 is greedy (argmax), and logp is then that of the plain softmax.
    u (B, V): uniform noise in [0, 1), drawn by the caller from its own generator, so that this
    function is deterministic and CUDA-graph friendly (no RNG inside)."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        # keep the k largest (ties with the k-th are kept too, as transformers does)
        kth = logits.topk(top_k, dim=-1).values[:, -1:]               # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p, i.e. drop a
        # token when the mass of the tokens ranked above it already reaches top_p (the top one stays)
        srt, idx = logits.sort(-1, descending=True)                    # (B, V)
        p = srt.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    logp = logits.log_softmax(-1)                                      # (B, V), renormalised over the kept set
    # Gumbel-max: argmax(logp + g), g = -log(-log u) ~ Gumbel(0, 1), is an exact draw from softmax(logp).
    # fp32 u < 1 caps g at ~16.6, a tail of mass ~6e-8 we ignore. uniform_ gives u = 0 exactly about once in
    # 2^24 draws: raw, that is g = -inf, and when it falls on the only kept token (top_k=1, or top_p keeping
    # one token) every score is -inf and argmax returns token 0, outside the kept set, with logp -inf. So
    # u = 0 counts as the smallest positive float instead (g ~ -4.5, still below any other draw's).
    tok = (logp - torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))).argmax(-1)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


def prefill(model, prompts, S):
    """Runs left-padded prompts (list of B token-id lists) through the model into a fresh KV cache of S
    slots. Returns logits (B, V) fp32 at each prompt's last token, and the decode state: the cache and
    the small tensors that decode_step() reads and updates in place."""
    W = model.lm_head_weight
    dev, dtype, cfg = W.device, W.dtype, model.cfg
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, P, dtype=torch.long)                           # pad id 0: masked, never read
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
    ids = ids.to(dev)
    n_pad = P - torch.tensor([len(p) for p in prompts], device=dev)     # (B,) left padding per row
    ar = torch.arange(S, device=dev)
    # valid[b, s]: slot s holds a real token of row b. Decode steps switch their slot on as they write it.
    valid = (ar[None, :] >= n_pad[:, None]) & (ar[None, :] < P)         # (B, S)
    pos = (ar[None, :P] - n_pad[:, None]).clamp(min=0)                  # (B, P) 0 at the first real token
    # causal over slots, real keys only; a pad query also sees itself, so its softmax is never empty
    # (an all-masked row would give NaN, and NaN values in the cache would poison even masked reads)
    causal = ar[None, :] <= ar[:P, None]                                # (P, S)
    diag = ar[None, :] == ar[:P, None]
    mask = causal & (valid[:, None, :] | diag)                          # (B, P, S)
    # zeros, not empty: masked slots are multiplied by 0 in attention, and 0 * NaN garbage = NaN
    shape = (B, cfg.n_kv_heads, S, cfg.head_dim)
    cache = [(torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev))
             for _ in range(cfg.n_layers)]
    h = model(ids, position_ids=pos, mask=mask[:, None], kv_cache=cache, cache_pos=ar[:P], return_hidden=True)
    logits = F.linear(h[:, -1], W).float()                              # (B, V) last position only
    state = dict(cache=cache, valid=valid, tok=ids[:, -1].clone(), pos=P - n_pad,
                 slot=torch.tensor([P], device=dev))
    return logits, state


def decode_step(model, st):
    """Feeds st["tok"] (B,) at the next slot; returns the next-token logits (B, V) fp32. Static shapes,
    in-place updates only: capturable as a CUDA graph."""
    st["valid"].index_fill_(1, st["slot"], True)                        # the new token sees itself
    h = model(st["tok"][:, None], position_ids=st["pos"][:, None], mask=st["valid"][:, None, None, :],
              kv_cache=st["cache"], cache_pos=st["slot"], return_hidden=True)
    st["pos"] += 1
    st["slot"] += 1
    return F.linear(h[:, 0], model.lm_head_weight).float()


def seeded(*key):
    """A 63-bit seed from a key such as ("rollout", seed, step, rank): what is sampled or shuffled becomes a
    function of where it happens (a step, a batch, a rank), so a resumed run, an early stop or another batch
    split meets the same random numbers. A hash of the whole key, so different keys give unrelated seeds
    (arithmetic mixing such as seed * 1000 + epoch makes epoch 1000 of seed 0 epoch 0 of seed 1); the name in
    front keeps different uses with the same numbers apart."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


def fsdp_modules(model):
    """The FSDP2 (fully_shard) modules inside `model`; empty for a plain model."""
    if not torch.distributed.is_available():  # (a torch build without distributed: nothing is sharded)
        return []
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, eos_token_ids=(),
             seed=None, batch_size=None, cuda_graph=True):
    """
    Samples continuations of `prompts` (a list of token-id lists, any lengths). Returns
    (tokens, logprobs), one list per prompt, in the prompts' order:
      tokens[i]   the new token ids, at most max_new_tokens, ending with the EOS if one was sampled
                  (any of eos_token_ids; nothing after it),
      logprobs[i] for each of them, its log-probability under the distribution it was sampled from:
                  log_softmax(logits / temperature), and with top_k > 0 / top_p < 1 the log-probability
                  under the truncated distribution renormalised over the kept tokens. temperature=0 is
                  greedy decoding (top_k/top_p ignored) and logprobs are then log_softmax(logits).
    Sampling uses its own torch.Generator on the model's device: the same seed gives the same samples
    for the same prompts, batch_size and device (seed=None: fresh randomness).
    batch_size: run the prompts in batches of at most this many (None: all at once); prompts are sorted
    by length first, so a batch holds similar lengths and little padding.
    cuda_graph: on CUDA (without FSDP), capture the decode step as a CUDA graph.

    FSDP2 (fully_shard): every rank must call this with the same max_new_tokens, eos_token_ids,
    batch_size and sampling settings (prompts may differ, also in number; pass a per-rank seed, e.g.
    seed + rank, or two ranks with the same prompts draw the same samples). The parameters are
    all-gathered once for the whole call, not per token; memory for the full model is needed meanwhile.
    """
    if not (temperature >= 0 and 0 < top_p <= 1 and top_k >= 0 and max_new_tokens >= 0):
        raise ValueError(f"generate: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 0; "
                         f"got {temperature}, {top_p}, {top_k}, {max_new_tokens}")
    V = model.cfg.vocab_size
    for i, p in enumerate(prompts):
        if len(p) == 0 or min(p) < 0 or max(p) >= V:
            raise ValueError(f"generate: prompts[{i}] is empty or has a token id outside [0, {V})")
    fsdp = fsdp_modules(model)
    sync = bool(fsdp) and torch.distributed.is_initialized()
    if max_new_tokens == 0:
        return [[] for _ in prompts], [[] for _ in prompts]
    # Longest first: similar lengths share a batch, and an out-of-memory shows up in the first batch.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    bs = batch_size or max(len(prompts), 1)
    batches = [order[i:i + bs] for i in range(0, len(order), bs)]
    if sync:
        # every rank runs as many batches as the rank with the most (collective: all ranks call generate)
        n = torch.tensor(len(batches), device=model.embed_tokens.weight.device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        batches += [[] for _ in range(int(n) - len(batches))]
    with torch.compiler.set_stance("force_eager"):  # blocks compiled for training run eagerly here
        return generate_batches(model, prompts, batches, max_new_tokens, temperature, top_p, top_k, eos_token_ids,
                                seed, cuda_graph, fsdp, sync)


def generate_batches(model, prompts, batches, max_new_tokens, temperature, top_p, top_k, eos_token_ids, seed,
                     cuda_graph, fsdp, sync):
    """generate() over its batches of prompt indices, with the FSDP2 parameters gathered throughout."""
    was_training = model.training
    model.eval()
    # FSDP2: gather the full parameters once (a collective every rank reaches) and keep them gathered
    # through every forward of this call, instead of an all-gather per layer per token.
    # NOTE assumes fully_shard's default reshard_after_forward=True, which we restore at the end
    # (the root module keeps False, FSDP's own choice for it).
    for m in fsdp:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        tokens, logprobs = [None] * len(prompts), [None] * len(prompts)
        gen = torch.Generator(device=model.lm_head_weight.device)
        seed = torch.Generator().seed() if seed is None else seed
        for b, idx in enumerate(batches):
            # a seed per batch: its samples do not depend on how long earlier batches ran (early
            # stop, or lockstep with other ranks under FSDP)
            gen.manual_seed(seeded("generate", seed, b))
            # a rank out of prompts runs a dummy 1-token prompt, already "done", to stay in lockstep
            batch = [prompts[i] for i in idx] or [[0]]
            toks, logps = generate_batch(model, batch, max_new_tokens, temperature, top_p, top_k,
                                         eos_token_ids, gen, sync, cuda_graph and not fsdp, dummy=not idx)
            for j, i in enumerate(idx):
                tokens[i], logprobs[i] = toks[j], logps[j]
    finally:
        for m in fsdp:
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()
        model.train(was_training)
    return tokens, logprobs


def generate_batch(model, prompts, N, temperature, top_p, top_k, eos_token_ids, gen, sync, cuda_graph,
                   dummy=False):
    """generate() for one batch that fits on the device at once; N = max_new_tokens."""
    W = model.lm_head_weight
    dev, B, V = W.device, len(prompts), W.shape[0]
    P = max(len(p) for p in prompts)
    S = -(-(P + N) // 8) * 8                  # slots, rounded up to 8 for aligned mask/cache rows
    cuda_graph = cuda_graph and dev.type == "cuda" and N > 3
    check_every = 16 if dev.type == "cuda" else 1  # a host sync (and collective) every this many steps
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=dev)
    sampling = temperature > 0

    # static buffers: the sampled tokens and their logps, column t per step; which rows hit an EOS
    out_tok = torch.zeros(B, N, dtype=torch.long, device=dev)
    out_logp = torch.zeros(B, N, dtype=torch.float32, device=dev)
    done = torch.full((B,), dummy, dtype=torch.bool, device=dev)
    t = torch.zeros(1, dtype=torch.long, device=dev)
    u = torch.empty(B, V, dtype=torch.float32, device=dev) if sampling else None

    def pick(logits, st):
        tok, logp = sample(logits, temperature, top_k, top_p, u)
        out_tok.index_copy_(1, t, tok[:, None])
        out_logp.index_copy_(1, t, logp[:, None])
        if len(eos):
            done.logical_or_(tok[:, None].eq(eos).any(-1))
        st["tok"].copy_(tok)                  # rows already done keep going; their tail is cut below
        t.add_(1)

    def step():
        pick(decode_step(model, st), st)

    def still_running():
        flag = (~done).any().int()
        if sync:  # lockstep: all ranks stop at the same step (same check_every and N everywhere)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())              # .item() is a host sync: only every check_every steps

    if sampling:
        u.uniform_(generator=gen)
    logits, st = prefill(model, prompts, S)
    pick(logits, st)
    # With a CUDA graph, the whole decode loop runs on a side stream: warm-up steps, capture and replays
    # on one stream, as torch.cuda.graph's docs prescribe. (torch.cuda.stream(None) is a no-op.)
    side = torch.cuda.Stream(dev) if cuda_graph else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(dev))
    n, graph = 1, None                        # n: columns of out_tok filled so far
    with torch.cuda.stream(side):
        while n < N:
            if len(eos) and n % check_every == 0 and not still_running():
                break
            if sampling:
                u.uniform_(generator=gen)     # the noise comes from our generator, outside the graph
            if graph is not None:
                graph.replay()
            elif cuda_graph and n == 3:
                # steps 1-2 ran eagerly as warm-up (cuBLAS workspaces, SDPA kernel choice). Capturing
                # records the kernels without running them, hence the replay right after.
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, stream=side):
                        step()
                except RuntimeError as e:  # nothing ran during the capture: carry on eagerly
                    warnings.warn(f"generate: CUDA graph capture failed, decoding eagerly ({e})")
                    graph, cuda_graph = None, False
                if graph is not None:
                    graph.replay()
                else:
                    step()
            else:
                step()
            n += 1
    if side is not None:
        torch.cuda.current_stream(dev).wait_stream(side)
    # one transfer at the end; cut every row after its first EOS
    out_tok, out_logp = out_tok[:, :n].cpu(), out_logp[:, :n].cpu()
    is_eos = torch.isin(out_tok, eos.cpu())
    ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, n).tolist()
    return ([out_tok[i, :ends[i]].tolist() for i in range(B)],
            [out_logp[i, :ends[i]].tolist() for i in range(B)])
