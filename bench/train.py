"""
Training-step speed: our model.py + fused loss vs transformers' LlamaForCausalLM, same config and
weights, side by side in one run. Forward + backward (+ AdamW step on the CPU).

    python bench/train.py            # CPU: a tiny config, fp32, tokens/s and ratios (interleaved, medians)
    python bench/train.py --gpu      # CUDA: a Llama-3.2-1B-shaped model, bf16, B=4 T=2048, ms and MFU

MFU counts 6 N flops per token for the matmuls (N = all parameters, embeddings included) plus
6 L C T for causal attention, against 989 TFLOP/s (H100/H200 dense bf16).
"""
import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import fused_linear_cross_entropy  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--gpu", action="store_true")
p.add_argument("--steps", type=int, default=None)
p.add_argument("--no-compile", action="store_true")
args = p.parse_args()
gpu = args.gpu and torch.cuda.is_available()
dev = "cuda" if gpu else "cpu"

if gpu:  # Llama-3.2-1B shape
    hf_kw = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                 tie_word_embeddings=True, max_position_embeddings=131072,
                 rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=8192))
    B, T, dtype, steps = 4, 2048, torch.bfloat16, args.steps or 10
else:  # tiny
    hf_kw = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=True,
                 max_position_embeddings=1024)
    B, T, dtype, steps = 8, 256, torch.float32, args.steps or 10
    torch.set_num_threads(os.cpu_count())
hf_cfg = {**hf_kw, "model_type": "llama", "rms_norm_eps": 1e-5, "hidden_act": "silu"}
cfg = LlamaConfig.from_hf(hf_cfg)
torch.manual_seed(0)
with torch.device(dev):
    ours = Llama(cfg).to(dtype)
    ours.init_weights()
n_params = sum(p.numel() for p in ours.parameters())
flops_per_tok = 6 * n_params + 6 * cfg.n_layers * cfg.dim * T

import transformers  # noqa: E402  (the oracle: only for comparison)
hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_kw)).to(dev, dtype)
hf.model.load_state_dict({k: v for k, v in ours.state_dict().items()}, strict=True)
x = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
y = torch.randint(0, cfg.vocab_size, (B, T), device=dev)


def step_ours(m):
    h = m(x, return_hidden=True)
    loss = fused_linear_cross_entropy(h.view(-1, cfg.dim), m.lm_head_weight, y.view(-1), reduction="mean")
    loss.backward()


def step_ours_plain(m):  # the plain PyTorch loop: full logits, then F.cross_entropy in fp32
    loss = F.cross_entropy(m(x).float().view(-1, cfg.vocab_size), y.view(-1))
    loss.backward()


def step_hf(m):
    m(input_ids=x, labels=y).loss.backward()


def bench(fn, m, opt=None):
    for _ in range(2):  # warmup (and compilation)
        fn(m)
        m.zero_grad(set_to_none=True)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(m)
        if opt:
            opt.step()
        m.zero_grad(set_to_none=True)
    if gpu:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
    return dt, mem


rows = []
cands = [("ours (model.py + fused CE)", step_ours, ours), ("ours, plain logits + F.cross_entropy", step_ours_plain, ours),
         ("transformers LlamaForCausalLM", step_hf, hf)]
if gpu and not args.no_compile:
    # ours as the scripts' --compile does it: each block compiled (the fused loss is opaque to the compiler)
    cands += [("ours, --compile (per block)", step_ours, copy.deepcopy(ours).compile_blocks()),
              ("transformers, torch.compile", step_hf, torch.compile(hf))]
if gpu:  # one candidate after the other: each is timed over `steps` synchronised steps
    for name, fn, m in cands:
        try:
            dt, mem = bench(fn, m)
            rows.append((name, dt, mem))
            print(f"{name}: {dt * 1e3:.1f} ms/step, peak {mem:.1f} GiB", flush=True)  # in case a later entry hangs
        except Exception as e:  # keep going: one failing entry should not hide the others
            print(f"{name}: failed ({type(e).__name__}: {e})")
else:  # CPU: interleaved rounds and the median per candidate, so that the VM's drifting speed hits all alike
    import statistics
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for _, _, m in cands]
    times = [[] for _ in cands]
    for r in range(steps + 1):
        for i, (name, fn, m) in enumerate(cands):
            t0 = time.perf_counter()
            fn(m)
            opts[i].step()
            m.zero_grad(set_to_none=True)
            if r:  # round 0 is the warmup
                times[i].append(time.perf_counter() - t0)
    rows = [(name, statistics.median(t), float("nan")) for (name, _, _), t in zip(cands, times)]
ref = next((r[1] for r in rows if r[0].startswith("transformers")), None)
where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
print(f"\n{where} | torch {torch.__version__} | transformers {transformers.__version__} | "
      f"{n_params / 1e6:.1f}M params, B={B} T={T}, {str(dtype).removeprefix('torch.')}, "
      f"{'fwd+bwd' if gpu else 'fwd+bwd+AdamW'}\n")
print("| implementation | ms/step | tokens/s | MFU | peak GiB | speed vs transformers |")
print("|---|---:|---:|---:|---:|---:|")
for name, dt, mem in rows:
    tps = B * T / dt
    mfu = f"{flops_per_tok * tps / 989e12:.2f}" if gpu else "-"
    print(f"| {name} | {dt * 1e3:.1f} | {tps:,.0f} | {mfu} | {mem:.1f} | {ref / dt:.2f}x |" if ref else
          f"| {name} | {dt * 1e3:.1f} | {tps:,.0f} | {mfu} | {mem:.1f} | - |")
