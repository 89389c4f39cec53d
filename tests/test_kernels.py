"""
kernels/ against float64 PyTorch autograd computed from the same inputs (CPU).

    python -m pytest tests/test_kernels.py -v

Every case runs twice: on the PyTorch reference path here, and on the Triton path under the Triton interpreter
in a child pytest process (test_triton_interpreter) started with TRITON_INTERPRET=1. NOTE the variable must be
set before triton decorates the kernels, i.e. before `import kernels`, so it can not be switched on inside a
process that already imported them (other test modules do). The interpreter runs programs one by one on the
CPU (~4 ms each), so shapes stay small; slab and chunk sizes are shrunk to force several of them.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import logprobs as lp

IGNORE = -100
# name: (N, H, V, temperature, ignored rows, logits, slab width) -- sizes that are multiples of no block size.
# The slab width shrinks the chunk budget: V=1000 at 384 is 3 slabs (the first 232 wide), V=1537 at 384 has a
# first slab 1 wide; cross-entropy chunks become 16 rows. None keeps the default budget: one slab, one chunk.
# The "wide" cases have rows longer than one Triton tile (2048 columns): the online softmax rescales within a row,
# the slab kernels' column tiles are offset, the last tile is partial (V=6000 at 2600: slabs 880, 2560, 2560).
CASES = {
    "plain":   (37, 48, 1000, 1.0, "none", "normal", None),
    "slabs":   (37, 48, 1000, 0.7, "some", "normal", 384),
    "large":   (29, 32, 1537, 1.5, "some", "large", 384),
    "peaked":  (37, 48, 300, 1.0, "some", "peaked", 128),
    "ignored": (19, 48, 300, 0.7, "all", "normal", 128),
    "wide":    (5, 16, 4500, 0.7, "some", "normal", None),
    "wide-slabs": (6, 16, 6000, 1.0, "some", "peaked", 2600),
}
MAX_ERR = {}  # worst errors seen, printed with -s


def skip_unless(impl):
    if impl == "triton" and not kernels.INTERPRET:
        pytest.skip("the Triton path runs under the interpreter in test_triton_interpreter's child process")


@pytest.fixture(params=["torch", "triton"])
def impl(request):
    skip_unless(request.param)
    prev, chunk = kernels.set_impl(request.param), lp.CHUNK_BYTES
    yield request.param
    kernels.set_impl(prev)
    lp.CHUNK_BYTES = chunk


def make(N, H, V, ignored, logits, vs, seed=0):
    """Inputs for one case: x (N, H), w (V, H), distinct targets y (N,), upstream gradient g (N,)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=gen)
    w = torch.randn(V, H, generator=gen) / H**0.5 * (30.0 if logits == "large" else 1.0)  # logits ~N(0, 1 or 30)
    y = torch.randperm(V, generator=gen)[:N]
    # rows 0, 2, 4, ... (never ignored) target the first id of every vocabulary slab and the last id of all, where
    # a kernel's bounds could be off by one; swapped in, so the targets stay distinct
    slab = min(V, lp.fit(vs)) if vs else V
    for row, v in zip(range(0, N, 2), sorted({v0 for v0, _ in lp.slabs(V, slab)} | {V - 1})):
        y[y == v] = y[row].clone()
        y[row] = v
    if logits == "shared":  # rows of W share one vector and logits are small (a flat softmax): in dX = g (w_y -
        w = (w + w[0]) / 10  # sum_v p_v w_v) / T the shared part cancels, so the slab sums are larger than dX
    if logits == "peaked":  # half the rows put ~25 nats on their target: a softmax within 1e-7 of one-hot
        w[y[::2]] = x[::2] * (25.0 / (x[::2] ** 2).sum(1, keepdim=True))
    if ignored == "some":
        y[1::4] = IGNORE
    elif ignored == "all":
        y[:] = IGNORE
    g = torch.randn(N, generator=gen)  # positive, negative ...
    g[::5] = 0.0  # ... and zero
    lp.CHUNK_BYTES = N * vs * 4 if vs else 2**28  # fp32 buffer of N x vs logits
    return x.requires_grad_(), w.requires_grad_(), y, g


