"""
Fused linear cross-entropy with the gradient computed during the forward: SFT's scalar loss.

    loss = sum_i nll_i  (or / n_valid for "mean"),   nll_i = logsumexp(hidden[i] @ weight.T) - z[i, targets[i]]

When the loss is a scalar, its upstream gradient is one number known to be applied to every row alike, so the
logits gradient can be formed while the logits are at hand: per chunk of C rows (a full vocabulary each),
  z = hidden[c] @ weight.T                   (C, V) cuBLAS, into the chunk buffer
  _ce_row_kernel: lse and nll per row, then dz = scale * (softmax(z) - onehot) written over z in place
  dX[c] = dz @ weight   (written once)      dW += dz.T @ hidden[c]   (running sum over chunks)
which is 6NHV FLOPs instead of the 8NHV of recomputing in backward (logprobs.py). The backward only scales the
stored dX and dW by the upstream gradient: _scale_kernel reads it on the device and does nothing when it is 1.

The chunk (C = CHUNK_BYTES / (V * 2) = 1024 rows at V=128256 in bf16) bounds the extra memory; dW's running sum
is kept in the weight's dtype (bf16 on GPU, like Liger's default): an fp32 one would cost 2.1 GB at Llama-3 size.
A bf16 sum is rounded once per chunk, and its error grows with their number (tests/test_kernels.py, chunks of
16 rows: 1.1e-2 at 16 chunks, 1.9e-2 at 24, against eager bf16's 4.0-4.3e-3): beyond MAX_CHUNKS chunks (16k
tokens at V=128256) a bf16/fp16 call with gradients takes the log-probs op instead, which writes dW once per
vocabulary slab and sums dX in fp32, at 8NHV instead of 6NHV. fp32 inputs sum dW in fp32 and stay here.
Memory, beyond the chunk buffer: dX and dW are made in the forward and held until backward hands them out, so at
the end of the forward, when activations peak, they are already there (dW is 1.05 GB at V=128256, H=4096 in
bf16); eager PyTorch allocates them in backward. Liger's fused cross-entropy does the same as here.
With reduction="mean" and no valid target at all, the loss is 0 with zero gradients (not 0/0 = nan).
The reference is logprobs.py's _LogProbsRef, its log-probs negated and summed; it recomputes the logits in backward.
"""
import torch

from kernels import logprobs as lp
from kernels.logprobs import row_max_sumexp, tl, triton

MAX_CHUNKS = 16  # most chunks dW is summed over in bf16 (16k tokens per call at V=128256)


