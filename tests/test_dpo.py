"""
dpo.py: every loss against a float64 implementation of its paper's formula (values and gradients), the
reward/accuracy definitions, cached reference log-probs, a tiny run that learns, 2-rank FSDP parity,
kill-and-resume, bad input.

    python -m pytest tests/test_dpo.py -v
"""
import json
import math
import os
import random
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import tasks
from common import IGNORE
from data import compact, epoch_order, pad_batch
from dpo import LOSS_TYPES, encode_response, pick_pair, preference_loss, reference_key
from helpers import (clip_grads, eval_length, held_out_file, kill_at_first_checkpoint, nan_checkpoint,
                     perturb_in_place, python, recording_evaluate, refusal, run_here, syncs_between_backwards,
                     update_gap)
from model import Llama
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CPU tests: the runs are compared with float64 references, so a GPU (bf16 compute under FSDP2) stays hidden
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}

# -----------------------------------------------------------------------------
# the losses: float64 references written from the papers, derivatives worked out by hand


def logsig(z):  # log sigmoid(z), stable for large |z|
    return -(max(-z, 0.0) + math.log1p(math.exp(-abs(z))))


def sig(z):
    return math.exp(logsig(z))


def paper_loss(kind, pc, pr, rc, rr, nc, nr, qc, qr, beta, gbr, eps):
    """One pair, python floats (float64). -> (loss, dloss/dpc, dloss/dpr, reward_c, reward_r), where
    pc/pr are the policy's summed log-probs of chosen/rejected, rc/rr the reference's and qc/qr the
    summed per-token log sum_v pi(v)^2 (WPO)."""
    nc, nr = max(nc, 1), max(nr, 1)  # an empty response averages to 0
    if kind == "ipo":
        # Azar et al. 2023 eq. 17: (h - 1/(2 tau))^2, h = log [pi(yw) pi_ref(yl) / (pi(yl) pi_ref(yw))], on
        # per-token average log-probs (TRL's IPO)
        h = (pc - rc) / nc - (pr - rr) / nr
        g = 2 * (h - 1 / (2 * beta))
        return (h - 1 / (2 * beta)) ** 2, g / nc, -g / nr, beta * (pc - rc) / nc, beta * (pr - rr) / nr
    if kind == "simpo":
        # Meng et al. 2024 (SimPO objective): -log sigmoid(beta/|yw| log pi(yw) - beta/|yl| log pi(yl) - gamma)
        z = beta * pc / nc - beta * pr / nr - gbr * beta
        dzc, dzr = beta / nc, -beta / nr
        rw_c, rw_r = beta * pc / nc, beta * pr / nr
    elif kind == "dpo_norm":
        # Tülu 3: DPO (Rafailov et al. 2023 eq. 7) on per-token average log-probs
        z = beta * ((pc / nc - rc / nc) - (pr / nr - rr / nr))
        dzc, dzr = beta / nc, -beta / nr
        rw_c, rw_r = beta * (pc - rc) / nc, beta * (pr - rr) / nr
    else:  # dpo, wpo: DPO on summed log-probs
        z = beta * ((pc - rc) - (pr - rr))
        dzc, dzr = beta, -beta
        rw_c, rw_r = beta * (pc - rc), beta * (pr - rr)
    # conservative DPO: with prob eps the label is flipped
    loss = -(1 - eps) * logsig(z) - eps * logsig(-z)
    dz = -(1 - eps) * sig(-z) + eps * sig(z)
    w = 1.0
    if kind == "wpo":  # Zhou et al. 2024 eq. 2, aligned: exp(avg log(pi / sum pi^2) over yw and over yl), constant
        w = min(1.0, math.exp((pc - qc) / nc + (pr - qr) / nr))
    return w * loss, w * dz * dzc, w * dz * dzr, rw_c, rw_r


def random_pairs(P, seed, dtype=torch.float64):
    """Random summed log-probs and lengths (some zero: empty responses have log-prob 0)."""
    g = torch.Generator().manual_seed(seed)
    nc, nr = torch.randint(0, 30, (P,), generator=g), torch.randint(0, 30, (P,), generator=g)
    nc[:3] = 0
    nr[2:5] = 0
    per_tok = lambda: torch.rand(P, generator=g, dtype=dtype) * 3 + 0.05  # noqa: E731
    pc, pr = -nc * per_tok(), -nr * per_tok()
    rc = pc + torch.randn(P, generator=g, dtype=dtype) * 2 * (nc > 0)
    rr = pr + torch.randn(P, generator=g, dtype=dtype) * 2 * (nr > 0)
    # summed log sum_v p_v^2: between log p_max^2 ... 0 per token; here up to 2 nats a token below 0
    qc, qr = -nc * torch.rand(P, generator=g, dtype=dtype) * 2, -nr * torch.rand(P, generator=g, dtype=dtype) * 2
    return pc, pr, rc, rr, nc, nr, qc, qr


SETTINGS = [("dpo", 0.1, 0.0), ("dpo", 0.5, 0.2), ("dpo_norm", 5.0, 0.0), ("dpo_norm", 2.0, 0.1), ("simpo", 2.0, 0.0),
            ("simpo", 10.0, 0.1), ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0), ("wpo", 0.1, 0.0), ("wpo", 1.0, 0.3)]