def oracle(x, w, y, T, g):
    """float64 autograd from the same inputs: logp (N,), dX, dW for per-token upstream gradient g."""
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    valid = y != IGNORE
    logp = torch.log_softmax(x64 @ w64.T / T, dim=-1).gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
    logp = torch.where(valid, logp, 0.0)
    (logp * g.double()).sum().backward()
    return logp.detach(), x64.grad, w64.grad


def close(name, got, ref, tol=1e-5):
    # max-abs error relative to the largest reference value (absolute below 1); exact zeros stay exact
    scale = max(1.0 if name in ("logp", "loss", "lsq") else 0.0, ref.abs().max().item())
    err = (got.double() - ref).abs().max().item() / scale if scale > 0 else got.abs().max().item()
    MAX_ERR[name] = max(MAX_ERR.get(name, 0.0), err)
    assert err <= tol, f"{name}: error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("case", CASES)
def test_logprobs(impl, case):
    N, H, V, T, ignored, logits, vs = CASES[case]
    x, w, y, g = make(N, H, V, ignored, logits, vs)
    logp = kernels.fused_linear_logprobs(x, w, y, temperature=T, ignore_index=IGNORE)
    logp.backward(g)
    ref = oracle(x, w, y, T, g)
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    close("logp", logp, ref[0])
    close("dX", x.grad, ref[1])
    close("dW", w.grad, ref[2])
    # ignored rows: logp and their gradient exactly 0
    skip = y == IGNORE
    assert (logp[skip] == 0).all() and (x.grad[skip] == 0).all()
    assert (logp <= 1e-6).all()


@pytest.mark.parametrize("case", CASES)
def test_log_sum_sq(impl, case):
    # return_lsq: log sum_v p_v^2 per row (WPO's weight alignment) against float64, 0 on ignored rows, no
    # gradient; the log-probs and their gradients are unchanged by asking for it
    N, H, V, T, ignored, logits, vs = CASES[case]
    x, w, y, g = make(N, H, V, ignored, logits, vs)
    logp, lsq = kernels.fused_linear_logprobs(x, w, y, temperature=T, ignore_index=IGNORE, return_lsq=True)
    assert not lsq.requires_grad and lsq.shape == (N,)
    logp.backward(g)
    ls = torch.log_softmax(x.detach().double() @ w.detach().double().T / T, dim=-1)
    ref = torch.where(y != IGNORE, torch.logsumexp(2 * ls, -1), 0.0)
    close("lsq", lsq, ref)
    assert (lsq[y == IGNORE] == 0).all() and (lsq <= 1e-6).all()
    ref_logp, ref_dx, ref_dw = oracle(x, w, y, T, g)
    close("logp", logp, ref_logp)
    close("dX", x.grad, ref_dx)
    close("dW", w.grad, ref_dw)
    with torch.no_grad():  # the no-graph path (reference-model passes) gives the same numbers
        _, lsq2 = kernels.fused_linear_logprobs(x, w, y, temperature=T, ignore_index=IGNORE, return_lsq=True)
    close("lsq", lsq2, ref)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", CASES)
def test_cross_entropy(impl, case, reduction):
    N, H, V, T, ignored, logits, vs = CASES[case]
    x, w, y, _ = make(N, H, V, ignored, logits, vs)
    up = 1.0 if case == "plain" else -0.37  # the upstream gradient of the scalar loss
    loss = kernels.fused_linear_cross_entropy(x, w, y, ignore_index=IGNORE, reduction=reduction)
    (loss * up).backward()
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    nll = F.cross_entropy(x64 @ w64.T, y, ignore_index=IGNORE, reduction="sum")
    ref = nll / max(1, int((y != IGNORE).sum())) if reduction == "mean" else nll  # mean of nothing is 0
    (ref * up).backward()
    close("loss", loss.detach(), ref.detach())
    close("dX", x.grad, x64.grad)
    close("dW", w.grad, w64.grad)
    assert (x.grad[y == IGNORE] == 0).all()


def test_normalised(impl):
    # logp over every possible target sums to 1: one hidden row repeated V times, targets 0..V-1
    V, H = 100, 24
    x = torch.randn(1, H).expand(V, H)
    w = torch.randn(V, H)
    logp = kernels.fused_linear_logprobs(x, w, torch.arange(V), temperature=0.7)
    assert abs(logp.double().exp().sum().item() - 1.0) < 1e-5 and (logp <= 0).all()


