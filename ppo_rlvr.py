"""
Reinforcement learning with verifiable rewards, the third stage of Tülu 3 (paper §6): PPO with a value
model, GAE and a KL penalty against the starting policy, rewarded by verifiers instead of a reward model.

    python ppo_rlvr.py                               # tiny default on the CPU: continues from out/dpo/
                                                     # (else out/sft/), writes out/rlvr/
    python ppo_rlvr.py --advantage grpo              # the same loop as GRPO (or rloo): no value model
    python ppo_rlvr.py --ckpt path/to/dpo --data rlvr.jsonl --eval-prompts held_out.jsonl --preset tulu3-8b
    torchrun --standalone --nproc_per_node 8 ppo_rlvr.py --ckpt ... --data ... --preset tulu3-8b

One step (--advantage gae, Tülu 3's PPO):
1. Rollouts: P prompts (over all ranks), n samples each, drawn by model.generate at --temperature. The
   sampled token ids go into the training batch as they are: never decoded and re-encoded.
2. Scores: 10 x verifiers.verify(dataset, response, ground_truth); with --no-eos-penalty, a response
   that never produced EOS scores the penalty instead (-10 in Tülu 3).
3. Without gradients: the log-probs of the sampled tokens under the policy ("old", recomputed by the
   training forward at the same temperature; their gap to the generator's own log-probs is logged), under
   the frozen reference (the starting checkpoint), and the values V(prefix) of the value model.
4. Per-token rewards r_t = -beta * KL_t, plus the score at the last response token (the EOS if any);
   KL_t = k1 / k2 / k3 of d_t = logp_t - ref_logp_t. GAE(gamma, lambda) gives advantages, whitened over
   the whole batch (all ranks), and returns = advantages + values.
5. --ppo-epochs passes over the batch in --mini-batches mini-batches, one optimizer step each for the
   policy and the value model: clipped policy loss + vf_coef x clipped value loss, summed over tokens
   and divided by the mini-batch's token count over all micro-batches and ranks (--loss-norm).
6. beta is fixed, or adaptive (--kl-target, Ziegler et al. 2019): it moves by at most 20% x n / horizon
   per step towards the target KL per sequence.

The other two modes change step 4 and drop the value model; everything else is reused.
  grpo  GRPO (Shao et al. 2024, DeepSeekMath). n samples per prompt; every token of sample i gets
        A_i = (s_i - mean(s)) / (std(s) + 1e-4) over its group's scores s (population std). The KL is
        not in the reward but a loss term beta * k3(logp, ref_logp) per token, with its gradient.
        What it simplifies, against PPO:
        1. no value model, no GAE: the group mean is the baseline, the same for every token of a
           response (no credit assignment within a response);
        2. the group's spread replaces the batch whitening (a group whose scores are all equal gets
           A = 0 and teaches nothing, though its tokens still count in the loss's normaliser and KL
           term, as in TRL; open-instruct's grpo_fast drops such groups by default);
        3. no per-token reward shaping: the KL is a regulariser of the loss (k3 unless --kl-estimator).
        The loss is token-normalised as in every mode here (--loss-norm token: open-instruct's and DAPO's);
        the GRPO paper's mean over each response's tokens, then over responses, is --loss-norm sequence.
  rloo  RLOO (Ahmadian et al. 2024; Kool et al. 2019). n samples per prompt; sequence reward
        R_i = s_i - beta * sum_t KL_t (the KL stays in the reward, as in Tülu's PPO and TRL's RLOO);
        every token of sample i gets A_i = R_i - mean_{j != i} R_j.
        What it simplifies, against PPO:
        1. no value model, no GAE: the other samples of the same prompt are the baseline (unbiased,
           since they do not depend on sample i);
        2. no whitening: the advantages keep the reward's scale.
Both keep PPO's per-token ratio clipping and several epochs over a batch (with 1 epoch and 1 mini-batch
the ratio is 1 and the update is the plain policy gradient; TRL's RLOO clips one ratio per sequence).

Memory: the policy, the frozen reference and the value model are all resident, FSDP2-sharded alike (so
each rank holds 1/world of each; the value model has no LM head; on CUDA the reference is stored in bf16, as
it computes, with no fp32 master weights). The value model starts from --value-ckpt: a causal LM's body with
a zero head, or an HF reward model (*ForSequenceClassification, 1 label) whole, as Tülu 3
starts its value model from a reward model. The reference is skipped when beta is 0 and not adaptive, the value
model outside --advantage gae. The entropy logged is the mean of -logp of the sampled tokens (a
Monte-Carlo estimate of the per-token entropy of the sampling distribution): the fused log-prob op
never forms the full distribution, so the exact entropy is not at hand. The value model's state and
its optimizer are saved in train_state/ next to the policy's (the output directory's HF checkpoint).
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from common import IGNORE, is_dist, is_rank0, load_model, token_logprobs
from model import read_tensor

# -----------------------------------------------------------------------------
# the maths of a PPO step: pure functions on (B, T) tensors, T = response tokens, mask = 1 on real
# response tokens (a row ends early when its response is shorter than T)


def sequence_scores(verified, has_eos, verify_reward, no_eos_penalty=None):
    """(B,) scores: verify_reward x the verifier's score in [0, 1]; a response that never sampled an EOS
    gets no_eos_penalty instead when it is set (it replaces the score, as open-instruct's non_stop_penalty)."""
    return torch.tensor([no_eos_penalty if no_eos_penalty is not None and not e else verify_reward * ok
                         for ok, e in zip(verified, has_eos)], dtype=torch.float32)


def token_rewards(scores, kl, mask, beta):
    """PPO's per-token rewards (B, T): the KL penalty -beta * kl on every response token, plus the sequence's
    score on its last token (the EOS, if one was sampled); 0 in the padding."""
    rewards = -beta * kl * mask
    last = mask.sum(1).long() - 1
    b = (last >= 0).nonzero()[:, 0]  # the rows with a response (an empty one has no last token)
    rewards[b, last[b]] += scores[b]
    return rewards


def masked_var(x, mask, reduce=None):
    """-> (mean, unbiased variance) of x where mask is 1, 0-d fp64 tensors. reduce: sums a tensor over ranks
    (common.all_reduce) for the statistics of the whole distributed batch; None on one process."""
    reduce = reduce or (lambda t: t)
    s = reduce(torch.stack([(x * mask).sum(), mask.sum()]).double())  # two passes: (sum, n), then sq. dev.
    mean = s[0] / s[1].clamp(min=1)
    ss = reduce(((x.double() - mean) ** 2 * mask).sum())
    return mean, ss / (s[1] - 1).clamp(min=1)


def masked_whiten(x, mask, reduce=None, eps=1e-8):
    """(x - mean) / std over the masked entries (open-instruct's masked_whiten); 0 off the mask."""
    mean, var = masked_var(x, mask, reduce)
    return ((x.double() - mean) * torch.rsqrt(var + eps) * mask).to(x.dtype)


def kl_estimate(logp, ref_logp, kind="k1"):
    """Per-token estimators of KL(pi || ref) from tokens sampled from pi (Schulman, "Approximating KL
    divergence", 2020), with d = logp - ref_logp = log pi(x)/ref(x):
      k1 = d                  unbiased, any sign per token
      k2 = d^2 / 2            biased (low for small KL), >= 0
      k3 = exp(-d) - 1 + d    unbiased, >= 0 (as ratio - 1 - log ratio of ref/pi)
    "Unbiased" is about the KL's value. Its gradient is another matter: as a reward (gae, rloo: no gradient
    through it, the policy gradient carries it), only k1 gives the gradient of KL(pi || ref); k3 gives that of
    KL(pi || ref) - KL(ref || pi). As a loss term differentiated through logp (grpo), k3 gives the gradient of
    KL(ref || pi), k2 that of KL(pi || ref), k1 none in expectation (refused).
    d is clamped to [-40, 40] for k3, as open-instruct does, so exp(-d) cannot overflow."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        d = d.clamp(-40, 40)
        return torch.expm1(-d) + d
    raise ValueError(f"kl_estimate: kind must be k1, k2 or k3, got {kind!r}")


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation (Schulman et al. 2016) on (B, T) tensors:
        delta_t = r_t + gamma * V_{t+1} - V_t,        A_t = delta_t + gamma * lam * A_{t+1}
    values[:, t] = V(prompt + response[:t]), the state before token t. The step after a row's last
    masked token is terminal (V = 0, A = 0): an episode ends at EOS or at the length limit (a truncated
    response is penalised by its score, not bootstrapped). This is textbook GAE with the score on the last
    response token, as open-instruct's newer trainers do; its Tülu 3-era ppo_vllm_thread_ray_gtrl.py (and
    TRL's PPOTrainer) put the score one position past the EOS and keep a value there, which shifts the
    advantage at the EOS slightly: runs do not reproduce that script's numbers token for token.
    -> (advantages, returns = advantages + values), both 0 off the mask."""
    m = mask.to(rewards.dtype)
    r, v = rewards * m, values * m
    nv, nm = (nn.functional.pad(x, (0, 1))[:, 1:] for x in (v, m))  # V_{t+1} and its mask, 0 past the end
    adv = torch.zeros_like(r)
    last = torch.zeros_like(r[:, 0])  # A_{t+1}
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * nv[:, t] - v[:, t]
        last = (delta + gamma * lam * nm[:, t] * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + v) * m


def policy_loss(logp, old_logp, adv, clip=0.2):
    """PPO's clipped surrogate (Schulman et al. 2017), per token, to minimise:
        max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)),   rho = pi(x) / pi_old(x)
    -> (loss, clipped) where clipped = 1 where the clipped term was the larger (no gradient)."""
    ratio = torch.exp(logp - old_logp)
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(l1, l2), (l2 > l1).to(logp.dtype)


def value_loss(v, old_v, returns, clip=0.2):
    """PPO's clipped value loss, per token: 0.5 * max((v - R)^2, (v_clip - R)^2) with
    v_clip = old_v + clip(v - old_v, -eps, eps): once the value is more than eps from old_v, toward the return,
    the loss stops pulling it further (a hard limit it is not: one optimizer step can still overshoot eps).
    -> (loss, clipped)."""
    vc = old_v + (v - old_v).clamp(-clip, clip)
    l1, l2 = (v - returns) ** 2, (vc - returns) ** 2
    return 0.5 * torch.maximum(l1, l2), (l2 > l1).to(v.dtype)


def adaptive_kl(beta, kl, n, target, horizon=10000):
    """Ziegler et al. 2019 §2.2 (lm-human-preferences' AdaptiveKLController): after a batch of n
    episodes with mean KL `kl` (per sequence), beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon.
    target=None is the fixed controller: beta unchanged."""
    if target is None:
        return beta
    err = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + err * n / horizon)


