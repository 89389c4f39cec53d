"""
A DPO training step on a Llama-3.2-1B-shaped model: reference log-probs cached (what dpo.py does)
vs a resident frozen reference model run every step (what TRL and open-instruct's dpo_tune.py do).
Same FSDP2 precision policy as the training scripts (fp32 master weights, bf16 compute), one GPU.

    python bench/dpo.py                 # CUDA only: ms/step, tokens/s, peak GiB, side by side
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import IGNORE, init_distributed, token_logprobs  # noqa: E402
from dpo import preference_loss  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402

if not torch.cuda.is_available():
    raise SystemExit("bench/dpo.py needs a CUDA device")
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402

rank, world, dev = init_distributed()
cfg = LlamaConfig.from_hf(dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                               rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                               rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                 high_freq_factor=4.0, original_max_position_embeddings=8192)))
P, T, steps = 4, 1024, 8  # pairs per step, tokens per sequence: (2P, T) through the model


def build(trainable):
    with torch.device("meta"):
        m = Llama(cfg)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for b in m.layers:
        fully_shard(b, mp_policy=mp)
    fully_shard(m, mp_policy=mp)
    m.to_empty(device=dev)
    m.init_weights()
    return m.requires_grad_(trainable)


x = torch.randint(0, cfg.vocab_size, (2 * P, T), device=dev)
y = torch.randint(0, cfg.vocab_size, (2 * P, T), device=dev)
y[:, : T // 4] = IGNORE  # the prompt part is not scored
lengths = (y != IGNORE).sum(-1).float()


def step(policy, opt, ref=None, cached=None):
    logp = token_logprobs(policy, x, y).sum(-1)  # (2P,) summed over response tokens
    if ref is not None:
        with torch.no_grad():
            ref_logp = token_logprobs(ref, x, y).sum(-1)
    else:
        ref_logp = cached
    losses, _, _ = preference_loss(logp[:P], logp[P:], ref_logp[:P], ref_logp[P:], lengths[:P], lengths[P:],
                                   "dpo_norm", beta=5.0)
    losses.mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


rows = []
for name in ["cached reference log-probs (dpo.py)", "resident reference model"]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    policy = build(True)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True)
    ref = build(False) if name.startswith("resident") else None
    cached = torch.randn(2 * P, device=dev) - 500.0
    for _ in range(2):
        step(policy, opt, ref, cached)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(policy, opt, ref, cached)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    rows.append((name, dt, (torch.cuda.max_memory_allocated() - base) / 2**30))
    del policy, opt, ref
print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | 1B-shaped, {P} pairs x {T} tokens, "
      "dpo_norm, fwd+bwd+AdamW, FSDP2 (bf16 compute, fp32 master)\n")
print("| reference | ms/step | tokens/s | peak GiB |\n|---|---:|---:|---:|")
for name, dt, mem in rows:
    print(f"| {name} | {dt * 1e3:.1f} | {2 * P * T / dt:,.0f} | {mem:.1f} |")
print(f"\ncached vs resident: {rows[1][1] / rows[0][1]:.2f}x faster, {rows[1][2] - rows[0][2]:.1f} GiB less")
torch.distributed.destroy_process_group()