def test_no_grad_and_retain_graph(impl):
    x, w, y, g = make(16, 32, 600, "some", "normal", 256, seed=1)  # 3 slabs
    with torch.no_grad():  # the forward-only path (no buffer kept)
        logp0 = kernels.fused_linear_logprobs(x, w, y, 0.7)
        loss0 = kernels.fused_linear_cross_entropy(x, w, y)
    logp = kernels.fused_linear_logprobs(x, w, y, 0.7)
    assert torch.equal(logp0, logp.detach())
    assert torch.allclose(loss0, kernels.fused_linear_cross_entropy(x, w, y).detach(), rtol=1e-6)
    # a second backward through the same graph recomputes the slab the first one overwrote
    logp.backward(g, retain_graph=True)
    dx, dw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    logp.backward(g)
    assert torch.equal(dx, x.grad) and torch.equal(dw, w.grad)


@pytest.mark.parametrize("case", [(19, 48, 1000, "large", 384, 2),  # a few slabs
                                  (16, 48, 3000, "shared", 32, 3)])  # 47 slabs: dX's running sum
def test_bf16(impl, case):
    # bf16 inputs (the GPU case): error vs fp64 no worse than eager bf16 PyTorch's own error + 1e-2, however
    # many slabs dX is summed over (in the second case a bf16 running sum, rounded once per slab, is 2.8e-2 off
    # against eager's 7.4e-3; the fp32 sum, 5.0e-3)
    N, H, V, logits, vs, seed = case
    x, w, y, g = make(N, H, V, "some", logits, vs, seed=seed)
    x, w = (t.detach().bfloat16().requires_grad_() for t in (x, w))
    logp = kernels.fused_linear_logprobs(x, w, y, 0.7)
    logp.backward(g)
    xe, we = (t.detach().clone().requires_grad_() for t in (x, w))
    valid = y != IGNORE
    eager = torch.log_softmax((xe @ we.T).float() / 0.7, -1).gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
    eager = torch.where(valid, eager, 0.0)
    eager.backward(g)
    ref = oracle(x, w, y, 0.7, g)
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16
    # errors relative to each tensor's scale (bf16 rounds relative to magnitude), absolute below 1 for logp
    for got, ours, want, floor in [(logp, eager, ref[0], 1.0), (x.grad, xe.grad, ref[1], 0.0),
                                   (w.grad, we.grad, ref[2], 0.0)]:
        scale = max(floor, want.abs().max().item())
        err, err_eager = [(t.double() - want).abs().max().item() / scale for t in (got, ours)]
        assert err <= err_eager + 1e-2, (err, err_eager)


@pytest.mark.parametrize("n_chunks, max_chunks", [(16, None), (4, 2)])
def test_cross_entropy_bf16(impl, n_chunks, max_chunks, monkeypatch):
    # bf16 inputs: the mean loss's gradients within eager bf16's own error + 1e-2 of fp64. dW is a bf16 sum over
    # chunks of 16 rows here, rounded once per chunk: at 16 chunks, the most the grad-in-forward path takes,
    # 1.1e-2 against eager's 4.3e-3 (24 chunks: 1.9e-2, past the rule). Past MAX_CHUNKS the log-probs op computes
    # it: forced here at 4 chunks by lowering the limit (and the grad-in-forward path made unusable)
    from kernels import cross_entropy as ce
    if max_chunks:
        monkeypatch.setattr(ce, "MAX_CHUNKS", max_chunks)
        monkeypatch.setattr(ce, "_ce", None)
    N, H, V = 16 * n_chunks, 48, 1000
    x, w, y, _ = make(N, H, V, "some", "normal", None, seed=4)
    lp.CHUNK_BYTES = 16 * V * 2
    x, w = (t.detach().bfloat16().requires_grad_() for t in (x, w))
    xe, we = (t.detach().clone().requires_grad_() for t in (x, w))
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    kernels.fused_linear_cross_entropy(x, w, y, ignore_index=IGNORE).backward()
    F.cross_entropy((xe @ we.T).float(), y, ignore_index=IGNORE).backward()
    F.cross_entropy(x64 @ w64.T, y, ignore_index=IGNORE).backward()
    for got, eager, want in [(x.grad, xe.grad, x64.grad), (w.grad, we.grad, w64.grad)]:
        scale = want.abs().max().item()
        err, err_eager = [(t.double() - want).abs().max().item() / scale for t in (got, eager)]
        assert err <= err_eager + 1e-2, (err, err_eager)