def group_advantages(scores, n, kind="grpo", eps=1e-4):
    """Per-sequence advantages from the scores (N,) of N/n groups of n consecutive samples per prompt.
      grpo  (s_i - mean) / (std + eps), population std of the group (open-instruct's grpo_fast; TRL uses
            the unbiased std, so its advantages are sqrt((n-1)/n) of these)
      rloo  s_i - mean_{j != i} s_j  (= n / (n - 1) * (s_i - mean))
    A group whose scores are all equal gets exactly 0 (not rounding noise divided by eps)."""
    g = scores.view(-1, n).double()
    mean = g.mean(1, keepdim=True)
    if kind == "grpo":
        adv = (g - mean) / (g.std(1, unbiased=False, keepdim=True) + eps)
    elif kind == "rloo":
        if n < 2:
            raise ValueError("group_advantages: rloo needs n >= 2 samples per prompt")
        adv = g - (g.sum(1, keepdim=True) - g) / (n - 1)
    else:
        raise ValueError(f"group_advantages: kind must be grpo or rloo, got {kind!r}")
    same = (g == g[:, :1]).all(1, keepdim=True)
    return adv.masked_fill(same, 0.0).view(-1).to(scores.dtype)


def advantages(kind, scores, kl, values, mask, n, beta, gamma=1.0, lam=0.95, reduce=None):
    """Step 4 of each mode, from the scores (B,) of B/n groups of n consecutive samples, the per-token KL
    estimates, values and mask (B, T):
      gae   per-token rewards (token_rewards), GAE(gamma, lam), advantages whitened over the whole batch
            (reduce: over all ranks); returns = the advantages *before* whitening + values
      rloo  sequence rewards s_i - beta * sum_t kl_t, leave-one-out baseline, the same on every token
      grpo  group-normalised scores on every token; the KL is not in the reward but a loss term (ppo_loss)
    -> (advantages, returns: None outside gae), both 0 off the mask."""
    if kind == "gae":
        adv, returns = gae(token_rewards(scores, kl, mask, beta), values, mask, gamma, lam)
        return masked_whiten(adv, mask, reduce=reduce), returns
    seq = scores - beta * kl.sum(1) if kind == "rloo" else scores
    return group_advantages(seq, n, kind)[:, None] * mask, None


