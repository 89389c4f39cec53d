"""
ppo_rlvr.py: GAE, KL estimators, clipped losses, KL controller and group advantages against their
formulas; generator vs training log-probs; and the script: it learns a verifiable reward, 2 ranks equal
1, a killed run resumes to the uninterrupted one's weights, and three steps of each mode (generation
stubbed) match a float64 reference trainer written from the module docstring.

    python -m pytest tests/test_ppo.py -v
"""
import json
import math
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import tasks
from data import encode_prompt
from helpers import (adamw, clip_grads, eval_length, kill_at_first_checkpoint, nan_checkpoint, perturb_in_place,
                     python, recording_evaluate, refusal, run_here, saved_state, syncs_between_backwards, update_gap)
from model import Llama, generate
from ppo_rlvr import (ValueModel, adaptive_kl, advantages, gae, group_advantages, kl_estimate, masked_whiten,
                      policy_loss, ppo_loss, response_logprobs, rollout_batch, sequence_scores, token_rewards,
                      value_loss)
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}  # CPU runs

# IFEval's letter-frequency check ("the letter a at least twice"): a random tiny model passes ~20% of
# the time and can learn it by favouring tokens with an "a", a real verifier with a learnable signal
LETTER_A = json.dumps({"instruction_id_list": ["keywords:letter_frequency"],
                       "kwargs": [{"letter": "a", "let_frequency": 2, "let_relation": "at least"}]})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random base checkpoint and an RLVR file of 64 prompts scored by the letter check."""
    d = tmp_path_factory.mktemp("tiny")
    sft = tasks.make_tasks(seed=0, n_sft=96, n_prefs=2, n_rl=2, n_eval=2)[0]
    base = tasks.make_base_checkpoint(str(d / "base"), sft, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                      ffn_dim=64, vocab_size=300)
    path = str(d / "rl.jsonl")
    with open(path, "w") as f:
        for i in range(64):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Write {i} words with the letter a."}],
                                "ground_truth": LETTER_A, "dataset": "tiny_if"}) + "\n")
    return base, path


@pytest.fixture(scope="module")
def reward_model(tiny, tmp_path_factory):
    """An HF LlamaForSequenceClassification (1 label) with the base's shape and tokenizer, random weights
    (std 0.2, so its scores are far from 0), written by transformers: the value model's other start."""
    transformers = pytest.importorskip("transformers")
    base = json.load(open(os.path.join(tiny[0], "config.json")))
    tok = Tokenizer.from_pretrained(tiny[0])
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "rms_norm_eps", "rope_theta", "max_position_embeddings")
    cfg = transformers.LlamaConfig(**{k: base[k] for k in keep}, num_labels=1, pad_token_id=tok.pad_id,
                                   initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(0)
    rm = transformers.LlamaForSequenceClassification(cfg).eval()
    path = str(tmp_path_factory.mktemp("rm") / "rm")
    rm.save_pretrained(path)
    return path, rm


def run_ppo(tiny, out, *extra, nproc=1, wait=True):
    base, path = tiny
    cmd = ["ppo_rlvr.py", "--ckpt", base, "--data", path, "--preset", "tiny", "--out", str(out), "--eval-n", "0",
           "--max-new-tokens", "16", *map(str, extra)]
    cmd = python(*cmd, nproc=nproc)
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def metrics(out):
    return [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# -----------------------------------------------------------------------------
# GAE against the definition, one sequence and one time step at a time


def gae_reference(r, v, L, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over the L real steps, V = 0 after the last one."""
    V = lambda k: v[k] if k < L else 0.0  # noqa: E731
    delta = [r[k] + gamma * V(k + 1) - V(k) for k in range(L)]
    adv = [sum((gamma * lam) ** i * delta[t + i] for i in range(L - t)) for t in range(L)]
    return adv, [a + v[t] for t, a in enumerate(adv)]


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_direct_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 9
    lengths = [9, 4, 1, 0, 7]  # full, early endings, a single token, an empty row
    r, v = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1.0] * L + [0.0] * (T - L) for L in lengths], dtype=torch.float64)
    adv, ret = gae(r, v, mask, gamma, lam)
    for b, L in enumerate(lengths):
        ra, rr = gae_reference(r[b].tolist(), v[b].tolist(), L, gamma, lam)
        assert adv[b, :L].tolist() == pytest.approx(ra, abs=1e-12)
        assert ret[b, :L].tolist() == pytest.approx(rr, abs=1e-12)
        assert (adv[b, L:] == 0).all() and (ret[b, L:] == 0).all()
    # whatever sits in the padding (a previous batch's values, garbage rewards) changes nothing
    adv2, ret2 = gae(r + 100 * (1 - mask), v - 50 * (1 - mask), mask, gamma, lam)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_sequence_scores_and_token_rewards():
    # scores: reward x verdict; without an EOS the penalty replaces it (whatever the verdict), when set
    s = sequence_scores([1.0, 0.0, 0.5, 1.0], [True, True, True, False], 10.0, -3.0)
    assert s.tolist() == [10.0, 0.0, 5.0, -3.0]
    assert sequence_scores([1.0, 0.0], [False, False], 10.0).tolist() == [10.0, 0.0]  # no penalty set
    # rewards: -beta * kl on each response token, the score added on the last one, 0 in the padding
    g = torch.Generator().manual_seed(0)
    lengths, T, beta = [4, 1, 0, 6], 6, 0.3
    mask = torch.tensor([[1.0] * L + [0.0] * (T - L) for L in lengths])
    kl = torch.randn(4, T, generator=g)
    scores = torch.tensor([2.0, -1.0, 5.0, 7.0])
    r = token_rewards(scores, kl, mask, beta)
    for b, L in enumerate(lengths):
        want = [-beta * kl[b, t].item() + (scores[b].item() if t == L - 1 else 0.0) for t in range(L)]
        assert r[b].tolist() == pytest.approx(want + [0.0] * (T - L), abs=1e-6)


def test_gae_terminal_reward_only():
    # gamma = lam = 1, V = 0: every token's advantage is the final score (REINFORCE)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    r = torch.tensor([[0.0, 0, 10, 0], [0, 3, 0, 0]])
    adv, _ = gae(r, torch.zeros(2, 4), mask, 1.0, 1.0)
    assert adv.tolist() == [[10, 10, 10, 0], [3, 3, 0, 0]]


def test_masked_whiten():
    x = torch.tensor([[1.0, 2, 3, 99], [4, 5, -7, -7]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    w = masked_whiten(x, mask)
    vals = torch.tensor([1.0, 2, 3, 4, 5])
    assert w[mask.bool()].tolist() == pytest.approx(((vals - 3) / vals.std()).tolist(), abs=1e-6)
    assert (w[~mask.bool()] == 0).all()
    assert torch.isfinite(masked_whiten(torch.zeros(2, 3), torch.ones(2, 3))).all()  # zero variance: no NaN


# -----------------------------------------------------------------------------
# KL estimators, clipped losses, the controller, group advantages


def test_kl_estimators_values_and_signs():
    lp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])  # d = 0.5, -1, 0
    d = lp - ref
    assert kl_estimate(lp, ref, "k1").tolist() == pytest.approx(d.tolist())
    assert kl_estimate(lp, ref, "k2").tolist() == pytest.approx((d ** 2 / 2).tolist())
    assert kl_estimate(lp, ref, "k3").tolist() == pytest.approx([math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1, 0])
    assert kl_estimate(lp, ref, "k1")[1] < 0  # k1 can be negative token by token ...
    assert (kl_estimate(lp, ref, "k2") >= 0).all() and (kl_estimate(lp, ref, "k3") >= 0).all()  # ... k2, k3 not
    assert torch.isfinite(kl_estimate(torch.tensor([-200.0]), torch.tensor([0.0]), "k3")).all()  # clamped
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_estimate(lp, ref, "k4")


def test_kl_estimators_expectation():
    """Averaged over tokens drawn from pi, k1 and k3 are exactly KL(pi || ref); k2 is close when the
    distributions are close (its bias is third order)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, generator=g, dtype=torch.float64)
    pi = logits.log_softmax(-1)
    ref = (logits + 0.1 * torch.randn(50, generator=g, dtype=torch.float64)).log_softmax(-1)
    kl = (pi.exp() * (pi - ref)).sum().item()
    expect = {k: (pi.exp() * kl_estimate(pi, ref, k)).sum().item() for k in ("k1", "k2", "k3")}
    assert expect["k1"] == pytest.approx(kl, rel=1e-10) and expect["k3"] == pytest.approx(kl, rel=1e-10)
    assert expect["k2"] == pytest.approx(kl, rel=0.1)


def test_policy_loss_clipping():
    old = torch.zeros(6)
    ratio = torch.tensor([1.1, 1.2, 1.5, 0.5, 0.5, 1.5])
    adv = torch.tensor([2.0, 2.0, 2.0, 2.0, -2.0, -2.0])
    lp = ratio.log().requires_grad_()
    loss, clipped = policy_loss(lp, old, adv, clip=0.2)
    # A > 0: the ratio may not gain past 1 + eps (inside, at the edge, beyond); a lower ratio is not
    # clipped (pessimistic bound). A < 0: clipped below 1 - eps, not above.
    assert loss.tolist() == pytest.approx([-2.2, -2.4, -2.4, -1.0, 1.6, 3.0])
    keep = [0, 2, 3, 4, 5]  # (at the edge itself, which term wins is up to rounding: same value either way)
    assert clipped[keep].tolist() == [0, 1, 0, 1, 0]
    loss.sum().backward()
    # d/dlogp of -A * ratio is -A * ratio; clipped tokens get no gradient
    assert lp.grad[keep].tolist() == pytest.approx([-2.2, 0.0, -1.0, 0.0, 3.0])


def test_value_loss_clipping():
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    v = torch.tensor([0.1, 0.5, 0.5, -0.2], requires_grad=True)
    ret = torch.tensor([1.0, 1.0, 0.0, -1.0])
    loss, clipped = value_loss(v, old, ret, clip=0.2)
    # 1: inside the range. 2: moved 0.5 towards the return: the clipped value (0.2) is further from it,
    # so the loss is the clipped one, without gradient. 3: moved away from the return: the unclipped
    # loss is larger and kept. 4: exactly at the edge.
    assert loss.tolist() == pytest.approx([0.5 * 0.81, 0.5 * 0.64, 0.5 * 0.25, 0.5 * 0.64])
    assert clipped.tolist() == [0, 1, 0, 0]
    loss.sum().backward()
    assert v.grad.tolist() == pytest.approx([-0.9, 0.0, 0.5, 0.8])


def test_adaptive_kl_controller():
    assert adaptive_kl(0.1, 3.0, 64, None) == 0.1  # fixed
    assert adaptive_kl(0.1, 6.0, 64, 6.0) == pytest.approx(0.1)  # on target
    assert adaptive_kl(0.1, 6.6, 1000, 6.0, 10000) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert adaptive_kl(0.1, 60.0, 1000, 6.0, 10000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at 20%
    assert adaptive_kl(0.1, 0.0, 1000, 6.0, 10000) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert adaptive_kl(0.1, 6.3, 500, 6.0, 10000) == pytest.approx(0.1 * (1 + 0.05 * 0.05))  # n / horizon = 0.05
    assert adaptive_kl(0.1, 3.0, 64, 6.0, 200) == pytest.approx(0.1 * (1 - 0.2 * 0.32))
    # closed loop: KL proportional to 1/beta settles at the target
    beta = 0.01
    for _ in range(2000):
        beta = adaptive_kl(beta, 0.12 / beta, 1000, 6.0, 10000)
    assert 0.12 / beta == pytest.approx(6.0, rel=1e-3)


def test_group_advantages():
    s = torch.tensor([10.0, 0, 0, 0, 3, 3, 3, 3, 0.1, 0.1, 0.1, 0.1])
    grpo = group_advantages(s, 4, "grpo")
    sd = math.sqrt((7.5 ** 2 + 3 * 2.5 ** 2) / 4)  # population std of (10, 0, 0, 0)
    assert grpo[:4].tolist() == pytest.approx([7.5 / (sd + 1e-4)] + [-2.5 / (sd + 1e-4)] * 3)
    rloo = group_advantages(s, 4, "rloo")
    assert rloo[:4].tolist() == pytest.approx([10.0, -10 / 3, -10 / 3, -10 / 3])
    # all-equal groups (incl. values that do not average exactly in floating point): exactly 0, no NaN
    assert (grpo[4:] == 0).all() and (rloo[4:] == 0).all()
    assert group_advantages(torch.tensor([1.0, 2.0]), 2, "rloo").tolist() == [-1.0, 1.0]
    with pytest.raises(ValueError, match="n >= 2"):
        group_advantages(s, 1, "rloo")


def random_rollouts(B=6, T=5, n=3, seed=0):
    """scores (B,), kl, values, mask (B, T) in float64, responses of lengths 1..T (one of each, and T twice)."""
    g = torch.Generator().manual_seed(seed)
    lens = [5, 1, 3, 4, 2, 5][:B]
    mask = torch.tensor([[1.0] * k + [0.0] * (T - k) for k in lens], dtype=torch.float64)
    scores = torch.tensor([10.0, 0.0, 10.0, 0.0, 0.0, 10.0], dtype=torch.float64)[:B]
    kl = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 * mask
    values = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    return scores, kl, values, mask, lens


def test_advantages_of_each_mode():
    """Step 4 against the definitions, one sequence at a time (gamma and lambda apart, so swapping them shows;
    KL and whitening on, so dropping either shows)."""
    scores, kl, values, mask, lens = random_rollouts()
    beta, gamma, lam, n = 0.1, 0.9, 0.8, 3
    # gae: rewards -beta kl_t plus the score on the last token; GAE; returns before whitening; whitened
    adv, ret = advantages("gae", scores, kl, values, mask, n, beta, gamma, lam)
    raw, want_ret = [], []
    for b, L in enumerate(lens):
        r = [-beta * kl[b, t].item() + (scores[b].item() if t == L - 1 else 0.0) for t in range(L)]
        a, R = gae_reference(r, values[b].tolist(), L, gamma, lam)
        raw.append(a)
        want_ret.append(R)
    flat = torch.tensor([a for row in raw for a in row], dtype=torch.float64)
    mean, std = flat.mean(), flat.std()  # unbiased, as open-instruct's masked_whiten
    for b, L in enumerate(lens):
        assert adv[b, :L].tolist() == pytest.approx(((torch.tensor(raw[b]) - mean) / std).tolist(), abs=1e-6)
        assert ret[b, :L].tolist() == pytest.approx(want_ret[b], abs=1e-9)
        assert (adv[b, L:] == 0).all() and (ret[b, L:] == 0).all()
    # rloo: R_i = s_i - beta sum_t kl_t, minus the mean of the other samples' R, on every token
    adv, ret = advantages("rloo", scores, kl, values, mask, n, beta)
    R = [scores[b].item() - beta * kl[b].sum().item() for b in range(6)]
    for b, L in enumerate(lens):
        others = [R[j] for j in range(b // n * n, b // n * n + n) if j != b]
        assert adv[b, :L].tolist() == pytest.approx([R[b] - sum(others) / (n - 1)] * L, abs=1e-9)
        assert (adv[b, L:] == 0).all()
    assert ret is None
    # grpo: the group-normalised score on every token; the KL is not in it (a loss term instead)
    adv, ret = advantages("grpo", scores, kl, values, mask, n, beta)
    for b, L in enumerate(lens):
        grp = scores[b // n * n:b // n * n + n]
        want = (scores[b] - grp.mean()) / (grp.std(unbiased=False) + 1e-4)
        assert adv[b, :L].tolist() == pytest.approx([want.item()] * L, abs=1e-9)
    assert torch.equal(adv, advantages("grpo", scores, kl * 0, values, mask, n, beta)[0])


def test_ppo_loss_terms():
    """Each term of the per-token loss by its gradient: GRPO's KL term through logp (k3: the gradient of
    KL(ref || pi), beta (1 - ref/pi) per token; k2: beta d), the value term (vf_coef (v - R) unclipped),
    and both normalisations."""
    g = torch.Generator().manual_seed(1)
    _, _, _, mask, lens = random_rollouts()
    lp0 = -torch.rand(6, 5, generator=g, dtype=torch.float64) * 3
    ref = lp0 + torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.5
    zero = torch.zeros_like(lp0)
    denom = 7.0
    for est, want in (("k3", lambda lp: 0.2 * (1 - torch.exp(ref - lp))), ("k2", lambda lp: 0.2 * (lp - ref))):
        lp = lp0.clone().requires_grad_()
        loss, _ = ppo_loss(lp, lp0, zero, mask, denom, kl_coef=0.2, ref_lp=ref, kl_estimator=est)
        loss.backward()  # (advantage 0: the policy term has no gradient)
        assert torch.allclose(lp.grad, want(lp0) * mask / denom, atol=1e-12), est
    # value term: v within the clip range of old_v, so unclipped
    v = (lp0 * 0.1).requires_grad_()
    returns = torch.randn(6, 5, generator=g, dtype=torch.float64)
    loss, (_, vf, _, vclipped) = ppo_loss(lp0, lp0, zero, mask, denom, v=v, old_v=lp0 * 0.1 + 0.01, returns=returns,
                                          value_clip=0.2, vf_coef=0.3)
    loss.backward()
    assert (vclipped == 0).all() and torch.allclose(v.grad, 0.3 * (v - returns).detach() * mask / denom, atol=1e-12)
    # normalisations: token sums every token over denom; sequence averages each response first
    adv = torch.randn(6, 5, generator=g, dtype=torch.float64) * mask
    lp = lp0 + 0.05
    pg, _ = policy_loss(lp, lp0, adv, 0.2)
    tok, _ = ppo_loss(lp, lp0, adv, mask, denom)
    seq, _ = ppo_loss(lp, lp0, adv, mask, 6.0, loss_norm="sequence")
    assert tok.item() == pytest.approx((pg * mask).sum().item() / denom, abs=1e-12)
    assert seq.item() == pytest.approx(sum((pg[b, :L].mean()).item() for b, L in enumerate(lens)) / 6, abs=1e-12)


# -----------------------------------------------------------------------------
# the training forward recomputes exactly the log-probs the generator sampled with


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generator_and_training_logprobs_agree(tiny, temperature):
    tok = Tokenizer.from_pretrained(tiny[0])
    model = Llama.from_pretrained(tiny[0])
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}])
               for q in ["Hi.", "Write about the sea.", "Ava has 3 pens and finds 4 more. How many now?"]] * 2
    resp, glp = generate(model, prompts, 24, temperature=temperature, eos_token_ids=tok.eos_token_ids, seed=0)
    b = rollout_batch(prompts, resp, tok.pad_id)
    lp = response_logprobs(model, b, temperature)
    gen = torch.zeros_like(lp)
    for i, x in enumerate(glp):
        gen[i, :len(x)] = torch.tensor(x)
    assert b["mask"].sum(1).tolist() == [len(r) for r in resp]
    assert (lp - gen).abs().max().item() <= 1e-5
    # and the same numbers, one unpadded sequence at a time, straight from the logits
    for i, (q, r) in enumerate(zip(prompts, resp)):
        logits = model(torch.tensor([q + r]))[0, len(q) - 1:-1].double() / temperature
        ref = logits.log_softmax(-1).gather(1, torch.tensor(r)[:, None])[:, 0]
        assert (lp[i, :len(r)].double() - ref).abs().max().item() <= 1e-5
    # the value model starts at 0 and reads the same positions
    vm = ValueModel(Llama.from_pretrained(tiny[0]))
    assert vm(b["input_ids"], b["idx"]).abs().max().item() == 0


def test_value_model_from_a_reward_model(tiny, reward_model):
    """--value-ckpt may be an HF reward model: body and score layer load, and V at every position is the
    reward model's score there (its pooled output at the last token), as transformers computes it."""
    path, rm = reward_model
    vm = ValueModel.from_pretrained(path, torch.device("cpu"))
    assert vm.body.lm_head is None
    ids = torch.randint(0, rm.config.vocab_size, (3, 17))
    ids[ids == rm.config.pad_token_id] = 1
    idx = torch.arange(17).expand(3, 17)
    with torch.no_grad():
        ours = vm(ids, idx)
        hf = rm.model(ids).last_hidden_state @ rm.score.weight.T  # (3, 17, 1) per-position scores
        pooled = rm(ids).logits[:, 0]
    assert ours.abs().max().item() > 0.1  # a real, non-zero head
    assert (ours - hf[..., 0]).abs().max().item() <= 1e-5
    assert (ours[:, -1] - pooled).abs().max().item() <= 1e-5
    # a causal LM still works as the body, with a zero head
    vm0 = ValueModel.from_pretrained(tiny[0], torch.device("cpu"))
    assert vm0.body.lm_head is None and vm0.head.weight.abs().max().item() == 0


def test_reward_model_errors(reward_model, tmp_path):
    path, rm = reward_model
    with pytest.raises(ValueError, match="reward .*no LM head"):
        Llama.from_pretrained(path)  # not a causal LM
    two = tmp_path / "two_labels"
    rm2 = type(rm)(type(rm.config)(**{**rm.config.to_dict(), "num_labels": 2}))
    rm2.save_pretrained(str(two))
    with pytest.raises(ValueError, match=r"score.weight has shape \(2, 32\)"):
        ValueModel.from_pretrained(str(two), torch.device("cpu"))


# -----------------------------------------------------------------------------
# the script


def test_ppo_raises_a_verifiable_reward(tiny, tmp_path):
    run_ppo(tiny, tmp_path / "a", "--steps", 12, "--prompts-per-step", 32, "--lr", 1e-2)
    rew = [m["reward"] for m in metrics(str(tmp_path / "a"))]
    first, last = sum(rew[:4]) / 4, sum(rew[-4:]) / 4
    assert last > first + 2.0, rew
    m = metrics(str(tmp_path / "a"))[-1]
    for k in ("reward", "accuracy", "kl", "beta", "entropy", "clipfrac", "value_loss", "explained_var",
              "approx_kl", "resp_len", "no_eos", "gen_tok_per_s", "logp_gap_mean", "logp_gap_max"):
        assert k in m
    assert max(x["logp_gap_max"] for x in metrics(str(tmp_path / "a"))) <= 1e-5


@pytest.mark.parametrize("mode", ["grpo", "rloo"])
def test_group_modes_raise_the_reward(tiny, tmp_path, monkeypatch, capsys, mode):
    r = run_ppo(tiny, tmp_path / mode, "--advantage", mode, "--steps", 12, "--prompts-per-step", 8,
                "--samples-per-prompt", 4, "--lr", 1e-2)
    assert "lr 0.01 constant, saved in" in r.stdout  # no value model: no value lr said
    rew = [m["reward"] for m in metrics(str(tmp_path / mode))]
    assert sum(rew[-4:]) / 4 > sum(rew[:4]) / 4 + 2.0, rew
    assert "value_loss" not in metrics(str(tmp_path / mode))[-1]
    if mode == "grpo":  # its checkpoint has no value model to resume a gae run with: one sentence, not a crash
        base, path = tiny
        assert refusal(monkeypatch, capsys, "ppo_rlvr.py", "--ckpt", base, "--data", path, "--preset", "tiny", "--out",
                       tmp_path / mode, "--resume", "--steps", 13, "--prompts-per-step", 8, "--eval-n", 0).endswith(
            "was saved without a value model (by --advantage grpo or rloo); resume it with the same --advantage")


@pytest.mark.parametrize("extra, msg", [
    (("--temperature", 0), "argument --temperature: expected a number > 0, got '0'"),
    (("--kl-target", 0), "argument --kl-target: expected a number > 0, got '0'"),
    (("--gamma", 1.5), "argument --gamma: expected a number >= 0 and <= 1, got '1.5'"),
    (("--max-prompt-len", 5), "0 prompts (64 more are over --max-prompt-len 5) is fewer than one batch"),
    (("--kl-target", 1.0, "--beta", 0), "--kl-target adapts beta multiplicatively"),
    (("--advantage", "grpo", "--kl-estimator", "k1"), "k1 = logp - ref_logp has zero expected gradient"),
    (("--advantage", "rloo", "--vf-coef", 0.5), "--advantage rloo has no value model and no GAE: --vf-coef has no"),
    (("--advantage", "grpo", "--lam", 0.9), "--advantage grpo has no value model and no GAE: --lam has no effect"),
    (("--kl-horizon", 100), "--kl-horizon is the adaptive controller's: it has no effect without --kl-target"),
    (("--beta", 0, "--kl-estimator", "k3"), "--beta 0 has no KL penalty (and no reference model): --kl-estimator has"),
    (("--per-prompt-seed", "--gen-batch-size", 4), "--per-prompt-seed generates prompt by prompt: --gen-batch-size"),
    (("--max-new-tokens", 0), "argument --max-new-tokens: expected a whole number >= 1, got '0'"),
    (("--ppo-epochs", "1.5"), "argument --ppo-epochs: expected a whole number >= 1, got '1.5'"),
    (("--verify-reward", "nan"), "argument --verify-reward: expected a finite number, got 'nan'"),
    (("--advantage", "rloo", "--samples-per-prompt", 1),
     "--advantage rloo compares samples of a prompt: --samples-per-prompt must be >= 2, got 1"),
    (("--prompts-per-step", 8, "--samples-per-prompt", 4, "--mini-batches", 3),
     "32 rollouts per rank (prompts-per-step / world x samples) do not split into --mini-batches 3"),
])
def test_settings_that_cannot_work_are_refused(tiny, tmp_path, monkeypatch, capsys, extra, msg):
    base, path = tiny
    assert msg in refusal(monkeypatch, capsys, "ppo_rlvr.py", "--ckpt", base, "--data", path, "--preset", "tiny",
                          "--out", tmp_path / "o", *extra)
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")


def test_a_metric_that_is_not_finite_stops_the_run(tiny, tmp_path, monkeypatch, capsys):
    # NaN weights: the step's metrics are NaN, and the run stops before any checkpoint is written
    out = tmp_path / "o"
    err = refusal(monkeypatch, capsys, "ppo_rlvr.py", "--ckpt", nan_checkpoint(tiny[0], tmp_path / "nan"), "--data",
                  tiny[1], "--preset", "tiny", "--out", out, "--steps", 2, "--prompts-per-step", 8,
                  "--max-new-tokens", 4, "--save-every", 1, "--eval-n", 0)
    assert err.startswith("error: non-finite metric at step 0: {'step': 0,") and "'pg_loss': nan" in err, err
    assert err.endswith(f"stopping. The last good checkpoint (if any) is untouched in {out}")
    assert not os.path.exists(out / "model.safetensors")


def test_adaptive_beta_bound_of_a_long_run_is_printed_not_an_overflow(tiny, tmp_path, monkeypatch, capsys):
    """--kl-target prints how far beta can move over the run: (1 + 0.2 P n / horizon) ** steps. On the tulu3-8b
    preset (44642 steps) with 16 samples per prompt (Tulu 3.1's GRPO) that power is past a float's range: the run
    must still start (it stops here at its first rollout, stubbed), not die of an OverflowError."""
    import model as model_mod

    def first_rollout(*a, **kw):
        raise SystemExit("reached the first rollout")
    monkeypatch.setattr(model_mod, "generate", first_rollout)
    assert refusal(monkeypatch, capsys, "ppo_rlvr.py", "--ckpt", tiny[0], "--data", tiny[1], "--preset", "tulu3-8b",
                   "--out", tmp_path / "o", "--advantage", "grpo", "--prompts-per-step", 64, "--samples-per-prompt", 16,
                   "--kl-target", 0.1) == "reached the first rollout"
    out = capsys.readouterr().out
    assert "adaptive beta: at most x e^905 or x e^-905 over this run's 44642 steps of 1024 episodes" in out, out
    # a bound within range is still printed as a factor
    assert refusal(monkeypatch, capsys, "ppo_rlvr.py", "--ckpt", tiny[0], "--data", tiny[1], "--preset", "tiny",
                   "--out", tmp_path / "o", "--steps", 10, "--prompts-per-step", 8, "--kl-target", 0.1,
                   "--kl-horizon", 16) == "reached the first rollout"
    assert "adaptive beta: at most x2.59 or x0.386 over this run's 10 steps of 8 episodes" in capsys.readouterr().out


def test_tulu3_preset_checkpoints_the_policy_and_value_model(tiny, tmp_path, monkeypatch, capsys):
    """At 8B a tulu3-8b micro-batch (2 x up to 4096 tokens) goes through the policy and the value model in one graph:
    ~6 MiB/token of saved activations each without recomputation, ~100 GB beside ~35 GB of sharded states on an
    80 GB GPU. The preset turns gradient checkpointing on for both (the tiny one leaves it off); --no-grad-checkpoint
    turns it off. The run stops at its first rollout (stubbed)."""
    import common
    import model as model_mod
    seen, load = [], common.load_model

    def spy(*a, **kw):
        m = load(*a, **kw)
        seen.append(bool(m.grad_checkpoint) if kw.get("requires_grad", True) else None)  # (the frozen reference)
        return m

    def first_rollout(*a, **kw):
        raise SystemExit("reached the first rollout")
    monkeypatch.setattr(common, "load_model", spy)
    monkeypatch.setattr(model_mod, "generate", first_rollout)
    args = ("ppo_rlvr.py", "--ckpt", tiny[0], "--data", tiny[1], "--out", tmp_path / "o", "--prompts-per-step", 8)
    for extra, want, saved in ((("--preset", "tulu3-8b"), True, "bf16 every 100 steps"),
                               (("--preset", "tiny"), False, "fp32 at the end"),
                               (("--preset", "tulu3-8b", "--no-grad-checkpoint", "--save-every", 0), False,
                                "bf16 at the end"),
                               (("--preset", "tiny", "--grad-checkpoint"), True, "fp32 at the end")):
        seen.clear()
        assert refusal(monkeypatch, capsys, *args, *extra) == "reached the first rollout"
        assert seen == [want, None, want], (extra, seen)  # policy, reference, value model's body
        assert f", saved in {saved}\n" in capsys.readouterr().out  # (Tülu 3's RLVR run saved every 100 steps)


def test_resume_takes_this_runs_weight_decay_for_both_optimizers(tiny, tmp_path, monkeypatch):
    """A resumed run keeps the saved Adam moments but the flags it was given ("in effect from here"): the value
    model's optimizer too, not only the policy's. Its weights are read once, from train_state/."""
    import common
    made = []

    def recording(model, lr, weight_decay=0.0):
        made.append(build(model, lr, weight_decay))
        return made[-1]
    build = common.build_optimizer
    monkeypatch.setattr(common, "build_optimizer", recording)
    args = ("ppo_rlvr.py", "--ckpt", tiny[0], "--data", tiny[1], "--preset", "tiny", "--out", tmp_path / "o",
            "--eval-n", 0, "--prompts-per-step", 8, "--max-new-tokens", 4)
    run_here(monkeypatch, *args, "--steps", 1)
    made.clear()
    import model
    opened, safe_open = [], model.safe_open
    monkeypatch.setattr(model, "safe_open",
                        lambda f, *a, **k: opened.append(os.path.dirname(f)) or safe_open(f, *a, **k))
    run_here(monkeypatch, *args, "--steps", 2, "--weight-decay", 0.1, "--resume")
    # the weights read: the reference's alone; the policy and the value model come from train_state/ only
    assert opened == [tiny[0]]
    assert len(made) == 2  # the policy's and the value model's
    for name, opt in zip(("policy", "value model"), made):
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0], name  # matrices, then norms and biases
        # and the saved moments were restored: 4 epochs x 1 mini-batch a step, 2 steps in all
        assert {int(st["step"]) for st in opt.state.values()} == {8}


def test_out_a_symlink_to_a_directory_not_made_yet(tiny, tmp_path):
    # the start evaluation is written to --out, made if missing: a symlink's target too (os.makedirs of the
    # link raised FileExistsError once the start evaluation had run)
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i} a."}],
                                           "ground_truth": LETTER_A, "dataset": "tiny_if"}) + "\n" for i in range(2)))
    os.symlink(tmp_path / "target", tmp_path / "run")
    run_ppo(tiny, tmp_path / "run", "--steps", 1, "--prompts-per-step", 8, "--eval-prompts", prompts, "--eval-n", 2)
    assert {"start_eval.json", "eval.json", "model.safetensors"} <= set(os.listdir(tmp_path / "target"))