@triton.jit
def _ce_row_kernel(z_ptr, y_ptr, nll_ptr, scale_ptr, stride, n_cols, ignore_index,
                   HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    # one program per token row i of a (C, V) chunk of logits
    i = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + i * stride
    y = tl.load(y_ptr + i)
    valid = y != ignore_index
    # the target logit, read before pass 1: its reductions synchronise the warps, so no warp can have begun
    # pass 2's in-place writes (which overwrite it) while another still reads it
    zy = tl.load(z_row + y, mask=valid, other=0.0).to(tl.float32)
    m, s, _ = row_max_sumexp(z_row, n_cols, 1.0, BLOCK, False)  # pass 1: log-sum-exp over the vocabulary, fp32
    lse = m + tl.log(s)
    tl.store(nll_ptr + i, tl.where(valid, lse - zy, 0.0))
    if HAS_GRAD:
        # pass 2: d loss / d z = scale * (softmax - onehot), 0 on ignored rows; scale = 1 or 1/n_valid
        coef = tl.where(valid, tl.load(scale_ptr), 0.0)
        for c0 in range(0, n_cols, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            dz = coef * (tl.exp(z - lse) - tl.where(cols == y, 1.0, 0.0))  # the -1 in fp32, before rounding
            tl.store(z_row + cols, dz.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
    # x *= g in place for a device scalar g, skipped when g == 1 (a plain loss.backward()) without a host sync
    g = tl.load(g_ptr)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty), mask=mask)


def _ce(x, w, y, ignore_index, reduction, need_dx, need_dw):
    N, V = x.shape[0], w.shape[0]
    C = min(N, lp.fit(lp.CHUNK_BYTES // (V * x.element_size())))
    buf = x.new_empty(C * V)  # the only large allocation: C x V logits in the input dtype
    n_valid = (y != ignore_index).sum()  # stays on the device: no sync
    one = torch.ones((), dtype=torch.float32, device=x.device)
    scale = (1.0 / n_valid.clamp(min=1).float()) if reduction == "mean" else one
    scale = scale.reshape(1)
    nll = torch.empty(N, dtype=torch.float32, device=x.device)  # (N,)
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty_like(w) if need_dw else None
    BLOCK, warps = lp.block_for(V)
    for c0 in range(0, N, C):
        c1 = min(N, c0 + C)
        xc, z = x[c0:c1], buf[: (c1 - c0) * V].view(c1 - c0, V)
        torch.mm(xc, w.t(), out=z)  # (C, V) logits, cuBLAS
        _ce_row_kernel[(c1 - c0,)](z, y[c0:c1], nll[c0:c1], scale, z.stride(0), V, ignore_index,
                                   HAS_GRAD=need_dx or need_dw, BLOCK=BLOCK, num_warps=warps)
        if dx is not None:
            torch.mm(z, w, out=dx[c0:c1])  # (C, H)
        if dw is not None:  # (V, H): first chunk writes, later chunks add (beta=1 inside cuBLAS)
            torch.mm(z.t(), xc, out=dw) if c0 == 0 else dw.addmm_(z.t(), xc)
    return nll.sum() * scale[0], dx, dw


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, y, ignore_index, reduction):
        loss, ctx.dx, ctx.dw = _ce(x, w, y, ignore_index, reduction, *ctx.needs_input_grad[:2])
        ctx.done = False
        return loss

    @staticmethod
    def backward(ctx, g):
        if ctx.done:
            raise RuntimeError("fused_linear_cross_entropy: the gradient was computed in the forward and is "
                               "handed out once; backward can not run twice through the same graph")
        dx, dw, ctx.dx, ctx.dw, ctx.done = ctx.dx, ctx.dw, None, None, True
        g = g.float().reshape(1).contiguous()
        for t in (dx, dw):
            if t is not None:
                _scale_kernel[(triton.cdiv(t.numel(), 4096),)](t, g, t.numel(), BLOCK=4096, num_warps=8)
        return dx, dw, None, None, None


@torch.compiler.disable
def fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    """Cross-entropy of hidden @ weight.T against targets, without the [N, V] logits.

    hidden (N, H), weight (V, H), targets (N,) int -> scalar fp32 loss, the sum of per-token NLL or its mean
    over non-ignored tokens ("mean" of nothing is 0). Gradient computed in the forward on the Triton path;
    the chunked PyTorch reference elsewhere (see logprobs.IMPL)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    y = lp.check("fused_linear_cross_entropy", hidden, weight, targets, ignore_index)
    x, w = hidden.contiguous(), weight.contiguous()
    grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    chunks = -(-x.shape[0] // lp.fit(lp.CHUNK_BYTES // (w.shape[0] * w.element_size())))
    if not lp.use_triton(x) or x.shape[0] == 0 or (grad and x.dtype != torch.float32 and chunks > MAX_CHUNKS):
        # (past MAX_CHUNKS chunks: the log-probs op, whose dW is written once per vocab slab)
        logp = (lp._LogProbsRef.apply(x, w, y, 1.0, ignore_index, False)[0] if not lp.use_triton(x) else
                lp.fused_linear_logprobs(x, w, y, ignore_index=ignore_index))
        loss = -logp.sum()
        return loss / (y != ignore_index).sum().clamp(min=1) if reduction == "mean" else loss
    if grad:
        return _CrossEntropy.apply(x, w, y, ignore_index, reduction)
    return _ce(x, w, y, ignore_index, reduction, False, False)[0]
