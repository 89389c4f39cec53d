"""
Fused LM-head losses side by side: ours vs torch eager, torch.compile, Liger-Kernel and Cut Cross-Entropy.

    python bench/kernels.py                                   # both shapes, ~2-3 minutes on an H200
    python bench/kernels.py --shapes 8192x4096x128256 --no-compile --out bench/out/kernels.md

For each shape N x H x V (tokens, hidden, vocab; bf16 inputs, no ignored tokens) and task
  ce   : mean cross-entropy, loss.backward()
  logp : per-token log-probs, logp.backward(g) with a random per-token g (positive, negative and zero)
it reports forward+backward time (median of CUDA-event timings), peak memory beyond the inputs and the
gradients every method returns (dX, dW), and the error of the loss/logp, dX and dW against float64 (computed in
chunks from the same bf16 inputs) as max |x - fp64| / max |fp64| (absolute below 1 for loss/logp).
"check" applies the tests' rule: error <= eager bf16's error + 1e-2.
Liger and CCE are used when importable (pip install liger-kernel cut-cross-entropy); the table says when not.
CCE's default filters small gradients (an approximation); "CCE exact" turns that off (filter_eps=None).
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

# NOTE this file is bench/kernels.py: put the repository root first on the path so that `import kernels` finds
# the package rather than this script
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
from kernels import logprobs as lp  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--shapes", default="8192x4096x128256,16384x2048x128256", help="comma-separated NxHxV")
p.add_argument("--reps", type=int, default=6, help="timed repetitions (median reported)")
p.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves its compile time)")
p.add_argument("--budget-s", type=float, default=150, help="skip what is left once this many seconds passed")
p.add_argument("--out", default="", help="also write the markdown table (and a .json beside it) here")
args = p.parse_args()
assert torch.cuda.is_available(), "bench/kernels.py needs a CUDA GPU"
t_start = time.time()


# ----------------------------------------------------------------------------- the contenders
# each returns the scalar mean loss ("ce") or the (N,) log-probs ("logp") of hidden x (N, H), weight w (V, H)

def eager_ce(x, w, y):
    return F.cross_entropy((x @ w.T).float(), y)


def eager_logp(x, w, y):
    return torch.log_softmax((x @ w.T).float(), -1).gather(1, y[:, None])[:, 0]


def ours_ce(x, w, y):
    return kernels.fused_linear_cross_entropy(x, w, y, reduction="mean")


def ours_logp(x, w, y):
    return kernels.fused_linear_logprobs(x, w, y)


def with_chunk(fn, nbytes):  # ours with another chunk budget
    def f(x, w, y):
        prev, lp.CHUNK_BYTES = lp.CHUNK_BYTES, nbytes
        try:
            return fn(x, w, y)
        finally:
            lp.CHUNK_BYTES = prev
    return f


VARIANTS = {  # name -> (ce fn, logp fn) or the reason it is missing
    "ours": (ours_ce, ours_logp),
    "ours, 512 MiB chunk": (with_chunk(ours_ce, 2**29), with_chunk(ours_logp, 2**29)),
    "torch eager": (eager_ce, eager_logp),
}
try:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger
    VARIANTS["Liger FLCE"] = (lambda x, w, y: liger(x, w, y, reduction="mean"),
                              lambda x, w, y: -liger(x, w, y, reduction="none"))
except Exception as e:  # noqa: BLE001 (any import failure just removes the row)
    VARIANTS["Liger FLCE"] = f"not importable: {type(e).__name__}: {e}"
try:
    from cut_cross_entropy import linear_cross_entropy as cce
    VARIANTS["CCE"] = (lambda x, w, y: cce(x, w, y, reduction="mean"),
                       lambda x, w, y: -cce(x, w, y, reduction="none"))
    VARIANTS["CCE exact"] = (lambda x, w, y: cce(x, w, y, reduction="mean", filter_eps=None),
                             lambda x, w, y: -cce(x, w, y, reduction="none", filter_eps=None))
except Exception as e:  # noqa: BLE001
    VARIANTS["CCE"] = f"not importable: {type(e).__name__}: {e}"
if args.no_compile:
    VARIANTS["torch.compile"] = "skipped (--no-compile)"
else:
    VARIANTS["torch.compile"] = (torch.compile(eager_ce, dynamic=False), torch.compile(eager_logp, dynamic=False))


# ----------------------------------------------------------------------------- measuring

def step(fn, x, w, y, g):
    # one forward+backward from fresh gradients; returns the output
    x.grad = w.grad = None
    out = fn(x, w, y)
    out.backward(None if g is None else g.to(out.dtype))
    return out


def timed(fn, x, w, y, g, reps):
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step(fn, x, w, y, g)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def reference64(x, w, y, g, C=1024):
    # float64 loss/logp, dX, dW from the same bf16 inputs, C rows at a time (fp64 logits: C x V x 8 bytes)
    N = x.shape[0]
    w64 = w.detach().double().requires_grad_()
    out, dx = torch.empty(N, dtype=torch.float64, device="cuda"), torch.empty(x.shape, dtype=torch.float64, device="cuda")
    up = torch.full((N,), -1.0 / N, dtype=torch.float64, device="cuda") if g is None else g.double()
    for c0 in range(0, N, C):
        xc = x[c0:c0 + C].detach().double().requires_grad_()
        logp = torch.log_softmax(xc @ w64.T, -1).gather(1, y[c0:c0 + C, None])[:, 0]
        (logp * up[c0:c0 + C]).sum().backward()
        out[c0:c0 + C], dx[c0:c0 + C] = logp.detach(), xc.grad
    return (-out.mean() if g is None else out), dx, w64.grad


def errors(out, x, w, ref):
    # max |got - fp64| / max |fp64| (absolute below 1 for the loss/logp): bf16 rounds relative to magnitude
    got = [out.detach().double(), x.grad.double(), w.grad.double()]
    return [(a - r).abs().max().item() / max(floor, r.abs().max().item())
            for a, r, floor in zip(got, ref, [1.0, 0.0, 0.0])]


def gemm_floor(x, w, task, reps):
    # the cuBLAS matmuls alone (logits, dX, dW; plus the recompute for logp): the time no method can beat
    def f():
        z = x.detach() @ w.detach().T
        if task == "logp":
            z = x.detach() @ w.detach().T
        z @ w.detach(), z.T @ x.detach()
    f()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


# ----------------------------------------------------------------------------- run

props = torch.cuda.get_device_properties(0)
print(f"# {props.name}, {props.total_memory / 2**30:.0f} GiB | torch {torch.__version__} | "
      f"triton {getattr(kernels.logprobs.triton, '__version__', 'missing')} | chunk {lp.CHUNK_BYTES / 2**20:.0f} MiB")
for name, v in VARIANTS.items():
    if isinstance(v, str):
        print(f"  {name}: {v}")
rows = []
for shape in args.shapes.split(","):
    N, H, V = map(int, shape.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, H, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=gen) * 0.02).bfloat16().requires_grad_()  # logits ~N(0, 1)
    y = torch.randint(0, V, (N,), device="cuda", generator=gen)
    for task in ["ce", "logp"]:
        g = None
        if task == "logp":  # per-token upstream gradient: positive, negative, zero
            g = torch.randn(N, device="cuda", generator=gen)
            g[::7] = 0.0
        flops = (6 if task == "ce" else 8) * N * H * V
        ref = reference64(x, w, y, g)
        t = gemm_floor(x, w, task, args.reps)
        rows.append(dict(shape=shape, task=task, variant=f"cuBLAS GEMMs only ({flops // (N * H * V)}NHV)", ms=t,
                         tflops=flops / t / 1e9, gib=None, err=None, note="lower bound"))
        print(rows[-1], flush=True)
        for name, v in VARIANTS.items():
            row = dict(shape=shape, task=task, variant=name, ms=None, tflops=None, gib=None, err=None, note="")
            if isinstance(v, str):
                row["note"] = v
            elif time.time() - t_start > args.budget_s:
                row["note"] = f"skipped: time budget of {args.budget_s:.0f} s spent"
            else:
                fn = v[0] if task == "ce" else v[1]
                try:
                    t0 = time.time()
                    step(fn, x, w, y, g)  # warm-up: compiles / autotunes
                    torch.cuda.synchronize()
                    warm = time.time() - t0
                    x.grad = w.grad = None
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    out = step(fn, x, w, y, g)
                    torch.cuda.synchronize()
                    row["gib"] = (torch.cuda.max_memory_allocated() - base - x.grad.nbytes - w.grad.nbytes) / 2**30
                    row["err"] = errors(out, x, w, ref)
                    del out
                    row["ms"] = timed(fn, x, w, y, g, args.reps)
                    row["tflops"] = flops / row["ms"] / 1e9
                    row["note"] = f"first call {warm:.1f} s" if warm > 2 else ""
                except Exception as e:  # noqa: BLE001 (report and go on)
                    row["note"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    traceback.print_exc()
                x.grad = w.grad = None
                torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
        del ref
        torch.cuda.empty_cache()

# ----------------------------------------------------------------------------- report

def fmt(v, f):
    return "-" if v is None else f.format(v)


lines = [f"{props.name}, torch {torch.__version__}, bf16, forward+backward, median of {args.reps}; "
         "extra = peak memory beyond inputs and returned gradients; errors are max |x - fp64| / max |fp64|.", "",
         "| shape NxHxV | task | variant | time (ms) | TFLOP/s | extra (GiB) | err loss/logp | err dX | err dW "
         "| check | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    eager = next((e for e in rows if e["shape"] == r["shape"] and e["task"] == r["task"]
                  and e["variant"] == "torch eager" and e["err"]), None)
    check = "-"
    if r["err"] and eager:
        check = "ok" if all(a <= b + 1e-2 for a, b in zip(r["err"], eager["err"])) else "WORSE"
    e = r["err"] or [None] * 3
    lines.append(f"| {r['shape']} | {r['task']} | {r['variant']} | {fmt(r['ms'], '{:.1f}')} | "
                 f"{fmt(r['tflops'], '{:.0f}')} | {fmt(r['gib'], '{:.2f}')} | {fmt(e[0], '{:.1e}')} | "
                 f"{fmt(e[1], '{:.1e}')} | {fmt(e[2], '{:.1e}')} | {check} | {r['note']} |")
lines.append("")
for shape in args.shapes.split(","):
    for task in ["ce", "logp"]:
        got = {r["variant"]: r for r in rows if r["shape"] == shape and r["task"] == task and r["ms"]}
        if "ours" not in got:
            lines.append(f"- {shape} {task}: ours has no timing")
            continue
        o = got["ours"]
        ratios = ", ".join(f"{k} {r['ms'] / o['ms']:.2f}x" for k, r in got.items() if k != "ours")
        goal = (f"goal <= torch.compile's time ({got['torch.compile']['ms']:.1f} ms)" if "torch.compile" in got
                else "goal <= 37.8 ms") + " and <= 0.25 GiB" if task == "ce" else "goal <= 45 ms and <= 0.5 GiB"
        lines.append(f"- {shape} {task}: ours {o['ms']:.1f} ms, {o['gib']:.2f} GiB ({goal}); "
                     f"their time / ours: {ratios}")
text = "\n".join(lines)
print("\n" + text)
print(f"\ntotal {time.time() - t_start:.0f} s")
if args.out:
    with open(args.out, "w") as f:
        f.write(text + "\n")
    with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump(rows, f, indent=1)