def test_prompts_per_step_must_split_over_ranks(tiny, tmp_path, monkeypatch, capsys):
    # each rank samples prompts-per-step / world prompts: a remainder would be dropped silently. Three ranks are
    # stood in for (init_distributed is the script's only source of the world size)
    import common
    monkeypatch.setattr(common, "init_distributed", lambda: (0, 3, torch.device("cpu")))
    args = ["ppo_rlvr.py", "--ckpt", tiny[0], "--data", tiny[1], "--preset", "tiny", "--out", tmp_path / "o"]
    assert refusal(monkeypatch, capsys, *args, "--prompts-per-step", 8).endswith(
        "--prompts-per-step 8 must be a multiple of the world size 3")
    err = refusal(monkeypatch, capsys, *args, "--prompts-per-step", 6, "--samples-per-prompt", 3, "--mini-batches", 4)
    assert err.endswith("6 rollouts per rank (prompts-per-step / world x samples) do not split into --mini-batches 4")


def test_more_samples_per_prompt_than_the_tiny_rollout_batch(tiny, tmp_path):
    """The tiny preset's 32 rollouts per step over n samples per prompt: n > 32 still takes one prompt
    (32 // n was 0 prompts, and a division by zero)."""
    run_ppo(tiny, tmp_path / "o", "--advantage", "grpo", "--samples-per-prompt", 40, "--steps", 1,
            "--max-new-tokens", 4, "--temperature", 0.7)
    m = metrics(str(tmp_path / "o"))
    assert len(m) == 1
    assert m[0]["logp_gap_max"] <= 1e-5  # sampled and trained at the same temperature (not only at 1)
    assert abs(m[0]["kl"]) <= 1e-6  # the reference (the policy itself at step 0) is read at that temperature too