@pytest.mark.parametrize("kind,beta,eps", SETTINGS)
def test_loss_matches_paper(kind, beta, eps):
    assert {k for k, _, _ in SETTINGS} == set(LOSS_TYPES)
    gbr = 0.3 if kind != "simpo" or beta < 5 else 0.5
    pc, pr, rc, rr, nc, nr, qc, qr = random_pairs(64, seed=SETTINGS.index((kind, beta, eps)))
    want = torch.tensor([paper_loss(kind, *(float(t[i]) for t in (pc, pr, rc, rr, nc, nr, qc, qr)), beta, gbr, eps)
                         for i in range(64)], dtype=torch.float64)  # (P, 5)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, rw_c, rw_r = preference_loss(pc, pr, None if kind == "simpo" else rc, None if kind == "simpo" else rr,
                                         nc, nr, kind, beta, gamma_beta_ratio=gbr, label_smoothing=eps,
                                         chosen_lsq=qc, rejected_lsq=qr)
    losses.sum().backward()
    assert losses.dtype == torch.float64 and losses.shape == (64,)
    torch.testing.assert_close(losses.detach(), want[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pc.grad, want[:, 1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pr.grad, want[:, 2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rw_c, want[:, 3], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rw_r, want[:, 4], rtol=1e-10, atol=1e-12)
    assert not rw_c.requires_grad and not rw_r.requires_grad
    # fp32 inputs (what the script passes) agree to fp32 precision
    f = [t.detach().float() for t in (pc, pr, rc, rr)]
    l32, _, _ = preference_loss(*f, nc, nr, kind, beta, gamma_beta_ratio=gbr, label_smoothing=eps,
                                chosen_lsq=qc.float(), rejected_lsq=qr.float())
    assert l32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), want[:, 0], rtol=1e-4, atol=1e-5)


def test_zero_length_responses_give_no_nan():
    for kind in LOSS_TYPES:
        z = torch.zeros(4, dtype=torch.float32, requires_grad=True)
        n = torch.zeros(4, dtype=torch.long)
        losses, rw_c, rw_r = preference_loss(z, z, z.detach(), z.detach(), n, n, kind, 5.0, chosen_lsq=z.detach(),
                                             rejected_lsq=z.detach())
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(z.grad).all(), kind
        assert torch.isfinite(rw_c).all() and torch.isfinite(rw_r).all(), kind


def test_loss_argument_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(x, x, x, x, x, x, "kto", 0.1)
    with pytest.raises(ValueError, match="ipo"):
        preference_loss(x, x, x, x, x, x, "ipo", 0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="wpo needs chosen_lsq"):
        preference_loss(x, x, x, x, x, x, "wpo", 0.1)


def test_wpo_weight_has_no_gradient():
    # d/dpc of w * l with w held constant is w * dl/dpc; were w differentiated, the extra term w/nc * l would show
    pc, pr = torch.tensor([-4.0], requires_grad=True), torch.tensor([-6.0], requires_grad=True)
    n = torch.tensor([2])
    q = torch.tensor([-1.0])
    preference_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]), n, n, "wpo", 1.0, chosen_lsq=q,
                    rejected_lsq=q)[0].sum().backward()
    w = math.exp((-4 + 1) / 2 + (-6 + 1) / 2)
    assert pc.grad.item() == pytest.approx(-w * sig(-(1.0 - -1.0)), rel=1e-5)


def test_preference_row_formats():
    """The three shapes preference data comes in give the same conversations."""
    from data import pref_row
    u = {"role": "user", "content": "Q?"}
    a, b = {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}
    want = ([u, a], [u, b])
    assert pref_row({"chosen": [u, a], "rejected": [u, b]}, "f:1") == want             # whole conversations
    assert pref_row({"prompt": "Q?", "chosen": "a", "rejected": "b"}, "f:1") == want    # prompt apart, strings
    assert pref_row({"prompt": [u], "chosen": [a], "rejected": [b]}, "f:1") == want    # prompt apart, messages
    # Tülu 3 / UltraFeedback: "prompt" is there, but chosen/rejected already hold it (not prepended twice)
    assert pref_row({"prompt": "Q?", "chosen": [u, a], "rejected": [u, b]}, "f:1") == want
    s = {"role": "system", "content": "Be brief."}  # ... also when they open with a system turn
    assert pref_row({"prompt": "Q?", "chosen": [s, u, a], "rejected": [s, u, b]}, "f:1") == ([s, u, a], [s, u, b])


def test_pick_pair():
    assert pick_pair([(0.0, "a", True), (1.0, "b", True), (1.0, "c", True), (0.0, "d", True)]) == ("b", "a")
    assert pick_pair([(1.0, "a", True), (1.0, "b", True)]) is None            # no wrong answer
    assert pick_pair([(0.0, "a", True), (0.5, "b", True)]) is None            # no fully correct answer
    assert pick_pair([(1.0, "cut", False), (0.0, "w", True)]) is None         # a cut-off answer is never chosen
    assert pick_pair([(1.0, "ok", True), (1.0, "cut", False), (0.0, "w", False)]) == ("ok", "w")
    # a wrong answer that finished is preferred to one cut off by the token limit, which may be right so far
    assert pick_pair([(0.0, "cut", False), (1.0, "ok", True), (0.0, "w1", True), (0.0, "w2", True)]) == ("ok", "w1")


# -----------------------------------------------------------------------------
# the script on a tiny model


