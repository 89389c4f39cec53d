"""
Fused linear -> log-softmax -> gather: per-token log-probs without ever holding the [N, V] logits.

    logp[i] = log_softmax(hidden[i] @ weight.T / T)[targets[i]]      fp32, 0 where targets[i] == ignore_index
    lsq[i]  = log sum_v softmax(hidden[i] @ weight.T / T)_v^2          optional, no gradient (WPO's weights)

DPO's sequence log-probs and PPO's token log-probs end in this op, and so does SFT's cross-entropy past 16k
tokens per call in bf16 (below that cross_entropy.py forms its gradient in the forward). Eager PyTorch
materialises the logits in fp32 (4.2 GB at N=8192, V=128256) plus the softmax and its gradient; here at most
CHUNK_BYTES of logits exist at a time.

Design, a "chunked hybrid": the matmuls are cuBLAS (torch.mm, bf16 in, fp32 accumulate), which is the fastest
GEMM on the machine, and small Triton kernels do the row-wise softmax work in one fp32 pass each.
  forward : for each vocab slab [v0, v1):  z = hidden @ weight[v0:v1].T           (N, vs)   2NHV FLOPs
            _lse_slab_kernel folds z into each row's running (max, sum exp) and picks up the target logit
  backward: for each slab, last one first (its logits are still in the buffer, so it is not recomputed):
            z recomputed, _dz_slab_kernel writes dz = g * (onehot - softmax(z/T)) / T in place,
            dW[v0:v1] = dz.T @ hidden   (written once: slabs split the vocabulary, so dW needs no running sum)
            dX       += dz @ weight[v0:v1]   (N, H), the only running sum, kept in fp32   6NHV FLOPs
The per-token upstream gradient g is folded into dz *before* dW sums over tokens (a per-token weighting
can not be applied to a finished dW). 8NHV in total; the grad-in-forward cross-entropy (cross_entropy.py)
needs only 6NHV but works for a scalar loss only.

_LogProbsRef is the PyTorch reference: the same maths chunked over tokens in fp32 (fp64 for fp64 inputs),
recomputing the logits in backward. It is the CPU path and the tests' second subject.

Extra memory: the CHUNK_BYTES logits buffer, kept from forward to backward, plus in backward the fp32 sum of dX
(N x H x 4 bytes: 128 MiB at N=8192, H=4096) for bf16/fp16 inputs.
NOTE the slab width is CHUNK_BYTES / (N * 2): beyond ~32k tokens per call the slabs get narrow and dX's running
sum (N x H read and written per slab) starts to cost time.
The public ops are opaque to torch.compile (torch.compiler.disable): a compiled model calls them eagerly.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # e.g. macOS: the PyTorch reference path still works
    from types import SimpleNamespace
    triton, tl, HAS_TRITON = SimpleNamespace(jit=lambda f: f, cdiv=None), SimpleNamespace(constexpr=int), False

# NOTE the interpreter is chosen when triton decorates the kernels, i.e. at import: set TRITON_INTERPRET=1 first
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# "auto": Triton for CUDA tensors, the reference otherwise; "triton" or "torch" force one (tests; the environment
# variable KERNELS_IMPL sets it for a whole script run, e.g. KERNELS_IMPL=torch to rule the kernels out)
IMPL = os.environ.get("KERNELS_IMPL", "auto")
if IMPL not in ("auto", "triton", "torch"):
    raise ValueError(f"KERNELS_IMPL must be auto, triton or torch, got {IMPL!r}")
CHUNK_BYTES = 256 * 2**20  # logits buffer: 1024 rows x 128256 vocab, or 8192 rows x 16384 vocab, in bf16


def use_triton(x):
    ok = HAS_TRITON and (x.is_cuda or INTERPRET) and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if IMPL == "triton" and not ok:
        raise RuntimeError(f"kernels: the Triton path needs triton, CUDA tensors (or TRITON_INTERPRET=1) and "
                           f"fp32/bf16/fp16 inputs, got {x.dtype} on {x.device}")
    return IMPL == "triton" or (IMPL == "auto" and ok and x.is_cuda)


def fit(elems):
    # a chunk length from an element budget, rounded down to a multiple of 128 (16 when small): cuBLAS tile shapes
    return max(16, elems // 128 * 128 if elems >= 128 else elems // 16 * 16)


def block_for(n):
    # the Triton tile along the vocabulary: a power of two, >= 16, at most 2048 (8 values per thread, which
    # keeps registers low enough for several programs per SM: these kernels are memory-bound)
    b = min(2048, max(16, triton.next_power_of_2(n)))
    return b, (8 if b >= 1024 else 4)


def check(fn, hidden, weight, targets, ignore_index, temperature=1.0):
    # one clear sentence per bad input; returns targets as contiguous int64
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{fn}: hidden must be [N, H] and weight [V, H], got hidden {tuple(hidden.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{fn}: targets must be an int64/int32 tensor of shape ({hidden.shape[0]},), "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype or not (hidden.device == weight.device == targets.device):
        raise ValueError(f"{fn}: hidden, weight and targets must share a device (and hidden, weight a dtype), "
                         f"got {hidden.dtype}/{hidden.device}, {weight.dtype}/{weight.device}, {targets.device}")
    if not temperature > 0:
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")
    V, y = weight.shape[0], targets.long().contiguous()
    bad = (y != ignore_index) & ((y < 0) | (y >= V))
    if y.is_cuda:  # no host sync on the GPU: a device-side assert instead
        torch._assert_async(~bad.any(), f"{fn}: a target is outside [0, {V}) and is not ignore_index")
    elif bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{fn}: targets[{i}] = {int(y[i])} is outside [0, V={V}) and is not "
                         f"ignore_index={ignore_index}")
    return y


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def row_max_sumexp(z_row, n_cols, inv_t, BLOCK: tl.constexpr, SQ: tl.constexpr):
    # max m, sum of exp(z/T - m) and, when SQ, sum of exp(2 (z/T - m)) over n_cols logits at z_row, in fp32.
    # Each lane keeps its own running values (online softmax) and the lanes are merged once at the end: no
    # cross-thread reduction inside the loop. Lanes start at -1e38, not -inf, so that exp(m_old - m_new)
    # never sees -inf - -inf = nan.
    mv = tl.full([BLOCK], -1e38, tl.float32)
    sv = tl.zeros([BLOCK], tl.float32)
    qv = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        z = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(mv, z)
        a, e = tl.exp(mv - m_new), tl.exp(z - m_new)
        sv = sv * a + e
        if SQ:
            qv = qv * a * a + e * e
        mv = m_new
    m = tl.max(mv, axis=0)
    a = tl.exp(mv - m)
    return m, tl.sum(sv * a, axis=0), tl.sum(qv * a * a, axis=0)


@triton.jit
def _lse_slab_kernel(z_ptr, y_ptr, m_ptr, s_ptr, q_ptr, zy_ptr, stride, v0, n_cols, inv_t, SQ: tl.constexpr,
                     BLOCK: tl.constexpr):
    # one program per token row i; z_ptr is the (N, n_cols) logits of vocab ids v0 .. v0+n_cols-1
    i = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + i * stride
    m_slab, s_slab, q_slab = row_max_sumexp(z_row, n_cols, inv_t, BLOCK, SQ)
    # merge into the row's running max and sum of exp(z/T - max) (and of its square) over the slabs seen so
    # far (-inf, 0, 0 at first)
    m, s = tl.load(m_ptr + i), tl.load(s_ptr + i)
    m_new = tl.maximum(m, m_slab)
    a, b = tl.exp(m - m_new), tl.exp(m_slab - m_new)
    tl.store(s_ptr + i, s * a + s_slab * b)
    if SQ:
        tl.store(q_ptr + i, tl.load(q_ptr + i) * a * a + q_slab * b * b)
    tl.store(m_ptr + i, m_new)
    # the target's logit, when it falls in this slab
    y = tl.load(y_ptr + i) - v0
    hit = (y >= 0) & (y < n_cols)
    zy = tl.load(z_row + y, mask=hit, other=0.0).to(tl.float32) * inv_t
    tl.store(zy_ptr + i, zy, mask=hit)


@triton.jit
def _dz_slab_kernel(z_ptr, y_ptr, lse_ptr, g_ptr, stride, v0, n_cols, inv_t, ignore_index, BLOCK: tl.constexpr):
    # grid (N, cdiv(n_cols, BLOCK)): overwrite one tile of a logits row with its gradient
    # dz = g_i * (onehot(y_i) - softmax(z_i / T)) / T
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    y = tl.load(y_ptr + i)
    # g_i / T, and exactly 0 for ignored rows (they get no gradient, whatever g says)
    coef = tl.where(y == ignore_index, 0.0, tl.load(g_ptr + i) * inv_t)
    lse = tl.load(lse_ptr + i)
    z_row = z_ptr + i * stride
    z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
    p = tl.exp(z * inv_t - lse)
    # the 1 at the target is added in fp32, before the store rounds to the buffer's dtype (bf16 on GPU)
    dz = coef * (tl.where(cols == y - v0, 1.0, 0.0) - p)
    tl.store(z_row + cols, dz.to(z_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def slabs(V, vs):
    # vocab slabs of width vs; the remainder comes first so the last slab, kept for backward, is a full one
    first = V - (V - 1) // vs * vs
    starts = [0] + list(range(first, V, vs))
    return list(zip(starts, starts[1:] + [V]))


def _fwd(x, w, y, T, ignore_index, keep, sq=False):
    N, V = x.shape[0], w.shape[0]
    vs = min(V, fit(CHUNK_BYTES // (N * x.element_size())))
    buf = x.new_empty(N * vs)  # the only large allocation: N x vs logits in the input dtype
    m = torch.full((N,), float("-inf"), dtype=torch.float32, device=x.device)  # (N,) running max, sums of exp
    s, q, zy = (torch.zeros(N, dtype=torch.float32, device=x.device) for _ in range(3))  # and exp^2, target logit
    for v0, v1 in slabs(V, vs):
        z = buf[: N * (v1 - v0)].view(N, v1 - v0)
        torch.mm(x, w[v0:v1].t(), out=z)  # (N, vs) logits, cuBLAS
        BLOCK, warps = block_for(v1 - v0)
        _lse_slab_kernel[(N,)](z, y, m, s, q, zy, z.stride(0), v0, v1 - v0, 1.0 / T, SQ=sq, BLOCK=BLOCK,
                               num_warps=warps)
    lse = m + s.log()  # (N,) log-sum-exp of z/T
    valid = y != ignore_index
    logp = torch.where(valid, zy - lse, 0.0)
    # log sum_v p_v^2 = logsumexp(2 z/T) - 2 lse = (2 m + log q) - 2 (m + log s)
    lsq = torch.where(valid, q.log() - 2 * s.log(), 0.0) if sq else torch.zeros_like(logp)
    return logp, lsq, lse, (buf, vs) if keep else None


def _bwd(x, w, y, lse, g, T, ignore_index, kept, vs, need_dx, need_dw):
    N, V = x.shape[0], w.shape[0]
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty_like(w) if need_dw else None
    # dX is a sum over the V / vs slabs (8 at N=8192, 63 at N=64k): in bf16 it would be rounded once per slab
    # (tests/test_kernels.py::test_bf16, 47 slabs: 2.8e-2 against eager bf16's 7.4e-3). The sum is kept in fp32
    # (N x H x 4 bytes), each slab's product rounded once into dx, which serves as the scratch; fp32 inputs sum in
    # place.
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_dx and x.dtype != torch.float32 else dx
    buf = kept if kept is not None else x.new_empty(N * vs)
    for k, (v0, v1) in enumerate(reversed(slabs(V, vs))):
        z = buf[: N * (v1 - v0)].view(N, v1 - v0)
        if k > 0 or kept is None:  # the last forward slab is still in the buffer
            torch.mm(x, w[v0:v1].t(), out=z)
        BLOCK, warps = block_for(v1 - v0)
        grid = (N, triton.cdiv(v1 - v0, BLOCK))
        _dz_slab_kernel[grid](z, y, lse, g, z.stride(0), v0, v1 - v0, 1.0 / T, ignore_index,
                              BLOCK=BLOCK, num_warps=warps)
        if dw is not None:
            torch.mm(z.t(), x, out=dw[v0:v1])  # (vs, H), fp32 accumulation inside cuBLAS, one rounding
        if acc is not dx:  # (N, H) this slab's product (fp32 inside cuBLAS, one rounding), summed in fp32
            acc.add_(torch.mm(z, w[v0:v1], out=dx))
        elif dx is not None:
            torch.mm(z, w[v0:v1], out=dx) if k == 0 else dx.addmm_(z, w[v0:v1])
    if acc is not dx:
        dx.copy_(acc)
    return dx, dw


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, y, T, ignore_index, sq):
        logp, lsq, lse, (buf, vs) = _fwd(x, w, y, T, ignore_index, keep=True, sq=sq)
        ctx.save_for_backward(x, w, y, lse)
        ctx.buf, ctx.vs, ctx.T, ctx.ignore_index = buf, vs, T, ignore_index
        ctx.mark_non_differentiable(lsq)
        return logp, lsq

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _):
        x, w, y, lse = ctx.saved_tensors
        kept, ctx.buf = ctx.buf, None  # backward overwrites the buffer: a second backward must recompute
        dx, dw = _bwd(x, w, y, lse, g.float().contiguous(), ctx.T, ctx.ignore_index, kept, ctx.vs,
                      *ctx.needs_input_grad[:2])
        return dx, dw, None, None, None, None


# ----------------------------------------------------------------------------- PyTorch reference

class _LogProbsRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, y, T, ignore_index, sq):
        ct = torch.promote_types(x.dtype, torch.float32)  # fp32 maths, fp64 for fp64 inputs
        N, V = x.shape[0], w.shape[0]
        C, wt = fit(CHUNK_BYTES // (V * ct.itemsize)), w.to(ct)
        valid = y != ignore_index
        yc = torch.where(valid, y, 0)  # a safe index for gather
        logp, lsq = torch.zeros(N, dtype=ct, device=x.device), torch.zeros(N, dtype=ct, device=x.device)
        for c0 in range(0, N, C):
            ls = (x[c0:c0 + C].to(ct) @ wt.t() / T).log_softmax(-1)  # (C, V), the only large tensor
            logp[c0:c0 + C] = ls.gather(1, yc[c0:c0 + C, None])[:, 0]
            if sq:
                lsq[c0:c0 + C] = torch.logsumexp(2 * ls, -1)
        ctx.save_for_backward(x, w, y)
        ctx.T, ctx.ignore_index = T, ignore_index
        lsq = torch.where(valid, lsq, 0.0)
        ctx.mark_non_differentiable(lsq)
        return torch.where(valid, logp, 0.0), lsq

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _):
        x, w, y = ctx.saved_tensors
        ct = torch.promote_types(x.dtype, torch.float32)
        N, V, T = x.shape[0], w.shape[0], ctx.T
        C, wt = fit(CHUNK_BYTES // (V * ct.itemsize)), w.to(ct)
        valid = y != ctx.ignore_index
        yc = torch.where(valid, y, 0)
        coef = torch.where(valid, g.to(ct) / T, 0.0)  # (N,) g_i / T, 0 on ignored rows
        dx = torch.zeros(x.shape, dtype=ct, device=x.device)
        dw = torch.zeros(w.shape, dtype=ct, device=x.device)
        for c0 in range(0, N, C):
            xc = x[c0:c0 + C].to(ct)
            dz = -(xc @ wt.t() / T).softmax(-1)  # (C, V) recomputed: d logp / d z = onehot - softmax
            dz[torch.arange(len(xc)), yc[c0:c0 + C]] += 1.0
            dz *= coef[c0:c0 + C, None]
            dx[c0:c0 + C] = dz @ wt
            dw += dz.t() @ xc
        return dx.to(x.dtype), dw.to(w.dtype), None, None, None, None


# ----------------------------------------------------------------------------- public op

@torch.compiler.disable
def fused_linear_logprobs(hidden, weight, targets, temperature=1.0, ignore_index=-100, return_lsq=False):
    """log_softmax(hidden @ weight.T / temperature)[targets] per row without the [N, V] logits.

    hidden (N, H), weight (V, H) of one dtype, targets (N,) int -> logp (N,) fp32 (fp64 for fp64 inputs),
    0 and no gradient where targets == ignore_index. Differentiable in hidden and weight with any per-token
    upstream gradient. Triton + cuBLAS on CUDA, the chunked PyTorch reference elsewhere (see IMPL).
    return_lsq=True -> (logp, lsq), lsq (N,) = log sum_v p_v^2 of each row's distribution (0 on ignored rows,
    no gradient): WPO's weight alignment, one more running sum in the same pass."""
    y = check("fused_linear_logprobs", hidden, weight, targets, ignore_index, temperature)
    x, w, T = hidden.contiguous(), weight.contiguous(), float(temperature)
    if not use_triton(x) or x.shape[0] == 0:
        logp, lsq = _LogProbsRef.apply(x, w, y, T, ignore_index, return_lsq)
    elif torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        logp, lsq = _LogProbs.apply(x, w, y, T, ignore_index, return_lsq)
    else:  # no graph (e.g. reference log-probs): no buffer kept
        logp, lsq = _fwd(x, w, y, T, ignore_index, keep=False, sq=return_lsq)[:2]
    return (logp, lsq) if return_lsq else logp