def test_no_eos_penalty_sequence_norm_and_no_reference(tiny, tmp_path):
    """One token per response: none ends with EOS, so every score is the penalty; beta 0 loads no reference
    and logs no KL (it would read 0 while the policy moves); the per-sequence normalisation runs (its
    arithmetic: test_ppo_loss_terms)."""
    run_ppo(tiny, tmp_path / "o", "--steps", 1, "--prompts-per-step", 8, "--max-new-tokens", 1,
            "--no-eos-penalty", -10, "--beta", 0, "--loss-norm", "sequence", "--lr", 1e-2)
    m = metrics(str(tmp_path / "o"))[0]
    assert m["no_eos"] == 1 and m["reward"] == -10
    assert "kl" not in m


def test_two_processes_equal_one(tiny, reward_model, tmp_path):
    """Same rollouts (--per-prompt-seed), same whitening (over both ranks), same token-normalised loss:
    2 FSDP2 ranks on gloo give the single process's metrics, policy and value model. The value model
    starts from the reward model, whose score layer rank 0 reads and broadcasts."""
    args = ("--steps", 2, "--prompts-per-step", 8, "--lr", 1e-2, "--per-prompt-seed", "--micro-batch-size", 3,
            "--value-ckpt", reward_model[0])
    run_ppo(tiny, tmp_path / "one", *args)
    run_ppo(tiny, tmp_path / "two", *args, nproc=2)
    one, two = metrics(str(tmp_path / "one")), metrics(str(tmp_path / "two"))
    assert one[0]["reward"] > 0 and one[-1]["kl"] != 0  # a real signal went through both
    assert abs(one[0]["explained_var"]) > 1e-3  # the reward model's head, not a zero one (which gives 0)
    for a, b in zip(one, two):
        for k in ("reward", "kl", "pg_loss", "value_loss", "clipfrac", "explained_var", "approx_kl"):
            assert a[k] == pytest.approx(b[k], abs=1e-5, rel=1e-4), k
    w1, w2 = (load_file(str(tmp_path / k / "model.safetensors")) for k in ("one", "two"))
    assert update_gap(w1, w2, load_file(os.path.join(tiny[0], "model.safetensors"))) < 1e-3
    v1, v2 = (saved_state(tmp_path / k, tmp_path)["value"]["model"] for k in ("one", "two"))
    assert max_diff(v1, v2) < 1e-5
    # and the value model did learn: its head moved off the reward model's score layer
    assert (v1["head.weight"] - reward_model[1].score.weight).abs().max() > 1e-4