def make_pairs(n, seed=0):
    """Arithmetic pairs: chosen is right and short, rejected wrong and longer; mixed row formats."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        q = f"{tasks.NAMES[i % len(tasks.NAMES)]} has {a} pens and finds {b} more. How many pens now?"
        good, bad = f"{a} + {b} = {a + b}.\n#### {a + b}", f"{a} + {b} is {a + b + 3}, I think.\n#### {a + b + 3}"
        if i % 3 == 0:  # {"prompt", "chosen", "rejected"} with strings
            rows.append({"prompt": q, "chosen": good, "rejected": bad})
        else:  # full conversations, a third of them multi-turn
            p = [{"role": "user", "content": q}]
            if i % 3 == 1:
                p = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}] + p
            rows.append({"chosen": p + [{"role": "assistant", "content": good}],
                         "rejected": p + [{"role": "assistant", "content": bad}]})
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random base checkpoint; prefs.jsonl with 48 pairs plus one whose prompt alone is longer
    than --max-len 64 (dropped)."""
    d = tmp_path_factory.mktemp("dpo")
    long = {"prompt": "Please add all of these numbers for me. " * 12, "chosen": "5", "rejected": "6"}
    rows = make_pairs(48) + [long]
    convs = [{"messages": r["chosen"]} if "chosen" in r and isinstance(r["chosen"], list) else
             {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
             for r in rows]
    base = tasks.make_base_checkpoint(str(d / "base"), convs, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                      ffn_dim=64, vocab_size=300)
    path = str(d / "prefs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return base, path, d


# 48 pairs, 8 per step (micro-batches of 4 pairs), 2 epochs: 12 steps, a checkpoint every 3
ARGS = ["--loss-type", "dpo", "--beta", "0.5", "--lr", "1e-2", "--batch-size", "8", "--micro-batch-size", "4",
        "--max-len", "64", "--epochs", "2", "--save-every", "3"]


def run_dpo(tiny, out, *extra, nproc=1, wait=True):
    base, path, _ = tiny
    cmd = ["dpo.py", "--ckpt", base, "--data", path, "--preset", "tiny", "--out", str(out), *ARGS, *map(str, extra)]
    cmd = python(*cmd, nproc=nproc)
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def run_dpo_here(monkeypatch, capsys, tiny, out, *extra):
    """run_dpo in this process -> what it printed."""
    run_here(monkeypatch, "dpo.py", "--ckpt", tiny[0], "--data", tiny[1], "--preset", "tiny", "--out", out, *ARGS,
             *extra)
    return capsys.readouterr().out


def metrics(out):
    return [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def run_a(tiny):
    """The uninterrupted single-process run the others are compared with."""
    out = tiny[2] / "a"
    return out, run_dpo(tiny, out)


def encoded_pairs(tiny):
    """The pairs in the order the script uses (load_mixture's seeded shuffle), encoded."""
    from data import load_mixture, pref_row
    tok = Tokenizer.from_pretrained(tiny[0])
    rows, _ = load_mixture([tiny[1]], pref_row, seed=0)
    enc = [(encode_response(tok, c, 64), encode_response(tok, r, 64)) for c, r in rows]
    return [e for e in enc if e[0] is not None and e[1] is not None]


def logps64(ckpt, pairs, model=None):
    """Summed log-probs of chosen and rejected, (N, 2), from a float64 full log-softmax: the on-the-fly
    computation a resident reference model would do. Differentiable when a float64 model is passed."""
    if model is None:
        with torch.no_grad():
            return logps64(ckpt, pairs, Llama.from_pretrained(ckpt, dtype=torch.float64))
    out = []
    for c, r in pairs:
        b = pad_batch([c, r], 0)
        logp = model(b["input_ids"]).log_softmax(-1)                                  # (2, T, V)
        y = b["targets"]
        out.append((logp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != IGNORE)).sum(-1))
    return torch.stack(out)


def test_encode_response_targets_the_last_turn(tiny):
    tok = Tokenizer.from_pretrained(tiny[0])
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 + 3 = 5.\n#### 5"}]
    ids, labels = encode_response(tok, msgs, 512)
    assert tok.decode([t for t in labels if t != IGNORE]) == "2 + 3 = 5.\n#### 5<|endoftext|>"
    assert [i for i, t in zip(ids, labels) if t != IGNORE] == [t for t in labels if t != IGNORE]
    trained = [t for t in labels if t != IGNORE]
    cut = encode_response(tok, msgs, len(ids) - 3)  # right-truncated: the response loses its last 3 tokens
    assert [t for t in cut[1] if t != IGNORE] == trained[:-3]
    # the last turn truncated away: nothing to compare, even though the earlier assistant turn survives
    assert encode_response(tok, msgs, 12) is None


def test_run_learns_and_caches_reference(tiny, run_a):
    out, log = run_a
    assert "pairs: 48;" in log and "1 dropped" in log
    pairs = encoded_pairs(tiny)
    assert len(pairs) == 48
    # the cache beside the output holds the start model's log-probs, equal to the on-the-fly ones
    caches = [f for f in os.listdir(out.parent) if f.startswith("a.ref-") and f.endswith(".pt")]
    assert len(caches) == 1
    cached = torch.load(out.parent / caches[0])["logps"]
    start = logps64(tiny[0], pairs)
    torch.testing.assert_close(cached, start, rtol=0, atol=2e-4)
    # step 0: the policy is the reference, so the rewards are 0, no pair is "correct" (strict >),
    # the loss is log 2, and the policy log-probs are the start model's on the step's pairs
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(12))
    first = epoch_order(48, 0, 0)[:8]
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m[0]["reward_chosen"] == m[0]["reward_rejected"] == m[0]["margin"] == m[0]["accuracy"] == 0
    assert m[0]["logp_chosen"] == pytest.approx(start[first, 0].mean().item(), abs=1e-3)
    assert m[0]["logp_rejected"] == pytest.approx(start[first, 1].mean().item(), abs=1e-3)
    # the step's gradient is that of the mean pair loss over its 8 pairs (two micro-batches of 4): the
    # logged grad norm (before clipping) against float64 autograd of -log sigmoid(beta h), h = 0 at step 0
    model = Llama.from_pretrained(tiny[0], dtype=torch.float64)
    lp = logps64(None, [pairs[i] for i in first], model)
    h = (lp[:, 0] - lp[:, 0].detach()) - (lp[:, 1] - lp[:, 1].detach())
    (-torch.nn.functional.logsigmoid(0.5 * h)).mean().backward()
    gnorm = torch.cat([q.grad.flatten() for q in model.parameters()]).norm().item()
    assert m[0]["grad_norm"] == pytest.approx(gnorm, rel=1e-4)
    # a few steps raise the margin; measured independently on all pairs with the final weights
    assert m[-1]["margin"] > 1 and m[-1]["accuracy"] == 1 and m[-1]["loss"] < 0.1
    end = logps64(str(out), pairs)
    margin = 0.5 * ((end[:, 0] - start[:, 0]) - (end[:, 1] - start[:, 1]))
    assert margin.mean() > 1 and (margin > 0).float().mean() > 0.9


def test_simpo_rewards_and_accuracy(tiny, monkeypatch, capsys):
    """SimPO needs no reference (no cache is written); step 0's metrics follow the definitions, from
    float64 log-probs of the start model: reward = beta * average log-prob, accuracy = share of pairs
    with reward_chosen > reward_rejected, loss = mean -log sigmoid(beta (avg_c - avg_r) - gamma)."""
    out = tiny[2] / "simpo"
    # ARGS' --beta 0.5 is dropped: simpo's own default beta (2, not dpo's 0.1) must be the one used
    args = [a for i, a in enumerate(ARGS) if a != "--beta" and (i == 0 or ARGS[i - 1] != "--beta")]
    run_here(monkeypatch, "dpo.py", "--ckpt", tiny[0], "--data", tiny[1], "--preset", "tiny", "--out", out, *args,
             "--loss-type", "simpo", "--gamma-beta-ratio", 0.5, "--max-steps", 1)
    log = capsys.readouterr().out
    assert "loss: simpo, beta 2.0" in log
    assert "reference log-probs" not in log
    assert not [f for f in os.listdir(out.parent) if f.startswith("simpo.ref-")]
    pairs = encoded_pairs(tiny)
    idx = epoch_order(48, 0, 0)[:8]
    lp = logps64(tiny[0], [pairs[i] for i in idx])                                    # (8, 2)
    n = torch.tensor([[sum(t != IGNORE for t in x[1][1:]) for x in pairs[i]] for i in idx], dtype=torch.float64)
    avg = lp / n
    rw = 2.0 * avg
    (m,) = metrics(out)
    assert m["reward_chosen"] == pytest.approx(rw[:, 0].mean().item(), abs=1e-4)
    assert m["reward_rejected"] == pytest.approx(rw[:, 1].mean().item(), abs=1e-4)
    assert m["margin"] == pytest.approx((rw[:, 0] - rw[:, 1]).mean().item(), abs=1e-4)
    assert m["accuracy"] == (rw[:, 0] > rw[:, 1]).double().mean().item()
    want = torch.nn.functional.softplus(-(2.0 * (avg[:, 0] - avg[:, 1]) - 0.5 * 2.0)).mean()
    assert m["loss"] == pytest.approx(want.item(), abs=1e-4)


def test_wpo_aligned_weights_in_the_script(tiny, monkeypatch, capsys):
    """At step 0 the policy is its reference, so every pair's DPO term is log 2 and the logged loss is
    log 2 x the mean WPO weight: min(1, exp(avg(log pi - log sum pi^2) over chosen + the same over rejected)),
    recomputed here from float64 full softmaxes."""
    out = tiny[2] / "wpo"
    run_dpo_here(monkeypatch, capsys, tiny, out, "--loss-type", "wpo", "--max-steps", 1)
    pairs = encoded_pairs(tiny)
    idx = epoch_order(48, 0, 0)[:8]
    model = Llama.from_pretrained(tiny[0], dtype=torch.float64)
    w = []
    with torch.no_grad():
        for i in idx:
            b = pad_batch(list(pairs[i]), 0)
            ls = model(b["input_ids"]).log_softmax(-1)                                  # (2, T, V)
            y, keep = b["targets"].clamp(min=0), b["targets"] != IGNORE
            adj = (ls.gather(-1, y[..., None])[..., 0] - torch.logsumexp(2 * ls, -1)) * keep
            w.append(min(1.0, math.exp((adj.sum(-1) / keep.sum(-1)).sum().item())))
    (m,) = metrics(out)
    assert 0.05 < min(w) < 1  # weights in play, not all clamped
    assert m["loss"] == pytest.approx(math.log(2) * sum(w) / len(w), rel=1e-5)


def test_two_ranks_equal_one(tiny, run_a):
    out = tiny[2] / "d"
    run_dpo(tiny, out, nproc=2)  # micro 4 x accum 1 x world 2 vs micro 4 x accum 2 x world 1
    a, d = metrics(run_a[0]), metrics(out)
    assert len(a) == len(d) == 12
    for key in ("loss", "margin", "accuracy", "logp_chosen", "grad_norm"):
        assert max(abs(x[key] - y[key]) for x, y in zip(a, d)) < 1e-4, key
    base = load_file(os.path.join(tiny[0], "model.safetensors"))
    assert update_gap(load_file(run_a[0] / "model.safetensors"), load_file(out / "model.safetensors"), base) < 1e-3
    # the cache the 2-rank run wrote holds every pair (each rank filled half of them), as a later run reads it
    (cache,) = [f for f in os.listdir(out.parent) if f.startswith("d.ref-")]
    torch.testing.assert_close(torch.load(out.parent / cache)["logps"], logps64(tiny[0], encoded_pairs(tiny)),
                               rtol=0, atol=2e-4)


def test_resume_after_kill_equals_uninterrupted(tiny, run_a):
    out = tiny[2] / "c"
    proc = run_dpo(tiny, out, wait=False)
    step = kill_at_first_checkpoint(proc, out, 240)
    assert 3 <= step < 12
    log = run_dpo(tiny, out, "--resume")
    assert f"resumed from {out} at step {step}" in log and "reference log-probs: loaded" in log
    m, a = metrics(out), metrics(run_a[0])
    assert [r["step"] for r in m] == list(range(12))  # the steps after the checkpoint were not logged twice
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, m)) < 1e-6
    assert max_diff(load_file(run_a[0] / "model.safetensors"), load_file(out / "model.safetensors")) < 1e-6


