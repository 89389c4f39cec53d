"""
kernels/ on CUDA: the compiled Triton path in bf16 and fp32 against float64, and its memory bound.

    python -m pytest tests/test_kernels_gpu.py -v        (skipped without CUDA; ~20 s on an H100)

bf16 follows Cut Cross-Entropy's rule, err(ours) <= err(eager bf16 PyTorch) + 1e-2 against float64 from the
same bf16 inputs, with err = max |x - fp64| / max |fp64| (absolute below 1 for log-probs and losses), plus a
relative loss error <= 1e-3. fp32 inputs (cuBLAS fp32, TF32 off): err(ours) <= err(eager fp32) + 1e-5.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import logprobs as lp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
IGNORE = -100
# (N, H, V, temperature, ignored rows, logits, chunk bytes): odd sizes; a 16 MiB chunk forces ~13 vocab slabs
# for log-probs and 160-row chunks for cross-entropy; 2 MiB ("many") ~98 slabs, whose dX sum stays in fp32, and
# 128 cross-entropy chunks, past MAX_CHUNKS (so the log-probs op computes the gradient). The "tiny" cases (bf16:
# 13 slabs and 3 chunks; 17 slabs and 19 chunks, routed) take every path in milliseconds, which is what
# bench/gpu.sh runs under compute-sanitizer (out-of-bounds accesses, shared-memory races)
CASES = {
    "tiny":    (37, 48, 1537, 0.7, "some", "normal", 16 * 2**10),
    "tiny-routed": (300, 48, 1537, 1.0, "some", "normal", 64 * 2**10),
    "many":    (2047, 1040, 50257, 0.7, "some", "normal", 2 * 2**20),
    "plain":   (2047, 1040, 50257, 1.0, "none", "normal", 256 * 2**20),
    "slabs":   (2047, 1040, 50257, 0.7, "some", "normal", 16 * 2**20),
    "large":   (1531, 1000, 32003, 1.5, "some", "large", 16 * 2**20),
    "peaked":  (1531, 1024, 32003, 1.0, "some", "peaked", 16 * 2**20),
    "ignored": (515, 1024, 32003, 0.7, "all", "normal", 16 * 2**20),
}


@pytest.fixture(autouse=True)
def restore():
    prev, chunk, tf32 = kernels.set_impl("auto"), lp.CHUNK_BYTES, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks need true fp32 GEMMs
    yield
    kernels.set_impl(prev)
    lp.CHUNK_BYTES, torch.backends.cuda.matmul.allow_tf32 = chunk, tf32


def make(N, H, V, ignored, logits, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, H, device="cuda", generator=gen)
    w = torch.randn(V, H, device="cuda", generator=gen) / H**0.5 * (30.0 if logits == "large" else 1.0)
    y = torch.randperm(V, device="cuda", generator=gen)[:N]
    if logits == "peaked":  # half the rows put ~25 nats on their target
        w[y[::2]] = x[::2] * (25.0 / (x[::2] ** 2).sum(1, keepdim=True))
    if ignored == "some":
        y[1::4] = IGNORE
    elif ignored == "all":
        y[:] = IGNORE
    g = torch.randn(N, device="cuda", generator=gen)
    g[::5] = 0.0
    return x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), y, g


def upcast_logits(x, w):
    # eager PyTorch as everyone writes it: logits in the input dtype, softmax in fp32 (fp64 for the oracle)
    z = x @ w.T
    return z if z.dtype == torch.float64 else z.float()


def logprobs_torch(x, w, y, T):
    valid = y != IGNORE
    logp = torch.log_softmax(upcast_logits(x, w) / T, -1).gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
    return torch.where(valid, logp, 0.0)


def run(fn, x, w, g):
    # forward + backward of fn on fresh leaves; returns (output, dX, dW) in float64
    x, w = (t.detach().clone().requires_grad_() for t in (x, w))
    out = fn(x, w)
    out.backward(g if out.dim() else None)
    return out.detach().double(), x.grad.double(), w.grad.double()


def rel_err(a, r, floor=0.0):
    # max |a - r| relative to the tensor's largest reference value: bf16 rounds relative to magnitude, so an
    # absolute bound would flag a one-ulp difference in a gradient entry of size 4 (ulp 0.03) as a failure
    scale = max(floor, r.abs().max().item())
    return (a - r).abs().max().item() / scale if scale > 0 else a.abs().max().item()


def check_bf16(ours, eager, ref, what):
    for name, a, b, r in zip(["out", "dX", "dW"], ours, eager, ref):
        floor = 1.0 if name == "out" else 0.0  # log-probs and losses: absolute below 1
        err, err_eager = rel_err(a, r, floor), rel_err(b, r, floor)
        assert err <= err_eager + 1e-2, f"{what} {name}: error {err:.3g} > eager bf16 {err_eager:.3g} + 1e-2"
    if ours[0].dim() == 0:
        assert (ours[0] - ref[0]).abs() <= 1e-3 * ref[0].abs().clamp(min=1), f"{what}: loss off by > 1e-3"


@pytest.mark.parametrize("case", CASES)
def test_bf16(case):
    N, H, V, T, ignored, logits, chunk = CASES[case]
    lp.CHUNK_BYTES = chunk
    x, w, y, g = make(N, H, V, ignored, logits, torch.bfloat16)
    x64, w64 = x.detach().double(), w.detach().double()
    # per-token log-probs with per-token upstream gradients
    ours = run(lambda a, b: kernels.fused_linear_logprobs(a, b, y, T), x, w, g)
    eager = run(lambda a, b: logprobs_torch(a, b, y, T), x, w, g)
    ref = run(lambda a, b: logprobs_torch(a, b, y, T), x64, w64, g.double())
    check_bf16(ours, eager, ref, f"logprobs/{case}")
    assert (ours[0][y == IGNORE] == 0).all() and (ours[1][y == IGNORE] == 0).all()
    # WPO's log sum_v p_v^2, absolute error against float64 no worse than eager bf16's + 1e-2
    with torch.no_grad():
        lsq = kernels.fused_linear_logprobs(x, w, y, T, return_lsq=True)[1].double()
        want = [torch.logsumexp(2 * torch.log_softmax(upcast_logits(a, b) / T, -1), -1).double() for a, b in
                ((x, w), (x64, w64))]
    valid = y != IGNORE
    err, err_eager = ((v - want[1])[valid].abs().max().item() if valid.any() else 0.0 for v in (lsq, want[0]))
    assert err <= err_eager + 1e-2 and (lsq[~valid] == 0).all(), f"lsq/{case}: {err:.3g} vs eager {err_eager:.3g}"
    # SFT cross-entropy, mean and sum, upstream gradient 1 (the usual) and -0.37
    for reduction, up in [("mean", 1.0), ("sum", -0.37)]:
        def ce(a, b):
            loss = kernels.fused_linear_cross_entropy(a, b, y, reduction=reduction)
            return loss * up

        def ce_torch(a, b):
            nll = F.cross_entropy(upcast_logits(a, b), y, ignore_index=IGNORE, reduction="sum")
            return nll / (y != IGNORE).sum().clamp(min=1) * up if reduction == "mean" else nll * up
        ref = run(ce_torch, x64, w64, None)
        check_bf16(run(ce, x, w, None), run(ce_torch, x, w, None), ref, f"ce-{reduction}/{case}")


@pytest.mark.parametrize("case", ["tiny", "slabs", "large", "peaked"])
def test_fp32(case):
    # fp32 inputs: the same rule as bf16 with fp32's margin, err(ours) <= err(eager fp32) + 1e-5. With
    # logits of magnitude ~100 ("large") the fp32 rounding of z/T - lse alone is ~1e-5 relative in
    # softmax, so a flat 1e-5 would fail eager PyTorch too on some GPUs
    N, H, V, T, ignored, logits, chunk = CASES[case]
    lp.CHUNK_BYTES = chunk
    x, w, y, g = make(N, H, V, ignored, logits, torch.float32)
    ours = run(lambda a, b: kernels.fused_linear_logprobs(a, b, y, T), x, w, g)
    eager = run(lambda a, b: logprobs_torch(a, b, y, T), x, w, g)
    ref = run(lambda a, b: logprobs_torch(a, b, y, T), x.double(), w.double(), g.double())
    for name, a, b, r in zip(["logp", "dX", "dW"], ours, eager, ref):
        floor = 1.0 if name == "logp" else 0.0
        err, err_eager = rel_err(a, r, floor), rel_err(b, r, floor)
        assert err <= err_eager + 1e-5, f"{name}: {err:.2e} > eager fp32 {err_eager:.2e} + 1e-5"
    ce = run(lambda a, b: kernels.fused_linear_cross_entropy(a, b, y), x, w, None)
    eager = run(lambda a, b: F.cross_entropy(a @ b.T, y, ignore_index=IGNORE), x, w, None)
    ref = run(lambda a, b: F.cross_entropy(a @ b.T, y, ignore_index=IGNORE), x.double(), w.double(), None)
    for name, a, b, r in zip(["loss", "dX", "dW"], ce, eager, ref):
        err, err_eager = rel_err(a, r, 1.0 if name == "loss" else 0.0), rel_err(b, r, 1.0 if name == "loss" else 0.0)
        assert err <= err_eager + 1e-5, f"ce {name}: {err:.2e} > eager fp32 {err_eager:.2e} + 1e-5"


def test_triton_matches_reference_path():
    # the training scripts must see the same loss whichever path runs
    x, w, y, g = make(1024, 1024, 32003, "some", "normal", torch.bfloat16)
    loss = kernels.fused_linear_cross_entropy(x, w, y)
    kernels.set_impl("torch")
    ref = kernels.fused_linear_cross_entropy(x, w, y)
    assert (loss - ref).abs() <= 1e-3 * ref.abs()


@pytest.mark.parametrize("task", ["logprobs", "ce"])
def test_peak_memory(task):
    # extra memory beyond inputs and the returned gradients: the chunk buffer plus O(N) vectors, and for the
    # log-probs backward dX's fp32 running sum (N x H x 4 bytes)
    N, H, V = 4096, 2048, 128256
    x, w, y, g = make(N, H, V, "some", "normal", torch.bfloat16)
    op = {"logprobs": lambda: kernels.fused_linear_logprobs(x, w, y).backward(g),
          "ce": lambda: kernels.fused_linear_cross_entropy(x, w, y).backward()}[task]
    op()  # warm-up: kernels compiled, cuBLAS workspace allocated
    x.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    op()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - x.grad.nbytes - w.grad.nbytes
    bound = lp.CHUNK_BYTES + (N * H * 4 if task == "logprobs" else 0) + 16 * 2**20
    assert extra <= bound, f"{task}: {extra / 2**30:.3f} GiB extra, more than {bound / 2**30:.3f}"