def test_kill_and_resume_matches_uninterrupted(tiny, tmp_path):
    args = ("--steps", 4, "--prompts-per-step", 8, "--lr", 1e-2, "--save-every", 1, "--kl-target", 1.0,
            "--kl-horizon", 100)  # adaptive beta, moving ~1.6% a step: it must be restored too
    run_ppo(tiny, tmp_path / "full", *args)
    out = tmp_path / "killed"
    proc = run_ppo(tiny, out, *args, wait=False)
    step = kill_at_first_checkpoint(proc, out, 300)
    assert step < 4, "the run finished before it could be killed"
    before = open(out / "metrics.jsonl").readlines()[:step]
    r = run_ppo(tiny, out, *args, "--resume")
    # it did resume (a fresh start would reach the same weights too): the saved steps were not run again
    assert f"resumed from {out} at step {step}" in r.stdout
    assert open(out / "metrics.jsonl").readlines()[:step] == before
    full, res = metrics(str(tmp_path / "full")), metrics(str(out))
    assert [m["step"] for m in res] == list(range(4))
    assert full[-1]["beta"] != full[0]["beta"]
    for a, b in zip(full, full[1:]):  # fed each step's KL per sequence and its 8 episodes
        assert b["beta"] == pytest.approx(adaptive_kl(a["beta"], a["kl"], 8, 1.0, 100), rel=1e-9)
    for a, b in zip(full, res):  # beta (adaptive here), rewards, losses: all continue exactly
        for k in ("beta", "reward", "kl", "pg_loss", "value_loss"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
    w_full, w_res = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "full", out))
    assert max_diff(w_full, w_res) < 1e-6