def ppo_loss(lp, old_lp, adv, mask, denom, clip=0.2, loss_norm="token", kl_coef=0.0, ref_lp=None, kl_estimator="k3",
             v=None, old_v=None, returns=None, value_clip=0.2, vf_coef=0.1):
    """One micro-batch's share of a mini-batch's loss, from (B, T) tensors. Per token: the clipped policy
    loss, + kl_coef * kl_estimate(lp, ref_lp) (GRPO's KL term, differentiated through lp), + vf_coef x the
    clipped value loss of v (gae). loss_norm "token": summed over the masked tokens and divided by `denom`,
    the mini-batch's token count over all micro-batches and ranks; "sequence": each sequence's mean over its
    tokens, summed and divided by `denom`, the mini-batch's sequence count.
    -> (loss, (pg, vf, clipped, vclipped) per token, for the metrics)"""
    pg, clipped = policy_loss(lp, old_lp, adv, clip)
    per_tok = pg
    if kl_coef:
        per_tok = per_tok + kl_coef * kl_estimate(lp, ref_lp, kl_estimator)
    vf = vclipped = torch.zeros_like(pg)
    if v is not None:
        vf, vclipped = value_loss(v, old_v, returns, value_clip)
        per_tok = per_tok + vf_coef * vf
    if loss_norm == "token":
        loss = (per_tok * mask).sum() / denom
    else:
        loss = ((per_tok * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / denom
    return loss, (pg, vf, clipped, vclipped)


def explained_variance(values, returns, mask, reduce=None):
    """1 - Var[R - V] / Var[R] over the masked tokens: 1 is a perfect value model, 0 a constant one."""
    _, var_r = masked_var(returns, mask, reduce)
    _, var_e = masked_var(returns - values, mask, reduce)
    return (1 - var_e / var_r).item() if var_r > 0 else float("nan")


# -----------------------------------------------------------------------------
# batches of sampled responses, and the forwards over them


def rollout_batch(prompts, responses, pad_id, device="cpu"):
    """Prompt + response token ids, right-padded (padding after a sequence cannot affect it under causal
    attention, so no mask is needed). -> dict of
      input_ids (B, L), targets (B, L): the response tokens at the positions that predict them, else IGNORE
      idx (B, T): the position predicting response token t (T = longest response), mask (B, T) fp32."""
    B, T = len(prompts), max(len(r) for r in responses)
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    x = torch.full((B, L), pad_id, dtype=torch.long)
    y = torch.full((B, L), IGNORE, dtype=torch.long)
    idx = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        s = len(p) - 1  # the prompt's last token predicts response token 0
        x[b, :len(p) + len(r)] = torch.tensor(p + r)
        y[b, s:s + len(r)] = torch.tensor(r)
        idx[b] = s + torch.arange(T).clamp(max=max(len(r) - 1, 0))
        mask[b, :len(r)] = 1
    return {"input_ids": x.to(device), "targets": y.to(device), "idx": idx.to(device), "mask": mask.to(device)}


def response_logprobs(model, batch, temperature=1.0):
    """log p(response token t) under softmax(logits / temperature), (B, T) fp32, 0 off the mask: the
    quantity model.generate returns for the tokens it sampled."""
    lp = token_logprobs(model, batch["input_ids"], batch["targets"], temperature=temperature)  # (B, L)
    return lp.gather(1, batch["idx"]) * batch["mask"]


class ValueModel(nn.Module):
    """V(prefix): a Llama body (final normed hidden states, no LM head) and a scalar head, HF's
    LlamaForSequenceClassification `score` layer (C -> 1, no bias). From a reward model (Tülu 3 and
    open-instruct start the value model from one) the head is its score layer; from a causal LM it
    starts at 0, so the first values are 0 and the body is not disturbed before the head has learnt a
    direction."""

    def __init__(self, body, score=None):
        super().__init__()
        self.body = body
        w = body.embed_tokens.weight
        self.head = nn.Linear(body.cfg.dim, 1, bias=False, device=w.device, dtype=torch.float32)
        with torch.no_grad():
            if score is None:
                self.head.weight.zero_()
            else:
                self.head.weight.copy_(score)

    @classmethod
    def from_pretrained(cls, path, device, grad_checkpoint=False, compile=False, weights=True):
        """From a causal LM or an HF *ForSequenceClassification reward model with one label. Under
        torchrun rank 0 reads the score layer and broadcasts it (load_model shards the body). weights=False:
        the shapes alone, for a resume to fill (load_model)."""
        body = load_model(path, device, grad_checkpoint=grad_checkpoint, body_only=True, compile=compile,
                          weights=weights)
        score = read_tensor(path, "score.weight") if is_rank0() and weights else None
        if score is not None and score.shape != (1, body.cfg.dim):
            raise ValueError(f"{path}: score.weight has shape {tuple(score.shape)}; a value head needs one "
                             f"label, shape (1, {body.cfg.dim})")
        vm = cls(body, score)
        if is_dist():
            flag = torch.tensor([int(score is not None)], device=device)
            dist.broadcast(flag, 0)
            if flag.item():
                dist.broadcast(vm.head.weight.data, 0)
        return vm

    def forward(self, input_ids, idx):
        """-> V at positions idx (B, T) of each row, fp32: with rollout_batch's idx, the value of the state
        before each response token. (Gathering here also hands FSDP a fresh tensor, not a view.)"""
        h = self.body(input_ids, return_hidden=True)  # (B, L, C)
        return self.head(h)[..., 0].float().gather(1, idx)


# -----------------------------------------------------------------------------
# the script

if __name__ == "__main__":  # the script; importing ppo_rlvr gives the functions above without side effects
    from tqdm import tqdm

    from common import (add_data_args, add_optim_args, all_reduce, build_optimizer, check_data_args, check_out, cleanup,
                        clip_grad_norm, earlier_eval, evaluate, init_distributed, log_metrics, lr_at, make_out,
                        mp_policy, number, positive, print0, read_checkpoint, read_train_state, reshard, resume,
                        save_checkpoint, seed_everything, start_run, write_json)
    from data import DataError, encode_prompt, epoch_order, load_mixture, read_eval_prompts, rlvr_row
    from model import generate, seeded
    from tokenizer import Tokenizer
    from verifiers import verify

    # the docstring's first sentence (two lines long) as the description
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to train
    p.add_argument("--ckpt", default=None,
                   help="policy to start from, also the KL reference (default: out/dpo, else out/sft)")
    p.add_argument("--value-ckpt", default=None, help="the value model's start: a causal LM (its body, a zero "
                   "head) or a reward model, HF *ForSequenceClassification with 1 label (default: --ckpt)")
    p.add_argument("--data", nargs="+", default=None, help="RLVR JSONL files, 'file:fraction' or 'file:count' "
                   "(default: the built-in RL prompts)")
    p.add_argument("--out", default="out/rlvr")
    p.add_argument("--preset", choices=["tiny", "tulu3-8b"], default=None, help="fills the hyperparameters not "
                   "given (default: tiny on the built-in tasks, tulu3-8b on --data)")
    p.add_argument("--advantage", choices=["gae", "grpo", "rloo"], default="gae")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    # rollouts
    p.add_argument("--steps", type=positive, default=None, help="rollout batches (each: epochs x mini-batches updates)")
    p.add_argument("--prompts-per-step", type=positive, default=None, help="prompts per rollout batch, all ranks")
    p.add_argument("--samples-per-prompt", type=positive, default=None, help="n (default 1 for gae, 4 for grpo/rloo)")
    p.add_argument("--max-new-tokens", type=positive, default=None, help="response length limit")
    p.add_argument("--max-prompt-len", type=positive, default=None, help="prompts longer than this are dropped")
    p.add_argument("--temperature", type=number(0, above=True), default=1.0,
                   help="sampling temperature, also used in training")
    p.add_argument("--gen-batch-size", type=positive, default=None, help="sequences (prompt x sample) per generate "
                   "batch, per rank (default: all; not with --per-prompt-seed, which generates per prompt)")
    p.add_argument("--per-prompt-seed", action="store_true", help="sample each prompt's n responses with a "
                   "seed of their own: rollouts independent of the number of ranks (slower)")
    # reward and KL
    p.add_argument("--verify-reward", type=number(), default=None, help="score of a verified response")
    p.add_argument("--no-eos-penalty", type=number(), default=None, help="score of a response without EOS "
                   "(default: off in the tiny preset, -10 in tulu3-8b)")
    p.add_argument("--beta", type=number(0), default=None, help="KL coefficient (initial value if adaptive)")
    p.add_argument("--kl-estimator", choices=["k1", "k2", "k3"], default=None, help="default k1, k3 for grpo "
                   "(in the reward only k1 gives the KL's gradient: see kl_estimate)")
    p.add_argument("--kl-target", type=number(0, above=True), default=None,
                   help="adaptive beta: target KL per sequence")
    p.add_argument("--kl-horizon", type=number(0, above=True), default=None,
                   help="adaptive beta: horizon in episodes (default 10000)")
    # PPO
    p.add_argument("--gamma", type=number(0, 1), default=None)
    p.add_argument("--lam", type=number(0, 1), default=None)
    p.add_argument("--clip", type=number(0, above=True), default=None, help="policy ratio clip range epsilon")
    p.add_argument("--value-clip", type=number(0, above=True), default=None)
    p.add_argument("--vf-coef", type=number(0), default=None)
    p.add_argument("--ppo-epochs", type=positive, default=None)
    p.add_argument("--mini-batches", type=positive, default=None, help="optimizer steps per PPO epoch")
    p.add_argument("--micro-batch-size", type=positive, default=None, help="sequences per forward, per rank")
    p.add_argument("--loss-norm", choices=["token", "sequence"], default="token")
    # optimization
    add_optim_args(p)  # --lr --schedule --warmup-ratio ... --save-every (shared: common.py)
    p.add_argument("--value-lr", type=number(0), default=None, help="default: the preset's (tiny: 3e-4), "
                   "else --lr")
    add_data_args(p, "RLVR JSONL scored for held-out accuracy at the end (default with the built-in prompts: "
                  "the built-in held-out set)")  # --skip-bad --eval-prompts --eval-n --eval-max-new-tokens ...
    args = p.parse_args()
    check_data_args(args)

    # presets fill whatever was not given on the command line
    PRESETS = {
        # the tiny default: continues the tiny SFT/DPO model, a few minutes on 2 CPU cores
        "tiny": dict(steps=60, max_new_tokens=64, max_prompt_len=256, verify_reward=10.0,
                     beta=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, clip=0.2, value_clip=0.2, vf_coef=0.1,
                     ppo_epochs=4, mini_batches=1, micro_batch_size=64, lr=3e-5, value_lr=3e-4, schedule="constant",
                     warmup_ratio=0.0, save_dtype="fp32", grad_checkpoint=False, eval_batch_size=256,
                     eval_max_new_tokens=64, save_every=0),
        # Tülu 3 8B RLVR (open-instruct docs/tulu3.md and ppo_vllm_thread_ray_gtrl.py defaults): beta 0.05
        # k1, lr 3e-7 linear no warmup, gamma 1, lambda 0.95, clip 0.2, value clip 0.2, vf_coef 0.1,
        # 4 epochs x 1 mini-batch of 224 rollouts (1 sample/prompt), response 2048, reward 10, no-EOS -10;
        # gradient checkpointing on, as Tülu 3's RLVR runs: a micro-batch of 2 x (prompt + response) <= 8192 tokens
        # goes through the policy and the value model in one graph, ~6 MiB/token of saved activations each at 8B
        # without it (196 KiB per token per block, measured): ~100 GB over the 35 GB of sharded states on an 80 GB GPU;
        # a checkpoint every 100 steps, as Tülu 3's RLVR run saved
        "tulu3-8b": dict(steps=10_000_000 // 224, prompts_per_step=224, max_new_tokens=2048, max_prompt_len=2048,
                         verify_reward=10.0, no_eos_penalty=-10.0, beta=0.05, kl_estimator="k1", gamma=1.0,
                         lam=0.95, clip=0.2, value_clip=0.2, vf_coef=0.1, ppo_epochs=4, mini_batches=1,
                         micro_batch_size=2, lr=3e-7, schedule="linear", warmup_ratio=0.0, save_dtype="bf16",
                         grad_checkpoint=True, eval_batch_size=64, eval_max_new_tokens=512, save_every=100),
    }
    # the built-in tasks train a 0.85M-parameter model; data of one's own is for a real checkpoint, whose
    # tiny-model hyperparameters (lr 3e-5, value lr 3e-4, fp32 saves) would wreck it
    args.preset = args.preset or ("tiny" if args.data is None else "tulu3-8b")
    group = args.advantage in ("grpo", "rloo")
    unused = [k for k in ("value_ckpt", "value_lr", "vf_coef", "value_clip", "gamma", "lam")
              if getattr(args, k) is not None]
    if group and unused:  # said, not silently ignored: an ablation that sets them would otherwise mean nothing
        raise SystemExit(f"error: --advantage {args.advantage} has no value model and no GAE: "
                         f"--{unused[0].replace('_', '-')} has no effect")
    if args.kl_horizon is not None and args.kl_target is None:
        raise SystemExit("error: --kl-horizon is the adaptive controller's: it has no effect without --kl-target")
    if args.gen_batch_size is not None and args.per_prompt_seed:
        raise SystemExit("error: --per-prompt-seed generates prompt by prompt: --gen-batch-size has no effect")
    kl_estimator_given = args.kl_estimator is not None
    if args.samples_per_prompt is None:
        args.samples_per_prompt = 4 if group else 1
    if args.preset == "tiny" and args.prompts_per_step is None:
        args.prompts_per_step = max(1, 32 // args.samples_per_prompt)  # 32 rollouts per step in every mode
    if args.kl_estimator is None and args.advantage == "grpo":
        args.kl_estimator = "k3"  # GRPO's KL loss term: k3 has a non-negative value and an unbiased mean
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.value_lr = args.value_lr if args.value_lr is not None else args.lr
    args.kl_horizon = args.kl_horizon if args.kl_horizon is not None else 10000.0
    if kl_estimator_given and not args.beta > 0:
        raise SystemExit(f"error: --beta {args.beta:g} has no KL penalty (and no reference model): "
                         "--kl-estimator has no effect")

    # -------------------------------------------------------------------------
    # setup

    check_out(args.out)
    rank, world, device = init_distributed()
    seed_everything(args.seed + rank)

    n, P = args.samples_per_prompt, args.prompts_per_step
    if args.kl_target is not None and not args.beta > 0:
        raise SystemExit("error: --kl-target adapts beta multiplicatively: it needs a starting --beta > 0")
    if args.advantage == "grpo" and args.kl_estimator == "k1" and args.beta > 0:
        raise SystemExit("error: --advantage grpo puts the KL in the loss, where k1 = logp - ref_logp has zero "
                         "expected gradient; use --kl-estimator k3 (GRPO's) or k2")
    if group and n < 2:
        raise SystemExit(f"error: --advantage {args.advantage} compares samples of a prompt: "
                         f"--samples-per-prompt must be >= 2, got {n}")
    if P % world:
        raise SystemExit(f"error: --prompts-per-step {P} must be a multiple of the world size {world}")
    B = P // world * n  # rollouts per rank per step
    if B % args.mini_batches:
        raise SystemExit(f"error: {B} rollouts per rank (prompts-per-step / world x samples) do not split "
                         f"into --mini-batches {args.mini_batches}")
    if args.ckpt is None:  # the tiny default's latest stage
        args.ckpt = next((d for d in ("out/dpo", "out/sft") if os.path.isfile(os.path.join(d, "config.json"))), None)
        if args.ckpt is None:
            raise SystemExit("error: no --ckpt given and neither out/dpo/ nor out/sft/ exists: run python sft.py first")
    tok = read_checkpoint(Tokenizer.from_pretrained, args.ckpt)
    # prompts are tokenized once, ending with the assistant header; generation goes on from there
    with_prompt = lambda r: (r, encode_prompt(tok, r["messages"]))  # noqa: E731
    try:
        held_out = None
        if args.data is None:
            from tasks import make_tasks
            _, _, rows, held_out = make_tasks(seed=args.seed)
            rows, n_bad = list(map(with_prompt, rows)), 0
        else:
            rows, n_bad = load_mixture(args.data, rlvr_row, seed=args.seed, skip_bad=args.skip_bad, encode=with_prompt)
        rows, prompts = [r for r, _ in rows], [q for _, q in rows]
        if args.eval_prompts:
            held_out = read_eval_prompts(args.eval_prompts)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    if held_out is not None and args.eval_n is not None:
        held_out = held_out[:args.eval_n] or None
    keep = [i for i, q in enumerate(prompts) if len(q) <= args.max_prompt_len]
    n_long = len(rows) - len(keep)
    rows, prompts = [rows[i] for i in keep], [prompts[i] for i in keep]
    steps_per_epoch = len(rows) // P
    if steps_per_epoch == 0:
        why = [f"{n_bad} bad rows skipped"] * bool(n_bad) + \
            [f"{n_long} more are over --max-prompt-len {args.max_prompt_len}"] * bool(n_long)
        why = f" ({', '.join(why)})" if why else ""
        raise SystemExit(f"error: {len(rows)} prompts{why} is fewer than one batch of --prompts-per-step {P}")

    # the reference is the frozen starting policy, resident and sharded like the policy (1/world of the
    # parameters per rank under FSDP; precomputing its log-probs is impossible: the samples are new
    # every step). Not needed at all when the KL term is off. It is --ckpt as it is now: not --out, and for
    # a resumed run the checkpoint it started from.
    need_ref = args.beta > 0 or args.kl_target is not None
    resumed, start_fp = start_run(args.out, args.resume, "rlvr", ref=args.ckpt if need_ref else None)
    # a resume fills the policy and the value model from train_state/ (resume()), not from safetensors first
    policy = load_model(resumed or args.ckpt, device, grad_checkpoint=args.grad_checkpoint, compile=args.compile,
                        weights=not resumed)
    policy.train()
    ref = load_model(args.ckpt, device, requires_grad=False, compile=args.compile).eval() if need_ref else None
    vm = None
    if args.advantage == "gae":
        vm = read_checkpoint(ValueModel.from_pretrained, args.value_ckpt or args.ckpt, device=device,
                             grad_checkpoint=args.grad_checkpoint, compile=args.compile, weights=not resumed)
        if is_dist():  # the head joins the FSDP2 mesh too (the body's blocks were sharded by load_model)
            from torch.distributed.fsdp import fully_shard
            fully_shard(vm, mp_policy=mp_policy(device))
        vm.train()
    save_dtype = torch.bfloat16 if args.save_dtype == "bf16" else torch.float32
    popt = build_optimizer(policy, args.lr, args.weight_decay)
    vopt = build_optimizer(vm, args.value_lr, args.weight_decay) if vm is not None else None

    value = {} if vm is None else {"value": (vm, vopt)}  # saved and resumed beside the policy

    def save(step):
        """The policy's checkpoint, with beta and the value model and its optimizer (collective)."""
        save_checkpoint(args.out, policy, tok, popt, {"step": step, "beta": beta, "args": vars(args),
                                                      "start": start_fp, "stage": "rlvr"}, save_dtype, value)

    if resumed and vm is not None and "value" not in read_train_state(resumed).get("sharded", ()):
        raise SystemExit(f"error: {resumed} was saved without a value model (by --advantage grpo or rloo); "
                         f"resume it with the same --advantage")
    st = resume(resumed, args.out, policy, popt, args, args.steps, value)
    # an adaptive beta goes on from where it was (--beta is its start); a fixed one is the flag's
    start = st["step"]
    beta = st.get("beta", args.beta) if args.kl_target is not None else args.beta
    del st

    n_params = sum(q.numel() for q in policy.parameters())
    print0(f"prompts: {len(rows)} ({n_bad} bad rows skipped, {n_long} over --max-prompt-len {args.max_prompt_len}) | "
           f"policy {args.ckpt}, {n_params / 1e6:.2f}M parameters | --advantage {args.advantage}")
    print0(f"{args.steps} steps x {P} prompts x {n} samples, {args.ppo_epochs} epochs x {args.mini_batches} "
           f"mini-batches | beta {beta} {args.kl_estimator}{' adaptive' if args.kl_target else ''} | "
           f"world {world} | device {device}")
    value_lr = f" (value {args.value_lr})" if vm is not None else ""
    every = f" every {args.save_every} steps" if args.save_every else " at the end"
    print0(f"preset {args.preset}: lr {args.lr} {args.schedule}{value_lr}, saved in {args.save_dtype}{every}")
    if args.kl_target is not None:  # Ziegler's horizon is in episodes: a short run barely moves beta
        # in logs: the power itself overflows a float, e.g. (1 + 0.2 x 896 / 10000) ** 44642 (tulu3-8b preset, grpo)
        log_most = args.steps * math.log1p(0.2 * P * n / args.kl_horizon)
        most = f"x{math.exp(log_most):.3g} or x{math.exp(-log_most):.3g}" if log_most < 700 else \
            f"x e^{log_most:.0f} or x e^-{log_most:.0f}"
        print0(f"adaptive beta: at most {most} over this run's {args.steps} steps of {P * n} "
               f"episodes (--kl-horizon {args.kl_horizon:g})")
    if args.advantage != "grpo" and args.kl_estimator != "k1" and args.beta > 0:
        print0(f"note: {args.kl_estimator} in the reward is a biased estimate of the KL's gradient (k3's is that of "
               "KL(pi||ref) - KL(ref||pi)); k1 in the reward is unbiased (see kl_estimate)")

    # the starting point's held-out accuracy, same prompts and decoding as the final evaluation: from
    # its eval.json when that scored these very prompts so, else evaluated now (kept in out/ for a resume)
    start_eval = None
    if held_out is not None:
        spath, opath = os.path.join(args.ckpt, "eval.json"), os.path.join(args.out, "start_eval.json")
        for path in ((opath,) if resumed else ()) + (spath,):
            start_eval, src = earlier_eval(path, held_out, args.eval_max_new_tokens), path
            if start_eval is not None:
                break
        if start_eval is None:
            m0 = policy
            if resumed:  # the policy is no longer the start: the start checkpoint is (the KL reference is it)
                m0 = ref if ref is not None else load_model(args.ckpt, device, requires_grad=False)
            start_eval = evaluate(m0, tok, held_out, args.eval_max_new_tokens, args.eval_batch_size)
            del m0
            src = "evaluated now"
        make_out(args.out)
        write_json(opath, start_eval)
        print0(f"start: held-out accuracy {start_eval['accuracy']:.3f} on {start_eval['n']} prompts ({src})")

    # -------------------------------------------------------------------------
    # training loop

    eos_ids = set(tok.eos_token_ids)
    mB = args.micro_batch_size
    red = all_reduce if is_dist() else None  # sums over ranks for the whole-batch statistics
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0,
               desc=f"rlvr-{args.advantage}")
    for step in bar:
        t0 = time.time()
        lr = lr_at(step, args.steps, args.lr, int(args.warmup_ratio * args.steps), args.schedule)
        for g in popt.param_groups:
            g["lr"] = lr
        if vopt is not None:
            for g in vopt.param_groups:
                g["lr"] = lr_at(step, args.steps, args.value_lr, int(args.warmup_ratio * args.steps), args.schedule)

        # 1. rollouts: this rank's prompts (rank-strided), each n times, consecutive
        order = epoch_order(len(rows), step // steps_per_epoch, args.seed)
        j0 = (step % steps_per_epoch) * P
        mine = order[j0:j0 + P][rank::world]
        tg = time.time()
        if args.per_prompt_seed:
            resp, glp = [], []
            for k in mine:
                t, lp = generate(policy, [prompts[k]] * n, args.max_new_tokens, temperature=args.temperature,
                                 eos_token_ids=tok.eos_token_ids, seed=seeded("prompt", args.seed, step, k))
                resp, glp = resp + t, glp + lp
        else:
            resp, glp = generate(policy, [prompts[k] for k in mine for _ in range(n)], args.max_new_tokens,
                                 temperature=args.temperature, eos_token_ids=tok.eos_token_ids,
                                 seed=seeded("rollout", args.seed, step, rank), batch_size=args.gen_batch_size)
        t_gen = time.time() - tg
        ridx = [k for k in mine for _ in range(n)]

        # 2. scores from the verifiers, on the decoded text (the token ids themselves are kept)
        verified = [verify(rows[k]["dataset"], tok.decode(r, skip_special_tokens=True), rows[k]["ground_truth"])
                    for k, r in zip(ridx, resp)]
        has_eos = [len(r) > 0 and r[-1] in eos_ids for r in resp]
        scores = sequence_scores(verified, has_eos, args.verify_reward, args.no_eos_penalty).to(device)

        # 3. log-probs under the policy and the reference, and values, without gradients; (B, T) each
        def micro(J):
            return rollout_batch([prompts[ridx[j]] for j in J], [resp[j] for j in J], tok.pad_id, device)
        T = max(len(r) for r in resp)
        old_lp, ref_lp, values = (torch.zeros(B, T, device=device) for _ in range(3))
        mask = torch.zeros(B, T, device=device)
        # every micro-batch goes to the device before the first forward (here and in each mini-batch below): on a GPU a
        # blocking host-to-device copy between two forwards waits for the first, and the GPU idles while Python
        # launches the second
        rollouts = [(j, micro(range(j, min(j + mB, B)))) for j in range(0, B, mB)]
        with torch.no_grad():
            for j, b in rollouts:
                w = b["mask"].shape[1]
                mask[j:j + mB, :w] = b["mask"]
                old_lp[j:j + mB, :w] = response_logprobs(policy, b, args.temperature)
                if ref is not None:
                    ref_lp[j:j + mB, :w] = response_logprobs(ref, b, args.temperature)
                if vm is not None:
                    values[j:j + mB, :w] = vm(b["input_ids"], b["idx"]) * b["mask"]
        if ref is not None:
            reshard(ref)  # it never runs a backward: its gathered root would stay so until the end
        gen_lp = torch.zeros(B, T)
        for i, lp in enumerate(glp):
            gen_lp[i, :len(lp)] = torch.tensor(lp)
        gen_lp = gen_lp.to(device)  # one copy, not a blocking one per row
        gap = (gen_lp - old_lp).abs() * mask

        # 4. advantages
        kl = kl_estimate(old_lp, ref_lp, args.kl_estimator) * mask if ref is not None else torch.zeros_like(mask)
        adv, returns = advantages(args.advantage, scores, kl, values, mask, n, beta, args.gamma, args.lam, red)
        kl_coef = beta if args.advantage == "grpo" and ref is not None else 0.0  # GRPO: KL as a loss term

        # 5. PPO epochs over mini-batches; each rank shuffles its own rollouts, a global mini-batch is
        # the union of the ranks' mini-batches
        # summed over the tokens of every update: pg loss, value loss, clipped, value clipped, approx-KL
        # of the updated policy to the rollout policy (0.5 (logp - old)^2, over all epochs), tokens
        sums = torch.zeros(6, dtype=torch.float64, device=device)
        gnorms = []
        Bm = B // args.mini_batches
        for epoch in range(args.ppo_epochs):
            g = torch.Generator().manual_seed(seeded("shuffle", args.seed, step, epoch, rank))
            perm = torch.randperm(B, generator=g).tolist()
            for mb in range(args.mini_batches):
                rows_mb = perm[mb * Bm:(mb + 1) * Bm]
                # Token-level normalisation: the mini-batch's summed per-token loss is divided by its
                # token count over all micro-batches and ranks, so that every token weighs the same
                # whatever the response length and however the batch is split (a mean per micro-batch
                # or per sequence would weigh a token of a short response more, and would change with
                # the split: the accumulation bias open-instruct fixed in PR #1137). --loss-norm
                # sequence is the original PPO/GRPO per-sequence mean, then mean over sequences.
                if args.loss_norm == "token":
                    denom = all_reduce(mask[rows_mb].sum().item())
                else:
                    denom = all_reduce(float(len(rows_mb)))
                # (J as a device tensor: indexing a CUDA tensor with a Python list copies the list over, blocking)
                mbs = [(torch.tensor(rows_mb[j:j + mB], device=device), micro(rows_mb[j:j + mB]))
                       for j in range(0, Bm, mB)]
                for J, b in mbs:
                    w = b["mask"].shape[1]
                    m = b["mask"]
                    lp = response_logprobs(policy, b, args.temperature)
                    o = old_lp[J, :w]
                    v = vm(b["input_ids"], b["idx"]) * m if vm is not None else None
                    loss, (pg, vf, clipped, vclipped) = ppo_loss(
                        lp, o, adv[J, :w], m, denom, args.clip, args.loss_norm, kl_coef, ref_lp[J, :w],
                        args.kl_estimator, v, values[J, :w], returns[J, :w] if vm is not None else None,
                        args.value_clip, args.vf_coef)
                    (loss * world).backward()  # FSDP averages gradients over ranks; * world makes it the sum
                    with torch.no_grad():
                        d = (lp - o) * m
                        sums += torch.stack([(pg * m).sum(), (vf * m).sum(), (clipped * m).sum(),
                                                 (vclipped * m).sum(), (0.5 * d * d).sum(), m.sum()]).double()
                gnorms.append(clip_grad_norm(policy, args.grad_clip))
                popt.step()
                popt.zero_grad(set_to_none=True)
                if vm is not None:
                    torch.nn.utils.clip_grad_norm_(vm.parameters(), args.grad_clip)
                    vopt.step()
                    vopt.zero_grad(set_to_none=True)

        # 6. metrics over all ranks, and the KL controller
        tot = lambda x: all_reduce(float(x))  # noqa: E731
        N = tot(B)
        kl_seq = tot(kl.sum().item()) / N
        sums = all_reduce(sums)
        nt = max(sums[5].item(), 1.0)
        n_tok = tot(mask.sum().item())
        row = {"step": step, "lr": lr, "beta": beta,
               "reward": tot(scores.sum().item()) / N, "accuracy": tot(sum(verified)) / N,
               "entropy": tot(-(gen_lp * mask).sum().item()) / n_tok,
               "pg_loss": sums[0].item() / nt, "clipfrac": sums[2].item() / nt, "approx_kl": sums[4].item() / nt,
               "resp_len": n_tok / N, "no_eos": 1 - tot(sum(has_eos)) / N,
               "logp_gap_mean": tot(gap.sum().item()) / n_tok, "logp_gap_max": all_reduce(gap.max().item(), op="max"),
               "grad_norm": sum(gnorms) / len(gnorms),
               "gen_tok_per_s": tot(sum(map(len, resp))) / all_reduce(t_gen, op="max")}
        if ref is not None:  # (without a reference, beta 0, the KL is not measured: approx_kl still is)
            row["kl"] = kl_seq
        if vm is not None:
            row.update(value_loss=sums[1].item() / nt, vf_clipfrac=sums[3].item() / nt,
                       explained_var=explained_variance(values, returns, mask, red))
        beta = adaptive_kl(beta, kl_seq, N, args.kl_target, args.kl_horizon)
        row.update(time=time.time() - t0, gen_time=t_gen)
        log_metrics(args.out, row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.3f}", kl=f"{row.get('kl', 0):.3f}",
                        beta=f"{row['beta']:.3g}", len=f"{row['resp_len']:.0f}")
        if not all(math.isfinite(v) for k, v in row.items() if k not in ("explained_var",)):
            raise SystemExit(f"error: non-finite metric at step {step}: {row}; stopping. The last good "
                             f"checkpoint (if any) is untouched in {args.out}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save(step + 1)

    save(args.steps)
    write_json(os.path.join(args.out, "args.json"), vars(args))
    if held_out is not None:
        res = evaluate(policy, tok, held_out, args.eval_max_new_tokens, args.eval_batch_size)
        res["start"] = start_eval
        write_json(os.path.join(args.out, "eval.json"), res)
        print0(f"held-out accuracy {res['accuracy']:.3f} (start {start_eval['accuracy']:.3f}) on {res['n']} prompts: "
               + ", ".join(f"{k} {v['accuracy']:.3f} (start {start_eval['per_task'][k]['accuracy']:.3f})"
                           for k, v in res["per_task"].items()))
    print0(f"saved {args.out}")
    cleanup()
