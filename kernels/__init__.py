"""
kernels: the fused LM-head losses, in Triton (+ cuBLAS) with a PyTorch reference beside each kernel.

    fused_linear_logprobs(hidden, weight, targets, temperature=1.0, ignore_index=-100) -> logp (N,) fp32
        per-token log-probs for DPO/PPO (and SFT), differentiable with per-token upstream gradients;
        return_lsq=True also gives log sum_v p_v^2 per row (no gradient), WPO's weight alignment
    fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean") -> scalar
        SFT's loss, gradient computed during the forward (past 16k tokens per call at V=128256, in bf16/fp16,
        the log-probs op's recompute instead: see cross_entropy.py)

Neither ever holds the full [N, V] logits. CUDA tensors take the Triton path, everything else the chunked
PyTorch reference. set_impl("torch" | "triton" | "auto"), or KERNELS_IMPL in the environment of a whole run, forces
one (the Triton path runs on CPU tensors under TRITON_INTERPRET=1, which must be set before this package is
imported).
"""
from kernels import logprobs
from kernels.cross_entropy import fused_linear_cross_entropy
from kernels.logprobs import HAS_TRITON, INTERPRET, fused_linear_logprobs


def set_impl(name):
    """Force the implementation: "auto" (Triton on CUDA), "triton" or "torch". Returns the previous one."""
    if name not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels.set_impl: name must be 'auto', 'triton' or 'torch', got {name!r}")
    prev, logprobs.IMPL = logprobs.IMPL, name
    return prev


__all__ = ["fused_linear_logprobs", "fused_linear_cross_entropy", "set_impl", "HAS_TRITON", "INTERPRET"]