# -----------------------------------------------------------------------------
# the script's loop against a reference trainer written out here in float64


def stub_generate(tok, V, calls):
    """model.generate's stand-in: random responses of random lengths, some ending with the EOS and the rest cut
    at max_new_tokens, with made-up sampling log-probs (the entropy and the log-prob gap are computed from
    them). Records what it was asked and the weights it was handed, which must be the policy's of the step."""
    special = {tok.token_to_id(t) for t in tok.special_tokens.values() if isinstance(t, str)}
    plain = torch.tensor([i for i in range(V) if i not in special])
    eos = tok.eos_token_ids[0]

    def generate(model, prompts, max_new_tokens, temperature=1.0, eos_token_ids=(), **kw):
        g = torch.Generator().manual_seed(300 + len(calls))  # (a seed whose scores take all three values)
        resp, glp = [], []
        for _ in prompts:
            ends = torch.rand((), generator=g).item() < 0.75
            L = int(torch.randint(1, max_new_tokens + 1, (), generator=g)) if ends else max_new_tokens
            r = plain[torch.randint(len(plain), (L,), generator=g)].tolist()
            resp.append(r[:-1] + [eos] if ends else r)
            glp.append((-3 * torch.rand(L, generator=g, dtype=torch.float64)).tolist())
        calls.append({"prompts": [list(p) for p in prompts], "resp": resp, "glp": glp, "temperature": temperature,
                      "eos": list(eos_token_ids), "weights": {k: v.detach().double().clone()
                                                             for k, v in model.state_dict().items()}})
        return resp, glp
    return generate