def test_bad_inputs():
    x, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, IGNORE, 3])
    with pytest.raises(ValueError, match="weight"):
        kernels.fused_linear_logprobs(x, torch.randn(10, 7), y)
    with pytest.raises(ValueError, match="targets"):
        kernels.fused_linear_logprobs(x, w, y[:3])
    with pytest.raises(ValueError, match=r"targets\[3\] = 10"):
        kernels.fused_linear_cross_entropy(x, w, torch.tensor([1, 2, IGNORE, 10]))
    with pytest.raises(ValueError, match="temperature"):
        kernels.fused_linear_logprobs(x, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        kernels.fused_linear_cross_entropy(x, w, y, reduction="none")


def test_slabs():
    # the vocabulary is covered exactly once, the remainder slab comes first, the others are full
    for V, vs in [(1000, 256), (1024, 256), (300, 512), (128256, 16384)]:
        s = lp.slabs(V, vs)
        assert s[0][0] == 0 and s[-1][1] == V and all(a[1] == b[0] for a, b in zip(s, s[1:]))
        assert all(b - a == min(vs, V) for a, b in s[1:]) and 0 < s[0][1] - s[0][0] <= vs


def test_triton_interpreter():
    # the Triton-path cases above, in a child process that sets TRITON_INTERPRET=1 before importing triton
    if kernels.INTERPRET:
        pytest.skip("already under the interpreter: the Triton cases run in this process")
    if not kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-s", "-p", "no:cacheprovider",
           os.path.abspath(__file__), "-k", "triton"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    # every Triton case ran: the one skip is this test itself, in the child
    passed = re.search(r"(\d+) passed, 1 skipped", r.stdout)
    assert passed and int(passed.group(1)) >= 34, r.stdout[-3000:]
    print("\n[interpreter]", *[ln for ln in r.stdout.splitlines() if "worst errors" in ln or " passed" in ln])


def test_kernels_compile_for_an_h100():
    # The interpreter accepts code that the GPU compiler rejects; triton.compile with an explicit target lowers each
    # kernel to an sm_90 cubin here (ptxas ships in the wheel), so such an error shows up without a GPU. bf16, the
    # widest tile and both sides of every constexpr flag, as the training scripts launch them. (Not named for the
    # interpreter child's "-k triton": the kernels are not JIT functions there.)
    if not kernels.HAS_TRITON or kernels.INTERPRET:
        pytest.skip("needs triton, outside the interpreter")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time compile API: {e}")
    from kernels import cross_entropy as ce
    rows = {"z_ptr": "*bf16", "y_ptr": "*i64"}
    cases = [(lp._lse_slab_kernel, {**rows, "m_ptr": "*fp32", "s_ptr": "*fp32", "q_ptr": "*fp32", "zy_ptr": "*fp32",
                                    "stride": "i32", "v0": "i32", "n_cols": "i32", "inv_t": "fp32"}, "SQ"),
             (lp._dz_slab_kernel, {**rows, "lse_ptr": "*fp32", "g_ptr": "*fp32", "stride": "i32", "v0": "i32",
                                   "n_cols": "i32", "inv_t": "fp32", "ignore_index": "i32"}, None),
             (ce._ce_row_kernel, {**rows, "nll_ptr": "*fp32", "scale_ptr": "*fp32", "stride": "i32", "n_cols": "i32",
                                  "ignore_index": "i32"}, "HAS_GRAD")]
    for fn, sig, flag in cases:
        for on in ((False, True) if flag else (None,)):
            const = {"BLOCK": 2048, **({flag: on} if flag else {})}
            src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
            try:
                lp.triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
            except (FileNotFoundError, RuntimeError) as e:
                if "ptxas" in str(e) and "not found" in str(e).lower():
                    pytest.skip(f"no ptxas: {e}")
                raise
    src = ASTSource(fn=ce._scale_kernel, signature={"x_ptr": "*bf16", "g_ptr": "*fp32", "n": "i32",
                                                     "BLOCK": "constexpr"}, constexprs={"BLOCK": 4096})
    lp.triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})