def test_bad_preference_data_is_one_clear_error(tiny, tmp_path, monkeypatch, capsys):
    good = json.dumps(make_pairs(1)[0])
    other = {"chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "b"}]}
    cases = {"malformed": (good + "\n{not json\n", ":2: malformed JSON"),
             "prompts": (good + "\n" + json.dumps(other) + "\n", ":2: chosen and rejected must share the same prompt"),
             "missing": (json.dumps({"chosen": other["chosen"]}) + "\n",
                         ":1: a preference row needs 'chosen' and 'rejected'"),
             "empty": ("", ": empty file"),
             "types": (json.dumps({"prompt": 5, "chosen": "a", "rejected": "b"}) + "\n",
                       ":1: prompt, chosen and rejected must each be a string or a list of messages"),
             "template": (json.dumps({"chosen": [{"role": "assistant", "content": "a"}, *other["chosen"]],
                                      "rejected": [{"role": "assistant", "content": "a"}, other["chosen"][0],
                                                   other["rejected"][1]]}) + "\n",
                          ":1: messages[0] is an assistant turn")}
    for name, (text, msg) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        with pytest.raises(SystemExit) as e:
            run_here(monkeypatch, "dpo.py", "--ckpt", tiny[0], "--data", path, "--preset", "tiny", "--out", tmp_path / "o")
        err = str(e.value)
        assert err.startswith(f"error: {path}{msg}") and "\n" not in err, err


def test_flags_refused_before_any_work(tiny, tmp_path, monkeypatch, capsys):
    # a beta that IPO divides by, label smoothing IPO does not define: refused at the command line, not after
    # the reference pass (hours at 8B)
    for extra, msg in [(["--loss-type", "ipo", "--beta", "0"], "argument --beta: expected a number > 0, got '0'"),
                       (["--label-smoothing", "0.7"], "argument --label-smoothing: expected a number >= 0 and <= 0.5"),
                       (["--loss-type", "ipo", "--label-smoothing", "0.1"],
                        "error: --label-smoothing is defined for the sigmoid losses, not ipo"),
                       (["--gamma-beta-ratio", "0.5"],  # (dpo_norm, the default loss)
                        "error: --gamma-beta-ratio is simpo's target margin; it has no effect on dpo_norm"),
                       (["--samples-per-prompt", "8"], "error: --samples-per-prompt sets the sampling of on-policy "
                        "pairs from the built-in prompts; it has no effect with --data")]:
        assert msg in refusal(monkeypatch, capsys, "dpo.py", "--ckpt", tiny[0], "--data", tiny[1], "--preset", "tiny",
                              "--out", tmp_path / "o", *extra), extra


def test_a_loss_that_is_not_finite_stops_the_run(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    err = refusal(monkeypatch, capsys, "dpo.py", "--ckpt", nan_checkpoint(tiny[0], tmp_path / "nan"), "--data", tiny[1],
                  "--preset", "tiny", "--out", out, *ARGS, "--max-steps", 2, "--save-every", 1)
    assert err == f"error: loss is nan at step 0; stopping. The last good checkpoint (if any) is untouched in {out}"
    assert not os.path.exists(out / "model.safetensors")


def test_a_damaged_reference_cache_is_recomputed(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "c"
    run_dpo_here(monkeypatch, capsys, tiny, out, "--max-steps", 1)
    (cache,) = [tmp_path / f for f in os.listdir(tmp_path) if f.startswith("c.ref-")]
    good = torch.load(cache)["logps"]
    cache.write_bytes(b"PK\x03\x04 cut short")
    left = tmp_path / "c.ref-0123456789abcdef.pt.tmp"  # another key's write killed before its rename
    left.write_bytes(b"PK\x03\x04")
    log = run_dpo_here(monkeypatch, capsys, tiny, out, "--max-steps", 1)
    assert f"cannot read {cache}" in log and "computing them again" in log
    assert torch.equal(torch.load(cache)["logps"], good)
    assert not left.exists() and not list(tmp_path.glob("*.tmp"))  # the leftover went with the next write


def test_a_run_matches_a_reference_trainer(tiny, tmp_path, monkeypatch):
    """Four optimizer steps of the script against a trainer written out here in float64: dpo_norm (the
    presets' loss) at its default beta 5 (--beta not given) with conservative DPO's label smoothing 0.2; 48
    pairs in batches of 16 (micro-batches of 8), so step 3 opens the second epoch, in its own order; lr 1e-3
    warmed up over 2 steps then linear to 0; AdamW without decay; the gradient clipped to norm 0.05. The
    reference is the start model (float64 log-probs computed here), the loss the mean over the step's pairs of
    -(1 - eps) log sig(z) - eps log sig(-z), z = beta (avg ratio chosen - avg ratio rejected) (Rafailov et al.
    eq. 7 on Tülu 3's per-token averages; Mitchell's label noise). Each step's logged loss, rewards, accuracy,
    policy log-probs, lr and gradient norm (before clipping), and the final weights."""
    out, lr, clip, eps, beta = tmp_path / "o", 1e-3, 0.05, 0.2, 5.0
    args = [a for i, a in enumerate(ARGS) if a != "--beta" and (i == 0 or ARGS[i - 1] != "--beta")]
    run_here(monkeypatch, "dpo.py", "--ckpt", tiny[0], "--data", tiny[1], "--preset", "tiny", "--out", out, *args,
             "--loss-type", "dpo_norm", "--batch-size", 16, "--micro-batch-size", 8, "--max-steps", 4, "--lr", lr,
             "--schedule", "linear", "--warmup-ratio", 0.5, "--label-smoothing", eps, "--grad-clip", clip,
             "--save-every", 0)
    logged = metrics(out)
    assert [m["step"] for m in logged] == [0, 1, 2, 3]

    pairs = encoded_pairs(tiny)
    ref = logps64(tiny[0], pairs)                                                       # (48, 2)
    n = torch.tensor([[sum(t != IGNORE for t in x[1][1:]) for x in p] for p in pairs], dtype=torch.float64)
    assert (n[:, 0] != n[:, 1]).sum() > 24  # mostly unequal lengths: averages, not sums, matter
    model = Llama.from_pretrained(tiny[0], dtype=torch.float64)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    orders = [epoch_order(48, e, 0) for e in (0, 1)]
    assert set(orders[1][:16]) != set(orders[0][:16])  # the second epoch regroups the pairs
    for step, m in enumerate(logged):
        epoch, i = divmod(step, 3)
        idx = orders[epoch][16 * i:16 * i + 16]
        step_lr = lr * (step + 1) / 2 if step < 2 else lr * (1 - (step - 2) / 2)
        for g in opt.param_groups:
            g["lr"] = step_lr
        lp = logps64(None, [pairs[k] for k in idx], model)                               # (16, 2)
        avg = (lp - ref[idx]) / n[idx]  # per-token average log-ratios
        z = beta * (avg[:, 0] - avg[:, 1])
        loss = (-(1 - eps) * torch.nn.functional.logsigmoid(z) - eps * torch.nn.functional.logsigmoid(-z)).mean()
        loss.backward()
        norm = clip_grads(params, clip)
        opt.step()
        opt.zero_grad()
        avg, lp = avg.detach(), lp.detach()
        assert m["lr"] == pytest.approx(step_lr, rel=1e-12)
        assert m["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert m["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > clip  # clipping is in play
        assert m["reward_chosen"] == pytest.approx(beta * avg[:, 0].mean().item(), abs=1e-4)
        assert m["reward_rejected"] == pytest.approx(beta * avg[:, 1].mean().item(), abs=1e-4)
        assert m["accuracy"] == (avg[:, 0] > avg[:, 1]).double().mean().item()
        assert m["logp_chosen"] == pytest.approx(lp[:, 0].mean().item(), abs=1e-3)
        assert m["logp_rejected"] == pytest.approx(lp[:, 1].mean().item(), abs=1e-3)
    ours = Llama.from_pretrained(str(out), dtype=torch.float64).state_dict()
    diff = max((ours[k] - v).abs().max().item() for k, v in model.state_dict().items())
    assert diff < 2e-6, diff  # (measured 2.4e-7: fp32 against float64)


def test_reference_cache_is_keyed_by_the_pairs(tiny, tmp_path, monkeypatch, capsys):
    """--seed 1 shuffles the same 48 pairs into another order: the cache the seed-0 run left beside the same
    --out (same checkpoint, max length, pair count) must miss, or every pair gets another pair's reference.
    Step 0 tells: the policy is its reference, so rewards 0 and loss log 2."""
    out = tmp_path / "o"
    for seed in (0, 1):
        log = run_dpo_here(monkeypatch, capsys, tiny, out, "--max-steps", 1, "--seed", seed)
        assert "reference log-probs: 48 pairs" in log and "reference log-probs: loaded" not in log, seed
        (m,) = metrics(out)
        assert m["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert m["reward_chosen"] == m["reward_rejected"] == 0, seed
    assert len([f for f in os.listdir(tmp_path) if f.startswith("o.ref-")]) == 2


def test_default_betas():
    """Each loss's beta when --beta is not given, from its source: 0.1 for dpo and wpo (TRL's and
    open-instruct's default), 5 for dpo_norm (Tülu 3's 8B DPO), 2 for simpo (SimPO's base-model range 2-2.5),
    0.1 for ipo (TRL's tau). (dpo_norm's and simpo's are also checked through the script.)"""
    from dpo import DEFAULT_BETA
    assert DEFAULT_BETA == {"dpo": 0.1, "dpo_norm": 5.0, "simpo": 2.0, "ipo": 0.1, "wpo": 0.1}


def test_on_policy_pairs(tiny, tmp_path, monkeypatch, capsys):
    """Without --data: per prompt, samples a wrong answer, a right one cut off at --max-new-tokens (no EOS)
    and a right one that ended with EOS (generation and the verifier stubbed). pairs.jsonl pairs the prompt
    with the finished right answer as chosen and the wrong one as rejected, in the prompts' order."""
    import model as model_mod
    import verifiers
    tok = Tokenizer.from_pretrained(tiny[0])
    eos = tok.eos_token_ids[0]
    texts = ["wrong answer", "right but cut", "right and done"]

    def generate(model, prompts, max_new_tokens, **kw):
        assert len(prompts) == 4 * 3 and kw["eos_token_ids"] == tok.eos_token_ids
        outs = [tok.encode(texts[j % 3]) + ([] if j % 3 == 1 else [eos]) for j in range(len(prompts))]
        return outs, None
    monkeypatch.setattr(model_mod, "generate", generate)
    monkeypatch.setattr(verifiers, "verify", lambda dataset, text, gt: float(text.startswith("right")))
    run_here(monkeypatch, "dpo.py", "--ckpt", tiny[0], "--out", tmp_path / "o", "--n-prompts", 4, "--samples-per-prompt", 3,
             "--batch-size", 4, "--max-steps", 1, "--eval-n", 0)
    assert "4 pairs" in capsys.readouterr().out
    # a resumed run trains on the pairs the run it resumes sampled: it samples none
    monkeypatch.setattr(model_mod, "generate", lambda *a, **kw: pytest.fail("sampled again on --resume"))
    run_here(monkeypatch, "dpo.py", "--ckpt", tiny[0], "--out", tmp_path / "o", "--n-prompts", 4, "--samples-per-prompt", 3,
             "--batch-size", 4, "--max-steps", 2, "--eval-n", 0, "--resume")
    assert f"on-policy pairs: reusing {tmp_path / 'o' / 'pairs.jsonl'}" in capsys.readouterr().out
    prefs = tasks.make_tasks(seed=0)[1][:4]
    rows = [json.loads(ln) for ln in open(tmp_path / "o" / "pairs.jsonl")]
    assert rows == [{"chosen": r["messages"] + [{"role": "assistant", "content": "right and done"}],
                     "rejected": r["messages"] + [{"role": "assistant", "content": "wrong answer"}],
                     "dataset": r["dataset"]} for r in prefs]
    # 2 ranks (torchrun, the same stubs): each samples half the prompts; pairs.jsonl holds both halves, in order
    script = tmp_path / "two.py"
    script.write_text(f"""
import runpy, sys
import model, verifiers
from tokenizer import Tokenizer
tok = Tokenizer.from_pretrained({tiny[0]!r})
def generate(m, prompts, max_new_tokens, **kw):
    assert len(prompts) == 2 * 3
    return [tok.encode({texts!r}[j % 3]) + ([] if j % 3 == 1 else [tok.eos_token_ids[0]]) for j in range(6)], None
model.generate = generate
verifiers.verify = lambda dataset, text, gt: float(text.startswith("right"))
sys.argv = ["dpo.py", "--ckpt", {tiny[0]!r}, "--out", {str(tmp_path / "two")!r}, "--n-prompts", "4",
            "--samples-per-prompt", "3", "--batch-size", "4", "--max-steps", "1", "--eval-n", "0"]
runpy.run_path({os.path.join(ROOT, "dpo.py")!r}, run_name="__main__")
""")
    r = subprocess.run(python(script, nproc=2), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "4 pairs" in r.stdout, r.stderr[-3000:]
    assert [json.loads(ln) for ln in open(tmp_path / "two" / "pairs.jsonl")] == rows


def test_held_out_accuracy_with_data_files(tiny, tmp_path, monkeypatch, capsys):
    """--data with --eval-prompts: the start model is scored before training (its checkpoint has no eval.json)
    and the trained one at the end; eval.json holds both."""
    import common
    seen, batch_sizes = [], []
    monkeypatch.setattr(common, "evaluate", recording_evaluate(seen, batch_sizes))
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in tasks.make_tasks(seed=0)[3][:3]))
    out = tmp_path / "o"
    run_dpo_here(monkeypatch, capsys, tiny, out, "--max-steps", 2, "--eval-prompts", prompts, "--eval-n", 2)
    start = Llama.from_pretrained(tiny[0]).state_dict()["layers.0.self_attn.q_proj.weight"]
    assert len(seen) == 2 and torch.equal(seen[0], start) and not torch.equal(seen[1], start)
    assert batch_sizes == [256, 256]  # the tiny preset's
    ev = json.load(open(out / "eval.json"))
    assert (ev["accuracy"], ev["n"], ev["start"]["accuracy"], ev["start"]["n"]) == (0.5, 2, 0.25, 2)


def test_resume_follows_a_copied_start_and_refuses_a_retrained_one(tiny, tmp_path, monkeypatch, capsys):
    """The reference is --ckpt, read again on --resume. A copy of it elsewhere (another path, other file times)
    is the same model: its cached reference log-probs are loaded. The start retrained in place since the run
    began would give the resumed policy another reference (the cache key misses and the log-probs come from the
    new model): refused, in one sentence, before any work."""
    import shutil
    sft, out = tmp_path / "sft", tmp_path / "o"
    shutil.copytree(tiny[0], sft)
    args = ("dpo.py", "--data", tiny[1], "--preset", "tiny", "--out", out, *ARGS)
    run_here(monkeypatch, *args, "--ckpt", sft, "--max-steps", 1)
    capsys.readouterr()
    moved = tmp_path / "moved"
    shutil.copytree(sft, moved, copy_function=shutil.copy)  # new file times
    run_here(monkeypatch, *args, "--ckpt", moved, "--max-steps", 2, "--resume")
    log = capsys.readouterr().out
    assert f"resumed from {out} at step 1" in log and "reference log-probs: loaded" in log
    perturb_in_place(sft)
    assert refusal(monkeypatch, capsys, *args, "--ckpt", sft, "--max-steps", 3, "--resume") == (
        f"error: {sft} is not the checkpoint the run in {out} started from (its weights have changed since), and "
        "it is this run's reference; pass the one it started from as --ckpt, or start afresh without --resume")
    assert [m["step"] for m in metrics(out)] == [0, 1]  # nothing was done
    # SimPO has no reference: the same checkpoint resumes
    run_here(monkeypatch, *args, "--ckpt", moved, "--max-steps", 1, "--loss-type", "simpo", "--out", tmp_path / "s")
    perturb_in_place(moved)
    run_here(monkeypatch, *args, "--ckpt", moved, "--max-steps", 2, "--loss-type", "simpo", "--out", tmp_path / "s",
             "--resume")
    assert [m["step"] for m in metrics(tmp_path / "s")] == [0, 1]


@pytest.mark.parametrize("size", [1000, 300_000])
def test_fingerprint_sees_any_retraining_and_no_copy(tmp_path, size):
    """common.fingerprint: the same for a copy, different once weights change. Files up to `whole` bytes are hashed
    whole (a change anywhere tells); past that, the header and evenly spaced blocks (a change in a block, or in
    the header's shapes, tells). Here whole = 4096 and 8 blocks of 256 bytes."""
    import shutil
    from safetensors.torch import save_file
    from common import fingerprint
    fp = lambda d: fingerprint(d, whole=4096, blocks=8, block=256)  # noqa: E731
    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text('{"hidden_size": 8}')
    w = torch.arange(size // 4, dtype=torch.float32)
    save_file({"w": w}, a / "model.safetensors")
    (a / "tokenizer.json").write_text("{}")
    b = tmp_path / "b"
    shutil.copytree(a, b, copy_function=shutil.copy)
    (b / "tokenizer.json").write_text('{"other": 1}')  # not weights
    assert fp(a) == fp(b)
    save_file({"w": w + 1}, b / "model.safetensors")  # retrained: every weight moved
    assert fp(a) != fp(b)
    save_file({"w": w}, b / "model.safetensors")
    (b / "config.json").write_text('{"hidden_size": 9}')
    assert fp(a) != fp(b)
    (b / "config.json").write_text('{"hidden_size": 8}')
    one = w.clone()
    one[-1] += 1  # the last weight: inside the whole file when small, in the last sampled block when large
    save_file({"w": one}, b / "model.safetensors")
    assert fp(a) != fp(b)
    if size > 4096:  # a weight between the blocks is not read: the sampling, shown
        one = w.clone()
        one[(size // 4) // 16] += 1
        save_file({"w": one}, b / "model.safetensors")
        assert fp(a) == fp(b)


def test_no_pair_when_every_right_answer_was_cut_off_says_so(tiny, tmp_path, monkeypatch, capsys):
    """A prompt whose right answers all ran into --max-new-tokens (no EOS) gives no pair (pick_pair takes no cut-off
    chosen): the counts name it, so that they add up to the prompts sampled, and the refusal points at
    --max-new-tokens, not only at sampling more or training longer."""
    import model as model_mod
    import verifiers
    tok = Tokenizer.from_pretrained(tiny[0])
    eos = tok.eos_token_ids[0]

    def generate(model, prompts, max_new_tokens, **kw):  # per prompt: a wrong answer, a right one cut off
        return [tok.encode("wrong") + [eos] if j % 2 == 0 else tok.encode("right but cut")
                for j in range(len(prompts))], None
    monkeypatch.setattr(model_mod, "generate", generate)
    monkeypatch.setattr(verifiers, "verify", lambda dataset, text, gt: float(text.startswith("right")))
    msg = refusal(monkeypatch, capsys, "dpo.py", "--ckpt", tiny[0], "--out", tmp_path / "o", "--n-prompts", 4,
                  "--samples-per-prompt", 2, "--max-new-tokens", 8, "--batch-size", 4, "--max-steps", 1,
                  "--eval-n", 0)
    assert ("0 pairs; no pair for 0 prompts with no correct sample, 0 with no wrong one and 4 whose correct samples "
            "were all cut off at --max-new-tokens 8 (no EOS)") in capsys.readouterr().out
    assert msg.startswith("error: no preference pair") and "--max-new-tokens" in msg


def test_resume_refuses_another_stages_checkpoint_and_an_out_that_is_the_reference(tiny, tmp_path, monkeypatch,
                                                                                   capsys):
    """dpo.py --resume with the --out of an SFT run would take the SFT run's weights, Adam moments and step for this
    run's: refused, in one sentence, before any work. An --out that is --ckpt (however spelled) would have the
    first save overwrite the reference: refused too (SimPO has none, and may)."""
    import shutil
    sft, data = tmp_path / "sft", tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tasks.make_tasks(0, n_sft=16, n_prefs=2, n_rl=2, n_eval=2)[0]))
    run_here(monkeypatch, "sft.py", "--ckpt", tiny[0], "--data", data, "--preset", "tiny", "--out", sft,
             "--max-len", 512, "--batch-size", 8, "--max-steps", 1, "--val-frac", 0)
    before = open(sft / "model.safetensors", "rb").read()
    args = ("dpo.py", "--data", tiny[1], "--preset", "tiny", *ARGS, "--max-steps", 2)
    assert refusal(monkeypatch, capsys, *args, "--ckpt", tiny[0], "--out", sft, "--resume") == (
        f"error: --resume: the checkpoint in {sft} was saved by the sft stage, not by dpo; give this run an --out of "
        "its own (another stage's output goes in --ckpt)")
    assert refusal(monkeypatch, capsys, *args, "--ckpt", sft, "--out", f"{sft}/") == (
        f"error: --out {sft}/ is --ckpt {sft}, this run's reference: a save would overwrite it; give the run an "
        "--out of its own")
    assert open(sft / "model.safetensors", "rb").read() == before
    # a DPO run resumes its own checkpoint as before
    out = tmp_path / "o"
    run_here(monkeypatch, *args, "--ckpt", sft, "--out", out, "--max-steps", 1)
    run_here(monkeypatch, *args, "--ckpt", sft, "--out", out, "--resume")
    assert f"resumed from {out} at step 1" in capsys.readouterr().out
    simpo = tmp_path / "simpo"
    shutil.copytree(sft, simpo)
    run_here(monkeypatch, *args, "--ckpt", simpo, "--out", simpo, "--max-steps", 1, "--loss-type", "simpo",
             "--beta", 2)


def test_a_fresh_run_killed_after_sampling_its_pairs_does_not_resume_the_earlier_runs_checkpoint(tiny, tmp_path,
                                                                                                 monkeypatch, capsys):
    """A fresh on-policy run in a directory holding an earlier run's checkpoint rewrites pairs.jsonl before it
    trains; killed then, --resume must start afresh, not go on from the earlier run's weights with this run's
    pairs (neither run's training)."""
    import data
    import model as model_mod
    import verifiers
    tok = Tokenizer.from_pretrained(tiny[0])
    eos = tok.eos_token_ids[0]
    texts = ["wrong answer", "right but cut", "right and done"]
    monkeypatch.setattr(model_mod, "generate", lambda model, prompts, n, **kw: (
        [tok.encode(texts[j % 3]) + ([] if j % 3 == 1 else [eos]) for j in range(len(prompts))], None))
    monkeypatch.setattr(verifiers, "verify", lambda dataset, text, gt: float(text.startswith("right")))
    out = tmp_path / "o"
    args = ("--ckpt", tiny[0], "--out", out, "--samples-per-prompt", 3, "--batch-size", 4, "--max-steps", 1,
            "--eval-n", 0)
    run_here(monkeypatch, "dpo.py", *args, "--n-prompts", 4)  # the earlier run, finished
    assert os.path.isfile(out / "train_state.pt")

    class Killed(BaseException):
        pass

    def killed(*a, **kw):
        raise Killed
    with monkeypatch.context() as m:
        m.setattr(data, "load_mixture", killed)  # dies after writing its pairs, before training
        with pytest.raises(Killed):
            run_here(m, "dpo.py", *args, "--n-prompts", 8)
    assert len(open(out / "pairs.jsonl").readlines()) == 8
    capsys.readouterr()
    run_here(monkeypatch, "dpo.py", *args, "--n-prompts", 8, "--resume")
    assert "no checkpoint in" in capsys.readouterr().out


def test_an_out_whose_parent_is_not_made_yet(tiny, tmp_path, monkeypatch, capsys):
    """--out is made if missing (check_out), parent included: the reference log-probs cached beside it are written
    into that parent, which the run must make first (torch.save failed after the whole reference pass)."""
    out = tmp_path / "new" / "dpo"
    run_dpo_here(monkeypatch, capsys, tiny, str(out), "--max-steps", 1)
    assert (out / "model.safetensors").is_file() and list((tmp_path / "new").glob("dpo.ref-*.pt"))


@pytest.mark.parametrize("preset,tokens", [("tiny", 64), ("tulu3-8b", 512)])
def test_presets_fill_the_held_out_decoding_length(tiny, tmp_path, monkeypatch, preset, tokens):
    # the tiny tasks' answers fit in 64 tokens; a real model's chain of thought (GSM8K) needs Tülu 3's 512
    held_out = held_out_file(tmp_path / "held_out.jsonl", 2)
    args = ("--ckpt", tiny[0], "--data", tiny[1], "--out", tmp_path / "o", "--eval-prompts", held_out,
            "--batch-size", 8)
    assert eval_length(monkeypatch, "dpo.py", *args, "--preset", preset) == tokens
    assert eval_length(monkeypatch, "dpo.py", *args, "--preset", preset, "--eval-max-new-tokens", 7) == 7


def test_no_host_sync_between_the_micro_batches_of_a_step(tiny, tmp_path, monkeypatch):
    # on a GPU each would idle it (helpers.syncs_between_backwards); one step of 8 micro-batches
    n, between = syncs_between_backwards(monkeypatch, "dpo.py", "--ckpt", tiny[0], "--data", tiny[1], "--preset",
                                         "tiny", "--out", tmp_path / "o", *ARGS, "--micro-batch-size", "1",
                                         "--max-steps", "1", "--save-every", "0")
    assert n == 8 and not between, f"host syncs between the step's micro-batches: {between}"


def test_reference_key_is_the_exact_tokens_and_targets():
    # pairs held as int32 arrays (data.compact) key as their lists do; ids and targets are hashed as sequences,
    # not added up elementwise (array + [-1] broadcasts): token 3 trained and token 106 not have the same sum
    a = [(([1, 3], [IGNORE, 3]), ([1, 4], [IGNORE, 4]))]
    b = [(([1, 106], [IGNORE, IGNORE]), ([1, 4], [IGNORE, 4]))]
    key = lambda pairs: reference_key("fp", 64, "cpu", pairs)  # noqa: E731
    assert key(a) != key(b)
    assert key([tuple(compact(ex) for ex in pair) for pair in a]) == key(a)
