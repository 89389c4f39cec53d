"""
Generation throughput: model.generate against transformers' generate, on the same random weights,
side by side in one run. New tokens per second = B * new_tokens / wall time of one generate call
(prefill, CUDA-graph capture and everything else included). No EOS: both make every token.

    python bench/generate.py                     # CUDA: Llama-3.2-1B-shaped bf16, B=64 and B=256
    python bench/generate.py --device cpu        # CPU: a tiny model (the default without CUDA)
    python bench/generate.py --batch 64 --no-hf  # ours only

Shapes on CUDA: hidden 2048, 16 layers, 32 heads, 8 KV heads, head_dim 64, ffn 8192, vocab 128256,
tied embeddings, llama3 RoPE scaling 32 (Llama 3.2 1B); prompt 128 tokens, 256 new, sampling at T=1.
Random weights made on the spot: nothing is downloaded.
"""
import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Llama, LlamaConfig, generate  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: 64 256 on CUDA, 8 on CPU)")
p.add_argument("--prompt-len", type=int, default=None, help="default: 128 on CUDA, 32 on CPU")
p.add_argument("--new-tokens", type=int, default=None, help="default: 256 on CUDA, 64 on CPU")
p.add_argument("--no-hf", action="store_true", help="skip transformers")
p.add_argument("--no-eager", action="store_true", help="skip our run without the CUDA graph")
p.add_argument("--threads", type=int, default=1, help="CPU threads (1: tiny ops gain nothing from more)")
args = p.parse_args()
cuda = args.device.startswith("cuda")
batches = args.batch or ([64, 256] if cuda else [8])
P = args.prompt_len or (128 if cuda else 32)
N = args.new_tokens or (256 if cuda else 64)
if not cuda:
    torch.set_num_threads(args.threads)

# -----------------------------------------------------------------------------
# the model: one set of random weights shared by transformers' model and ours

hf_cfg = dict(model_type="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
              num_attention_heads=32, num_key_value_heads=8, head_dim=64, intermediate_size=8192,
              rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072,
              rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192))
if not cuda:  # tiny: the same architecture, scaled down
    hf_cfg.update(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=32, intermediate_size=688)
dtype = torch.bfloat16 if cuda else torch.float32
dev = torch.device(args.device)
t0 = time.time()
torch.manual_seed(0)
hf = None
try:
    if args.no_hf:
        raise ImportError("--no-hf")
    import transformers
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_cfg.items() if k != "model_type"})
    with dev:
        hf = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    hf.generation_config.eos_token_id = None  # make all N tokens, as ours does without eos_token_ids
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    print(f"transformers {transformers.__version__}")
except Exception as e:
    print(f"transformers: not run ({type(e).__name__}: {e})")
    with dev:  # our own init then
        ref = Llama(LlamaConfig.from_hf(hf_cfg))
        ref.init_weights()
    sd = ref.to(dtype).state_dict()
with torch.device("meta"):
    model = Llama(LlamaConfig.from_hf(hf_cfg))
model.load_state_dict(sd, strict=True, assign=True)  # shares the tensors with transformers' model
model.eval()
n_params = sum(t.numel() for t in model.parameters())
name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
print(f"{name} | torch {torch.__version__} | {n_params / 1e6:.0f}M params {str(dtype)[6:]} | "
      f"prompt {P} | new {N} | T=1 sampling | setup {time.time() - t0:.1f}s")


def sync():
    if cuda:
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.time()
    n = fn()
    sync()
    return n, time.time() - t


def run_ours(prompts, n, cuda_graph=True):
    toks, _ = generate(model, prompts, n, temperature=1.0, seed=0, cuda_graph=cuda_graph)
    return sum(map(len, toks))


def run_hf(ids, n):
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=True,
                      temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    return (out.shape[1] - ids.shape[1]) * out.shape[0]


# -----------------------------------------------------------------------------
# the runs: one warm-up (first CUDA/cuBLAS use, short) and one timed call per entry

rows = []
for B in batches:
    g = torch.Generator().manual_seed(B)
    ids = torch.randint(0, hf_cfg["vocab_size"], (B, P), generator=g)
    prompts = ids.tolist()
    entries = [("ours", lambda n: run_ours(prompts, n))]
    if cuda and not args.no_eager:
        entries.append(("ours eager", lambda n: run_ours(prompts, n, cuda_graph=False)))
    if hf is not None:
        entries.append(("transformers", lambda n: run_hf(ids.to(dev), n)))
    res = {}
    for label, fn in entries:
        try:
            fn(8)  # warm-up
            n, dt = timed(lambda: fn(N))
            assert n == B * N, f"made {n} tokens, expected {B * N}"
            res[label] = n / dt
            print(f"B={B:4d} {label:13s} {n / dt:10,.0f} tok/s  ({dt:.2f}s"
                  + (f", peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)" if cuda else ")"), flush=True)
        except Exception as e:
            print(f"B={B:4d} {label:13s} FAILED: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    rows.append((B, res))

print("\n|    B | ours tok/s | ours eager tok/s | transformers tok/s | ours / transformers |")
print("|-----:|-----------:|-----------------:|-------------------:|--------------------:|")
for B, res in rows:
    f = lambda k: f"{res[k]:,.0f}" if k in res else "-"  # noqa: E731
    ratio = f"{res['ours'] / res['transformers']:.1f}x" if "ours" in res and "transformers" in res else "-"
    print(f"| {B:4d} | {f('ours'):>10} | {f('ours eager'):>16} | {f('transformers'):>18} | {ratio:>19} |")