def test_training_scripts_same_loss_on_both_paths(tmp_path):
    # sft.py (fused cross-entropy) and dpo.py (fused log-probs, policy and cached reference), 3 steps of 4:
    # the Triton path under the interpreter and the PyTorch reference give the same losses and weights
    if not kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    import tasks
    from safetensors.torch import load_file
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sft = tasks.make_tasks(seed=0, n_sft=48, n_prefs=2, n_rl=2, n_eval=2)[0]
    # pairs: an SFT conversation against the same prompt answered with the next row's answer
    prefs = [{"chosen": a["messages"], "rejected": a["messages"][:-1] + b["messages"][-1:]}
             for a, b in zip(sft, sft[1:])]
    base = tasks.make_base_checkpoint(str(tmp_path / "base"), sft, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                      ffn_dim=64, vocab_size=300)
    for name, rows in (("sft", sft), ("prefs", prefs)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    runs = {"sft.py": ["--data", tmp_path / "sft.jsonl", "--preset", "tiny", "--val-frac", "0", "--batch-size", "4",
                       "--lr", "1e-2"],
            "dpo.py": ["--data", tmp_path / "prefs.jsonl", "--preset", "tiny", "--batch-size", "4", "--lr", "1e-3",
                       "--loss-type", "dpo"]}
    for script, extra in runs.items():
        got = {}
        for impl in ("torch", "triton"):
            out = tmp_path / f"{script}-{impl}"
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root, KERNELS_IMPL=impl, CUDA_VISIBLE_DEVICES="",
                       TRITON_INTERPRET="1" if impl == "triton" else "0")
            cmd = [sys.executable, script, "--ckpt", base, "--out", out, "--max-steps", "3", "--eval-n", "0",
                   "--max-len", "64", *extra]
            r = subprocess.run(list(map(str, cmd)), cwd=root, env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-3000:]
            loss = [json.loads(ln)["loss"] for ln in open(out / "metrics.jsonl") if "loss" in json.loads(ln)]
            got[impl] = loss, load_file(str(out / "model.safetensors"))
        (l0, w0), (l1, w1) = got["torch"], got["triton"]
        assert len(l0) == 3 and l0 == pytest.approx(l1, rel=1e-5, abs=1e-6), (script, l0, l1)
        # Adam divides by the gradient's running RMS: on near-zero gradients fp32 rounding noise becomes a
        # visible fraction of a step, so the weights (moved ~3 x lr = 3e-2) agree to 1e-4, not 1e-6
        diff = max((w0[k] - w1[k]).abs().max().item() for k in w0)
        print(f"\n{script}: losses {l0} vs {l1}, max weight difference {diff:.1e}")
        assert diff < 1e-4, script


def test_reference_path_bf16_inputs_and_another_ignore_index():
    # the PyTorch reference (the CPU path) does its maths in fp32 from bf16 inputs: within 1e-4 of float64 on
    # the same bf16 values (bf16 maths would be ~1e-2 off); and cross-entropy honours any ignore_index
    prev = kernels.set_impl("torch")
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(16, 32, generator=g).bfloat16(), torch.randn(300, 32, generator=g).bfloat16()
        y = torch.randint(0, 300, (16,), generator=g)
        want = torch.log_softmax(x.double() @ w.double().T / 0.7, -1).gather(1, y[:, None])[:, 0]
        assert (kernels.fused_linear_logprobs(x, w, y, 0.7).double() - want).abs().max() < 1e-4
        x, w = x.float(), w.float()
        y[::3] = -1
        got = kernels.fused_linear_cross_entropy(x, w, y, ignore_index=-1, reduction="sum")
        want = F.cross_entropy(x.double() @ w.double().T, y, ignore_index=-1, reduction="sum")
        assert got.item() == pytest.approx(want.item(), abs=1e-4)
    finally:
        kernels.set_impl(prev)


def teardown_module():
    print("\nworst errors:", {k: f"{v:.1e}" for k, v in MAX_ERR.items()})