def padded(rows, T):
    """list of 1-D float64 tensors -> (B, T), 0 after each row's end."""
    return torch.stack([torch.cat([x, x.new_zeros(T - len(x))]) for x in rows])


def logps_and_values(policy, body, head, seqs, temperature):
    """Per response token (one unpadded sequence at a time): log softmax(logits / temperature) of the token
    under `policy` and V(prompt + response[:t]) = head . h of the value model's body at the position that
    predicts token t, each (B, T) float64; differentiable."""
    T = max(len(r) for _, r in seqs)
    lps, vs = [], []
    for p, r in seqs:
        x, at = torch.tensor([p + r]), slice(len(p) - 1, len(p) - 1 + len(r))
        if policy is not None:
            logits = policy(x)[0, at] / temperature
            lps.append(logits.log_softmax(-1).gather(1, torch.tensor(r)[:, None])[:, 0])
        if body is not None:
            vs.append(body(x, return_hidden=True)[0, at] @ head[0])
    return (padded(lps, T) if lps else None), (padded(vs, T) if vs else None)


def gae_tokens(rewards, values, L, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V = 0 past the last token."""
    V = lambda k: values[k] if k < L else 0.0  # noqa: E731
    delta = [rewards[k] + gamma * V(k + 1) - V(k) for k in range(L)]
    return [sum((gamma * lam) ** i * delta[t + i] for i in range(L - t)) for t in range(L)]


def reference_advantages(mode, scores, kl, values, mask, n, beta, gamma, lam):
    """Step 4 from the module docstring, one sequence at a time. -> (advantages, returns or None), (B, T).
      gae   rewards -beta kl_t + the score on the last token; GAE; whitened over the batch (unbiased std);
            returns from the advantages before whitening
      rloo  R_i = s_i - beta sum_t kl_t; A_i = R_i - mean of the other samples of its prompt, on every token
      grpo  A_i = (s_i - mean) / (population std + 1e-4) over its prompt's samples (0 when all are equal)"""
    lens = mask.sum(1).long().tolist()
    if mode == "gae":
        raw = []
        for b, L in enumerate(lens):
            r = [-beta * kl[b, t].item() + (scores[b] if t == L - 1 else 0.0) for t in range(L)]
            raw.append(torch.tensor(gae_tokens(r, values[b].tolist(), L, gamma, lam), dtype=torch.float64))
        raw = padded(raw, mask.shape[1])
        flat = raw[mask.bool()]
        return (raw - flat.mean()) / (flat.var() + 1e-8).sqrt() * mask, (raw + values) * mask
    adv = []
    for b in range(len(lens)):
        g = range(b // n * n, b // n * n + n)
        if mode == "rloo":
            R = [scores[j] - beta * kl[j].sum().item() for j in g]
            i = b % n
            adv.append(R[i] - (sum(R) - R[i]) / (n - 1))
        else:
            s = torch.tensor([scores[j] for j in g], dtype=torch.float64)
            adv.append(0.0 if (s == s[0]).all() else ((scores[b] - s.mean()) / (s.std(unbiased=False) + 1e-4)).item())
    return torch.tensor(adv, dtype=torch.float64)[:, None] * mask, None


def kl_of(est, d):
    """k1, k2, k3 of d = logp - ref_logp (Schulman 2020)."""
    return {"k1": d, "k2": d * d / 2, "k3": (-d).exp() - 1 + d}[est]


@pytest.mark.parametrize("mode", ["gae", "grpo", "rloo"])
def test_a_run_matches_a_reference_trainer(tiny, reward_model, tmp_path, monkeypatch, mode):
    """Three steps of the script against a trainer written out here in float64 from the module docstring.
    Generation is stubbed (fixed random responses, some without EOS, scored by the real verifier, the no-EOS
    penalty replacing the score); 8 rollouts a step (4 prompts x 2 samples for gae, 2 x 4 for the groups),
    2 epochs x 2 mini-batches of 4 in micro-batches of 3 and 1, so the ratio moves off 1 and the clips bite;
    temperature 0.7 in the training log-probs; the KL against the frozen start; AdamW with decay (each model
    its own lr, linear to 0), gradients clipped. gae: the value model from the reward model (V != 0 from the
    start), k3 in the per-token rewards (>= 0, so the KL can be near the target) with an adaptive beta
    (short horizon; the target such that step 1's move is not at the 20% bound), GAE(0.99, 0.9), whitened
    advantages, returns from the raw ones, the clipped value loss at vf_coef 0.5; grpo: k2 as a loss term,
    the per-sequence loss normalisation; rloo: k1 in the sequence reward. Compares every step's logged
    metrics, the weights each rollout was sampled with, and the final policy (and value model)."""
    import model as model_mod
    from data import epoch_order, load_mixture, rlvr_row
    from model import read_tensor, seeded
    from verifiers import verify
    base, data = tiny
    tok = Tokenizer.from_pretrained(base)
    steps, T_max, temp, beta, kl_target, horizon, penalty = 3, 8, 0.7, 0.1, 0.7, 10, -5.0
    lr, vlr, wd, clip, vclip, vf_coef, gamma, lam, grad_clip = 1e-2, 3e-2, 0.01, 0.15, 0.1, 0.5, 0.99, 0.9, 0.5
    n = 2 if mode == "gae" else 4
    P, est, norm = 8 // n, {"gae": "k3", "grpo": "k2", "rloo": "k1"}[mode], "sequence" if mode == "grpo" else "token"
    calls = []
    monkeypatch.setattr(model_mod, "generate", stub_generate(tok, 300, calls))
    out = tmp_path / "o"
    only = ("--value-ckpt", reward_model[0], "--kl-target", kl_target, "--kl-horizon", horizon, "--gamma", gamma,
            "--lam", lam, "--value-clip", vclip, "--vf-coef", vf_coef, "--value-lr", vlr) if mode == "gae" else ()
    run_here(monkeypatch, "ppo_rlvr.py", "--ckpt", base, "--data", data, "--preset", "tiny", "--out", out, "--eval-n", 0,
             "--advantage", mode, "--steps", steps, "--prompts-per-step", P, "--samples-per-prompt", n,
             "--max-new-tokens", T_max, "--temperature", temp, "--beta", beta, "--kl-estimator", est,
             "--no-eos-penalty", penalty, "--clip", clip, "--ppo-epochs", 2, "--mini-batches", 2,
             "--micro-batch-size", 3, "--loss-norm", norm, "--lr", lr, "--weight-decay", wd, "--schedule", "linear",
             "--grad-clip", grad_clip, *only)
    logged = metrics(str(out))
    assert [m["step"] for m in logged] == list(range(steps)) and len(calls) == steps

    rows, _ = load_mixture([data], rlvr_row, seed=0)
    prompts = [encode_prompt(tok, r["messages"]) for r in rows]
    order = epoch_order(len(rows), 0, 0)
    policy = Llama.from_pretrained(base, dtype=torch.float64)
    ref = Llama.from_pretrained(base, dtype=torch.float64).requires_grad_(False)
    body = head = vopt = None
    if mode == "gae":
        body = Llama.from_pretrained(reward_model[0], dtype=torch.float64, body_only=True)
        head = torch.nn.Parameter(read_tensor(reward_model[0], "score.weight", dtype=torch.float64))
        body.register_parameter("head", head)  # (so that the value model's optimizer and clipping see it)
        vopt = adamw(body.parameters(), vlr, wd)
    popt = adamw(policy.parameters(), lr, wd)
    start, vstart = ({k: v.clone() for k, v in m.state_dict().items()} if m else None for m in (policy, body))
    seen = {"clip": 0, "vclip": 0, "pclip": 0, "vnclip": 0, "scores": set(), "adv0": 0}
    for step, m in enumerate(logged):
        call = calls[step]
        # 1. this step's prompts, each n times, consecutive; sampled by the policy as it is now
        ks = [k for k in order[step * P:(step + 1) * P] for _ in range(n)]
        assert call["prompts"] == [prompts[k] for k in ks]
        assert call["temperature"] == temp and call["eos"] == tok.eos_token_ids
        if step:  # (relative to how far it moved: Adam makes rounding in a near-zero gradient a step of lr)
            assert update_gap(call["weights"], policy.state_dict(), start) < 1e-4
        resp, B = call["resp"], len(ks)
        seqs = [(prompts[k], r) for k, r in zip(ks, resp)]
        # 2. scores: 10 x the verdict, the penalty without an EOS
        verified = [verify(rows[k]["dataset"], tok.decode(r, skip_special_tokens=True), rows[k]["ground_truth"])
                    for k, r in zip(ks, resp)]
        has_eos = [r[-1] == tok.eos_token_ids[0] for r in resp]
        scores = [10.0 * v if e else penalty for v, e in zip(verified, has_eos)]
        seen["scores"] |= set(scores)
        # 3. old and reference log-probs, values, before any update of this step
        lens = [len(r) for r in resp]
        T = max(lens)
        mask = padded([torch.ones(L, dtype=torch.float64) for L in lens], T)
        with torch.no_grad():
            old, values = logps_and_values(policy, body, head, seqs, temp)
            ref_lp, _ = logps_and_values(ref, None, None, seqs, temp)
        values = values if values is not None else torch.zeros_like(old)
        gen = padded([torch.tensor(x, dtype=torch.float64) for x in call["glp"]], T)
        # 4. advantages (gae, rloo: the KL in the reward; grpo: in the loss)
        kl = kl_of(est, old - ref_lp) * mask
        adv, returns = reference_advantages(mode, scores, kl, values, mask, n, beta, gamma, lam)
        seen["adv0"] += (adv == 0).all(1).sum().item()
        # 5. the updates: each epoch reshuffles (the script's seeded permutation), one step per mini-batch
        step_lr = 1 - step / steps  # linear to 0, no warmup
        for opt, base_lr in ((popt, lr), (vopt, vlr)):
            for g in opt.param_groups if opt else ():
                g["lr"] = base_lr * step_lr
        sums = torch.zeros(6, dtype=torch.float64)
        norms = []
        for epoch in range(2):
            perm = torch.randperm(B, generator=torch.Generator().manual_seed(seeded("shuffle", 0, step, epoch, 0)))
            for mb in (perm[:B // 2], perm[B // 2:]):
                lp, v = logps_and_values(policy, body, head, [seqs[i] for i in mb], temp)
                w = lp.shape[1]
                mk, a, o, r_lp, ov = (x[mb][:, :w] for x in (mask, adv, old, ref_lp, values))
                ratio = (lp - o).exp()
                pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))
                clipped = (-a * ratio.clamp(1 - clip, 1 + clip) > -a * ratio).double()
                per_tok, vf, vclipped = pg, torch.zeros_like(pg), torch.zeros_like(pg)
                if mode == "grpo":
                    per_tok = per_tok + beta * kl_of(est, lp - r_lp)
                if mode == "gae":
                    R = returns[mb][:, :w]
                    vc = ov + (v - ov).clamp(-vclip, vclip)
                    vf = 0.5 * torch.maximum((v - R) ** 2, (vc - R) ** 2)
                    vclipped = ((vc - R) ** 2 > (v - R) ** 2).double()
                    per_tok = per_tok + vf_coef * vf
                if norm == "token":  # the mini-batch's token sum over its token count
                    loss = (per_tok * mk).sum() / mk.sum()
                else:  # each response's mean, averaged over the mini-batch's responses
                    loss = ((per_tok * mk).sum(1) / mk.sum(1)).mean()
                loss.backward()
                norms.append(clip_grads(policy.parameters(), grad_clip))
                seen["pclip"] += norms[-1] > grad_clip
                popt.step()
                popt.zero_grad()
                if body is not None:
                    seen["vnclip"] += clip_grads(body.parameters(), grad_clip) > grad_clip
                    vopt.step()
                    vopt.zero_grad()
                with torch.no_grad():
                    sums += torch.stack([(x * mk).sum() for x in (pg, vf, clipped, vclipped, 0.5 * (lp - o) ** 2, mk)])
        seen["clip"] += sums[2].item()
        seen["vclip"] += sums[3].item()
        # 6. metrics; an adaptive beta moves by at most 20% x N / horizon towards the target KL per sequence
        N, nt, n_tok = B, sums[5].item(), mask.sum().item()
        kl_seq = kl.sum().item() / N
        want = {"lr": lr * step_lr, "beta": beta, "reward": sum(scores) / N, "accuracy": sum(verified) / N,
                "entropy": -(gen * mask).sum().item() / n_tok, "resp_len": n_tok / N, "no_eos": 1 - sum(has_eos) / N,
                "logp_gap_mean": ((gen - old).abs() * mask).sum().item() / n_tok,
                "logp_gap_max": ((gen - old).abs() * mask).max().item(), "grad_norm": sum(norms) / len(norms),
                "kl": kl_seq, "pg_loss": sums[0].item() / nt, "clipfrac": sums[2].item() / nt,
                "approx_kl": sums[4].item() / nt}
        if mode == "gae":
            var = lambda x: x[mask.bool()].var().item()  # noqa: E731
            want.update(value_loss=sums[1].item() / nt, vf_clipfrac=sums[3].item() / nt,
                        explained_var=1 - var(returns - values) / var(returns))
            beta *= 1 + min(max(kl_seq / kl_target - 1, -0.2), 0.2) * N / horizon
        else:
            assert not {"value_loss", "vf_clipfrac", "explained_var"} & m.keys()
        for k, x in want.items():
            assert m[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), (step, k)
    # the checks above had something to check: every path was taken
    assert logged[0]["kl"] == 0 and all(abs(m["kl"]) > 1e-3 for m in logged[1:])
    assert {penalty, 0.0, 10.0} <= seen["scores"], seen
    assert seen["clip"] > 0 and seen["pclip"] > 0 and seen["adv0"] < steps * 8, seen
    ours = Llama.from_pretrained(str(out), dtype=torch.float64).state_dict()
    assert update_gap(ours, policy.state_dict(), start) < 1e-4  # (measured 2e-6: fp32 against float64)
    if mode != "gae":
        return
    assert abs(logged[1]["kl"] / kl_target - 1) < 0.2 and seen["vclip"] > 0 and seen["vnclip"] > 0, seen
    vm = saved_state(out, tmp_path)["value"]["model"]
    assert vm.keys() == {f"body.{k}" for k in vstart if k != "head"} | {"head.weight"}
    vm = {k.replace("body.", "", 1).replace("head.weight", "head"): v for k, v in vm.items()}
    assert update_gap(vm, body.state_dict(), vstart) < 1e-4


def test_start_accuracy_is_the_start_checkpoints(tiny, tmp_path, monkeypatch):
    """With no eval.json beside --ckpt, the start's held-out accuracy is evaluated before the first step, on the
    start weights, and kept in start_eval.json; a resumed run that lost that file evaluates the start checkpoint
    again (not the policy it resumed); one that has it evaluates only the end."""
    import common
    seen, batch_sizes = [], []
    monkeypatch.setattr(common, "evaluate", recording_evaluate(seen, batch_sizes))
    start = Llama.from_pretrained(tiny[0]).state_dict()["layers.0.self_attn.q_proj.weight"]
    out = tmp_path / "o"
    args = ("--ckpt", tiny[0], "--data", tiny[1], "--preset", "tiny", "--out", out, "--eval-prompts", tiny[1],
            "--eval-n", 2, "--prompts-per-step", 8, "--max-new-tokens", 4, "--lr", 1e-2,
            "--no-eos-penalty", -10)  # a reward (no sample ends in 4 tokens), so that the policy moves
    run_here(monkeypatch, "ppo_rlvr.py", *args, "--steps", 1, "--eval-batch-size", 3)
    assert len(seen) == 2 and torch.equal(seen[0], start) and not torch.equal(seen[1], start)
    assert batch_sizes == [3, 3]
    assert json.load(open(out / "start_eval.json"))["accuracy"] == 0.25  # (the first call's score)
    assert json.load(open(out / "eval.json"))["start"]["accuracy"] == 0.25
    os.remove(out / "start_eval.json")
    seen.clear()
    run_here(monkeypatch, "ppo_rlvr.py", *args, "--steps", 2, "--resume")
    assert len(seen) == 2 and torch.equal(seen[0], start)
    seen.clear()
    run_here(monkeypatch, "ppo_rlvr.py", *args, "--steps", 3, "--resume")
    assert len(seen) == 1 and not torch.equal(seen[0], start)


def test_resume_refuses_a_start_retrained_since(tiny, tmp_path, monkeypatch, capsys):
    """The KL term's reference is --ckpt, loaded again on --resume: a checkpoint retrained in place since the run
    began would be another model (the policy would be pulled toward weights it never started from). Refused in
    one sentence; without a KL term (--beta 0) there is no reference and the run resumes."""
    import shutil
    sft, out = tmp_path / "sft", tmp_path / "o"
    shutil.copytree(tiny[0], sft)
    args = ("ppo_rlvr.py", "--ckpt", sft, "--data", tiny[1], "--preset", "tiny", "--eval-n", 0, "--prompts-per-step",
            8, "--max-new-tokens", 4, "--advantage", "grpo")
    run_here(monkeypatch, *args, "--out", out, "--steps", 1)
    run_here(monkeypatch, *args, "--out", tmp_path / "b0", "--steps", 1, "--beta", 0)
    perturb_in_place(sft)
    assert refusal(monkeypatch, capsys, *args, "--out", out, "--steps", 2, "--resume") == (
        f"error: {sft} is not the checkpoint the run in {out} started from (its weights have changed since), and "
        "it is this run's reference; pass the one it started from as --ckpt, or start afresh without --resume")
    run_here(monkeypatch, *args, "--out", tmp_path / "b0", "--steps", 2, "--beta", 0, "--resume")
    assert [m["step"] for m in metrics(str(tmp_path / "b0"))] == [0, 1]


def test_resume_refuses_another_stages_checkpoint_and_an_out_that_is_the_reference(tiny, tmp_path, monkeypatch,
                                                                                   capsys):
    """ppo_rlvr.py --resume with the --out of a DPO (or SFT) run would take that run's weights, Adam moments and step
    for its own (with grpo, silently; with gae, as "saved without a value model"): refused, in one sentence. An
    --out that is --ckpt would have the first save overwrite the KL reference: refused too (--beta 0 has none)."""
    import shutil
    dpo, out = tmp_path / "dpo", tmp_path / "o"
    shutil.copytree(tiny[0], dpo)
    torch.save({"step": 1, "stage": "dpo", "sharded": ["model"]}, dpo / "train_state.pt")  # as dpo.py leaves it
    args = ("ppo_rlvr.py", "--data", tiny[1], "--preset", "tiny", "--eval-n", 0, "--prompts-per-step", 8,
            "--max-new-tokens", 4, "--advantage", "grpo", "--steps", 1)
    assert refusal(monkeypatch, capsys, *args, "--ckpt", tiny[0], "--out", dpo, "--resume") == (
        f"error: --resume: the checkpoint in {dpo} was saved by the dpo stage, not by rlvr; give this run an --out of "
        "its own (another stage's output goes in --ckpt)")
    assert refusal(monkeypatch, capsys, *args, "--ckpt", dpo, "--out", dpo) == (
        f"error: --out {dpo} is --ckpt {dpo}, this run's reference: a save would overwrite it; give the run an "
        "--out of its own")
    run_here(monkeypatch, *args, "--ckpt", dpo, "--out", out)
    run_here(monkeypatch, *args, "--ckpt", dpo, "--out", out, "--steps", 2, "--resume")
    assert f"resumed from {out} at step 1" in capsys.readouterr().out
    run_here(monkeypatch, *args, "--ckpt", dpo, "--out", dpo, "--beta", 0)


@pytest.mark.parametrize("preset,tokens", [("tiny", 64), ("tulu3-8b", 512)])
def test_presets_fill_the_held_out_decoding_length(tiny, tmp_path, monkeypatch, preset, tokens):
    # the tiny tasks' answers fit in 64 tokens; a real model's chain of thought (GSM8K) needs Tülu 3's 512
    args = ("--ckpt", tiny[0], "--data", tiny[1], "--out", tmp_path / "o", "--eval-prompts", tiny[1], "--eval-n", 2,
            "--prompts-per-step", 8)
    assert eval_length(monkeypatch, "ppo_rlvr.py", *args, "--preset", preset) == tokens
    assert eval_length(monkeypatch, "ppo_rlvr.py", *args, "--preset", preset, "--eval-max-new-tokens", 7) == 7


def test_no_host_sync_between_the_micro_batches_of_an_update(tiny, tmp_path, monkeypatch):
    # on a GPU each would idle it (helpers.syncs_between_backwards); one step, one epoch, one mini-batch: one
    # update of 4 micro-batches of 2 rollouts
    n, between = syncs_between_backwards(monkeypatch, "ppo_rlvr.py", "--ckpt", tiny[0], "--data", tiny[1], "--preset",
                                         "tiny", "--out", tmp_path / "o", "--eval-n", 0, "--max-new-tokens", 8,
                                         "--steps", 1, "--prompts-per-step", 8, "--ppo-epochs", 1,
                                         "--micro-batch-size", 2)
    assert n == 4 and not between, f"host syncs between the update's micro-batches: {between}"


def test_too_few_prompts_says_why(tiny, tmp_path, monkeypatch, capsys):
    # --skip-bad that skipped every row: the stop says so rather than leaving "0 prompts" unexplained
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}], "ground_truth": "x",
                                "dataset": "gsm8k"}) + "\n")
    assert refusal(monkeypatch, capsys, "ppo_rlvr.py", "--ckpt", tiny[0], "--data", path, "--preset", "tiny",
                   "--out", tmp_path / "o", "--skip-bad") == \
        "error: 0 prompts (1 bad rows skipped) is fewer than one batch of --prompts-per-step 32"
