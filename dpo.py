"""
Preference tuning, the second stage of Tülu 3 (paper §5): DPO and its variants on (chosen, rejected) pairs.

    python dpo.py                                   # tiny default on the CPU: continues from out/sft/, samples
                                                    # on-policy pairs judged by the verifiers, writes out/dpo/
    python dpo.py --ckpt path/to/sft --data prefs.jsonl --preset tulu3-8b
    torchrun --standalone --nproc_per_node 8 dpo.py --ckpt ... --data ... --preset tulu3-8b

What it does:
1. One flag picks the loss (--loss-type, see preference_loss): dpo (+ --label-smoothing: conservative
   DPO), dpo_norm (Tülu 3: DPO on per-token average log-probs, beta 5), simpo (reference-free), ipo (on
   per-token averages, as TRL), wpo. Each has its own default beta (DEFAULT_BETA).
2. A response's log-prob is the sum over its tokens (the last assistant turn only, as TRL; open-instruct
   counts every assistant turn, which cancels in dpo's difference but not in dpo_norm's averages) of log p(token),
   from the final hidden states through the fused log-prob op (kernels/), never a full fp32 [B, T, V]
   log-softmax. Chosen and rejected run through the model in one concatenated forward.
3. The reference is the starting checkpoint. Its log-probs are computed once, before training, and cached
   beside the output (out/dpo.ref-<hash>.pt, keyed by checkpoint + data + max length): no reference model
   is resident while training. SimPO needs none.
4. The loss of an optimizer step is the sum of its per-pair losses divided by its number of pairs, across
   micro-batches and ranks, so accumulation and world size do not change the gradient.
5. Without --data the pairs are on-policy, as in Tülu 3: several answers sampled per built-in prompt from
   the starting model, judged by verifiers.verify, a verified-correct one (chosen) paired with a wrong one
   (rejected). The run ends with the held-out accuracy next to the starting (SFT) model's.
Plumbing as in sft.py: AdamW + schedule, FSDP2 under torchrun, atomic checkpoints, --resume, metrics.jsonl.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (IGNORE, add_data_args, add_optim_args, all_gather_object, all_reduce, build_optimizer,
                    check_data_args, check_out, cleanup, clip_grad_norm, earlier_eval, evaluate, init_distributed,
                    is_dist, load_model, log_metrics, lr_at, make_out, number, plan_steps, positive, print0,
                    read_checkpoint, reshard, resume, save_checkpoint, seed_everything, start_run, token_logprobs,
                    write_json)
from data import DataError, compact, encode_prompt, epoch_order, load_mixture, pad_batch, pref_row, read_eval_prompts
from tokenizer import Tokenizer, tokenize_conversation

LOSS_TYPES = ("dpo", "dpo_norm", "simpo", "ipo", "wpo")
# beta when --beta is not given: 0.1 for the summed-log-prob losses dpo and wpo (TRL's and open-instruct's
# default), 5 for dpo_norm (Tülu 3), 2 for simpo (the SimPO paper's range is 2-2.5 for its base models), 0.1 for
# ipo (TRL's tau: a target margin 1/(2 tau) = 5 between the per-token average log-ratios). One beta for all would
# be wrong by 50x somewhere: a per-token average moves ~length times less than a sum.
DEFAULT_BETA = {"dpo": 0.1, "dpo_norm": 5.0, "simpo": 2.0, "ipo": 0.1, "wpo": 0.1}


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    chosen_lengths, rejected_lengths, loss_type, beta, gamma_beta_ratio=0.3, label_smoothing=0.0,
                    chosen_lsq=None, rejected_lsq=None):
    """Per-pair preference losses. All inputs are (P,) for P pairs: log-probs *summed* over each
    response's tokens, lengths = the responses' token counts (the ref log-probs may be None for simpo);
    for wpo also chosen_lsq / rejected_lsq, each token's log sum_v pi(v)^2 summed over the response.
    Returns (losses, chosen_rewards, rejected_rewards), each (P,); the rewards are detached and are the
    implicit rewards of the loss: beta * (log pi - log pi_ref) (per-token averages for dpo_norm and ipo),
    beta * average log pi for simpo. A pair is "correct" when chosen_rewards > rejected_rewards."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"preference_loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("preference_loss: label smoothing is defined for the sigmoid losses, not ipo")
    pc, pr = policy_chosen_logps, policy_rejected_logps
    # per-token averages; an empty response (0 tokens, log-prob 0) averages to 0 instead of 0/0 = NaN
    # (open-instruct #1685 fixed the same NaN)
    nc = chosen_lengths.clamp(min=1).to(pc.dtype)
    nr = rejected_lengths.clamp(min=1).to(pr.dtype)
    if loss_type in ("dpo_norm", "simpo", "ipo"):
        pc, pr = pc / nc, pr / nr
    if loss_type == "simpo":
        rc = rr = torch.zeros_like(pc)  # reference-free
    else:
        rc, rr = ref_chosen_logps.to(pc.dtype), ref_rejected_logps.to(pr.dtype)
        if loss_type in ("dpo_norm", "ipo"):
            rc, rr = rc / nc, rr / nr
    # h = log pi(y_c)/pi_ref(y_c) - log pi(y_r)/pi_ref(y_r): how much more the policy moved toward chosen
    h = (pc - rc) - (pr - rr)  # (P,)
    if loss_type == "ipo":
        # IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
        # Preferences" (arXiv 2310.12036), eq. 17: (h - 1/(2 tau))^2 with tau = beta, on per-token
        # average log-probs as TRL computes it (its PR #1265, confirmed by the authors): with sums, the
        # fixed target 1/(2 tau) would mean a different regularisation for every response length
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        # DPO, Rafailov et al. 2023, "Direct Preference Optimization" (arXiv 2305.18290), eq. 7:
        # -log sigmoid(beta h). Label smoothing eps = conservative DPO (Mitchell 2023, "A note on DPO
        # with noisy preferences"): the label is flipped with probability eps, so the loss is the
        # expected BCE under both labels.
        # dpo_norm: Tülu 3 (Lambert et al. 2024, arXiv 2411.15124, §5) on per-token average log-probs.
        # SimPO, Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
        # (arXiv 2405.14734): -log sigmoid(beta (avg pi_c - avg pi_r) - gamma), no reference, with the
        # target margin gamma = gamma_beta_ratio * beta.
        if loss_type == "simpo":
            h = h - gamma_beta_ratio
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
        if loss_type == "wpo":
            # WPO, Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization"
            # (arXiv 2406.11827): each pair weighted by the policy's length-normalised probability of
            # both responses, with the paper's weight alignment (eq. 2): each token's probability is
            # divided by sum_v pi(v)^2, the probability the policy gives its own samples on average, so an
            # on-policy pair weighs ~1. w = min(1, exp(avg (log pi - lsq)_c + avg (log pi - lsq)_r)), no
            # gradient. (open-instruct leaves out the alignment; TRL's use_weighting has it.) Both take pi at
            # temperature 1: pairs sampled at another --sample-temperature do not weigh ~1 on average.
            if chosen_lsq is None or rejected_lsq is None:
                raise ValueError("preference_loss: wpo needs chosen_lsq and rejected_lsq (its weight alignment)")
            w = torch.exp((policy_chosen_logps - chosen_lsq) / nc + (policy_rejected_logps - rejected_lsq) / nr)
            w = w.clamp(max=1).detach()
            losses = losses * w
    return losses, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def pick_pair(samples):
    """samples: [(score, text, finished)] for one prompt -> (chosen, rejected) texts or None.
    Chosen: the first verified-correct sample (score 1) that ended with EOS (a cut-off answer is not
    shown as the example to follow); rejected: the first sample that is not fully correct, preferring one
    that ended with EOS too, so that "rejected" does not simply mean "cut off at --max-new-tokens". A cut-off
    one taken all the same is stored as text, like every response of the preference format, and trained as a
    whole turn: with the EOS it never sampled."""
    good = [t for s, t, done in samples if s >= 1.0 and done]
    bad = sorted((not done, i, t) for i, (s, t, done) in enumerate(samples) if s < 1.0)  # finished ones first
    return (good[0], bad[0][2]) if good and bad else None


def encode_response(tok, msgs, max_len):
    """-> (ids, labels) of a conversation whose targets are the tokens of its *last* assistant turn only
    (earlier assistant turns are prompt), right-truncated to max_len; None when no target is left."""
    ids, mask = tokenize_conversation(tok, msgs)
    if not any(mask):
        return None
    # every assistant turn begins with an untrained header, so the last turn is the final run of True
    end = max(i for i, m in enumerate(mask) if m) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    labels = [IGNORE] * start + ids[start:end] + [IGNORE] * (len(ids) - end)
    ids, labels = ids[:max_len], labels[:max_len]
    if all(y == IGNORE for y in labels[1:]):  # the first token is never a target
        return None
    return ids, labels


def reference_key(start_fp, max_len, device_type, pairs):
    """The key of the cached reference log-probs: the checkpoint's weights (a retrained checkpoint misses), the
    exact token ids and targets of every pair (data, tokenizer, template, max length), max length, and the device
    type (bf16 compute on CUDA, fp32 on the CPU)."""
    h = hashlib.sha256(f"{start_fp}|{max_len}|{device_type}".encode())
    for c, r in pairs:
        for ids, labels in (c, r):  # (int32 arrays or lists; -1 and -2 mark the ends)
            h.update(np.concatenate([ids, [-1], labels, [-2]]).astype(np.int64).tobytes())
    return h.hexdigest()[:16]


if __name__ == "__main__":  # the script; importing dpo gives the functions above without side effects
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to train
    p.add_argument("--ckpt", default=None, help="HF checkpoint to start from, also the reference (required with "
                   "--data; default without: out/sft)")
    p.add_argument("--data", nargs="+", default=None, help="preference JSONL files, 'file:fraction' or 'file:count' "
                   "(default: on-policy pairs on the built-in prompts)")
    p.add_argument("--out", default="out/dpo")
    p.add_argument("--preset", choices=["tiny", "tulu3-8b"], default=None, help="fills the hyperparameters not "
                   "given (default: tiny on the built-in tasks, tulu3-8b on --data)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    # the loss
    p.add_argument("--loss-type", choices=LOSS_TYPES, default=None)
    p.add_argument("--beta", type=number(0, above=True), default=None, help="default per loss: 0.1 dpo/ipo/wpo, "
                   "5 dpo_norm, 2 simpo (ipo's is tau: a target margin 1/(2 beta) between per-token averages)")
    p.add_argument("--gamma-beta-ratio", type=number(0), default=None, help="simpo's target margin gamma / beta "
                   "(default 0.3)")
    p.add_argument("--label-smoothing", type=number(0, 0.5), default=0.0, help="conservative DPO's label noise eps")
    # data
    p.add_argument("--max-len", type=positive, default=None, help="tokens per sequence (prompt + response), truncated")
    add_data_args(p)  # --skip-bad --eval-prompts --eval-n --eval-max-new-tokens --eval-batch-size
    # on-policy pairs (without --data; refused with it)
    # 300 of the 1000 built-in preference prompts: one modest offline round, as Tülu 3's DPO is one epoch
    # on a fixed set; RLVR, which keeps sampling, then has room to add to it
    SAMPLING = dict(n_prompts=300, samples_per_prompt=4, sample_temperature=1.0, max_new_tokens=64)
    p.add_argument("--n-prompts", type=positive, default=None, help="built-in preference prompts to sample from "
                   "(default 300)")
    p.add_argument("--samples-per-prompt", type=positive, default=None, help="default 4")
    p.add_argument("--sample-temperature", type=number(0, above=True), default=None, help="default 1.0")
    p.add_argument("--max-new-tokens", type=positive, default=None, help="tokens per sample (default 64)")
    # optimization
    p.add_argument("--epochs", type=number(0, above=True), default=None)
    p.add_argument("--max-steps", type=positive, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=positive, default=None, help="pairs per optimizer step, all ranks")
    p.add_argument("--micro-batch-size", type=positive, default=None, help="pairs per forward (x2 sequences), per rank")
    add_optim_args(p)  # --lr --schedule --warmup-ratio ... --save-every (shared: common.py)
    args = p.parse_args()
    check_data_args(args)

    # presets fill whatever was not given on the command line
    PRESETS = {
        # the tiny default: on-policy pairs from the tiny SFT model, about half a minute on 2 CPU cores
        "tiny": dict(loss_type="dpo_norm", epochs=2, batch_size=32, micro_batch_size=32, lr=1e-4,
                     schedule="linear", warmup_ratio=0.1, max_len=256, save_dtype="fp32", grad_checkpoint=False,
                     eval_batch_size=256, eval_max_new_tokens=64, save_every=0),
        # Tülu 3 8B DPO (open-instruct docs/tulu3.md): dpo_norm, beta 5, lr 5e-7 linear, warmup 0.1, wd 0,
        # 1 epoch, max length 2048, effective batch 128
        "tulu3-8b": dict(loss_type="dpo_norm", epochs=1, batch_size=128, micro_batch_size=1, lr=5e-7,
                         schedule="linear", warmup_ratio=0.1, max_len=2048, save_dtype="bf16", grad_checkpoint=False,
                         eval_batch_size=64, eval_max_new_tokens=512, save_every=0),
    }
    # the built-in tasks train a 0.85M-parameter model; data of one's own is for a real checkpoint, whose
    # tiny-model hyperparameters (lr 1e-4..3e-3, fp32 saves) would wreck it
    args.preset = args.preset or ("tiny" if args.data is None else "tulu3-8b")
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.beta = DEFAULT_BETA[args.loss_type] if args.beta is None else args.beta  # (dpo_norm's is Tülu 3's 5)
    given = [k for k in SAMPLING if getattr(args, k) is not None]
    if args.data is not None and given:  # said, not silently ignored
        raise SystemExit(f"error: --{given[0].replace('_', '-')} sets the sampling of on-policy pairs from the "
                         "built-in prompts; it has no effect with --data")
    for k, v in SAMPLING.items() if args.data is None else ():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.loss_type == "ipo" and args.label_smoothing:
        raise SystemExit("error: --label-smoothing is defined for the sigmoid losses, not ipo")
    if args.gamma_beta_ratio is not None and args.loss_type != "simpo":
        raise SystemExit(f"error: --gamma-beta-ratio is simpo's target margin; it has no effect on {args.loss_type}")
    args.gamma_beta_ratio = 0.3 if args.gamma_beta_ratio is None else args.gamma_beta_ratio
    check_out(args.out)
    if args.data is not None and args.ckpt is None:
        raise SystemExit("error: --data needs --ckpt (the SFT checkpoint to start from)")
    builtin = args.data is None
    args.ckpt = args.ckpt or "out/sft"
    if not os.path.isfile(os.path.join(args.ckpt, "config.json")):
        hint = " (run `python sft.py` first)" if builtin else ""
        raise SystemExit(f"error: {args.ckpt} is not a checkpoint{hint}")

    # -----------------------------------------------------------------------------
    # setup: the starting checkpoint is loaded first; it samples the on-policy pairs, gives the
    # reference log-probs and the baseline accuracy, and (unless resuming) is the policy we train

    rank, world, device = init_distributed()
    seed_everything(args.seed + rank)

    # the reference is --ckpt as it is now: not --out, and for a resumed run the checkpoint it started from
    resumed, start_fp = start_run(args.out, args.resume, "dpo", ref=args.ckpt if args.loss_type != "simpo" else None)
    tok = read_checkpoint(Tokenizer.from_pretrained, args.ckpt)
    model = load_model(args.ckpt, device, grad_checkpoint=args.grad_checkpoint, compile=args.compile)
    pairs_file = os.path.join(args.out, "pairs.jsonl")

    def on_policy_pairs(rows):
        """Samples K answers per prompt (rank-strided), judges them, and writes the pairs to pairs.jsonl
        in the preference format (rank 0); -> counts. Collective: generate runs in lockstep."""
        from model import generate, seeded
        from verifiers import verify
        K = args.samples_per_prompt
        mine = list(range(rank, len(rows), world))
        prompts = [encode_prompt(tok, rows[i]["messages"]) for i in mine for _ in range(K)]
        outs, _ = generate(model, prompts, args.max_new_tokens, temperature=args.sample_temperature,
                           eos_token_ids=tok.eos_token_ids, seed=seeded("pairs", args.seed, rank),
                           batch_size=256)
        # (correct samples, no correct, all correct, pairs, correct and wrong but every correct one cut off)
        found, n = [], torch.zeros(5, dtype=torch.float64)
        eos = set(tok.eos_token_ids)
        for j, i in enumerate(mine):
            r = rows[i]
            samples = []
            for out in outs[j * K:(j + 1) * K]:
                text = tok.decode(out, skip_special_tokens=True)
                samples.append((verify(r["dataset"], text, r["ground_truth"]), text, bool(out) and out[-1] in eos))
            s = [x[0] >= 1.0 for x in samples]
            pair = pick_pair(samples)
            cut = any(s) and not all(s) and pair is None  # pick_pair takes no chosen without EOS
            n += torch.tensor([sum(s), not any(s), all(s), pair is not None, cut], dtype=torch.float64)
            if pair is not None:
                found.append((i, {"chosen": r["messages"] + [{"role": "assistant", "content": pair[0]}],
                                  "rejected": r["messages"] + [{"role": "assistant", "content": pair[1]}],
                                  "dataset": r["dataset"]}))
        found = [x for g in all_gather_object(found) for x in g]  # every rank gets every rank's pairs
        if rank == 0:
            make_out(args.out)  # (an earlier run's checkpoint here, whose pairs these replace: start_run forgot it)
            with open(pairs_file + ".tmp", "w") as f:
                f.writelines(json.dumps(row) + "\n" for _, row in sorted(found, key=lambda x: x[0]))
            os.replace(pairs_file + ".tmp", pairs_file)
        if is_dist():
            torch.distributed.barrier()  # pairs.jsonl is complete before anyone reads it
        return all_reduce(n).tolist()

    held_out, baseline = None, None
    try:
        if builtin:
            from tasks import make_tasks
            _, prefs, _, held_out = make_tasks(seed=args.seed)
            if resumed and os.path.isfile(os.path.join(resumed, "pairs.jsonl")):
                pairs_file = os.path.join(resumed, "pairs.jsonl")  # sampled by the run being resumed
                print0(f"on-policy pairs: reusing {pairs_file}")
            else:
                rows = prefs[:args.n_prompts]
                t0 = time.time()
                ok, none_ok, all_ok, n_pairs, n_cut = on_policy_pairs(rows)
                K = args.samples_per_prompt
                print0(f"on-policy pairs: {len(rows)} prompts x {K} samples (temperature {args.sample_temperature}) in "
                       f"{time.time() - t0:.0f}s; {ok / (len(rows) * K):.1%} of samples verified correct; "
                       f"{int(n_pairs)} pairs; no pair for {int(none_ok)} prompts with no correct sample, "
                       f"{int(all_ok)} with no wrong one and {int(n_cut)} whose correct samples were all cut off at "
                       f"--max-new-tokens {args.max_new_tokens} (no EOS)")
                if n_pairs == 0:
                    raise SystemExit(f"error: no preference pair: no prompt got both a verified answer that ended "
                                     f"with EOS and a wrong one from {args.ckpt}; sample more (--samples-per-prompt, "
                                     "--n-prompts), allow longer answers (--max-new-tokens) or train the SFT model "
                                     "longer")
            spec = [pairs_file]
        else:
            spec = args.data
        rows, n_bad = load_mixture(spec, pref_row, seed=args.seed, skip_bad=args.skip_bad,
                                   encode=lambda cr: [compact(encode_response(tok, m, args.max_len)) for m in cr])
        if args.eval_prompts:
            held_out = read_eval_prompts(args.eval_prompts)
        pairs, lengths, n_drop = [], [], 0
        for c, r in rows:
            if c is None or r is None:  # a response truncated away entirely: nothing to compare
                n_drop += 1
                continue
            pairs.append((c, r))
            lengths.append([(c[1][1:] != IGNORE).sum(), (r[1][1:] != IGNORE).sum(), len(c[0]) + len(r[0])])
    except DataError as e:
        raise SystemExit(f"error: {e}")
    # (N, 3): response tokens of chosen and of rejected (what the loss averages over), all tokens of the pair
    lengths = torch.tensor(lengths, dtype=torch.float32).reshape(-1, 3)
    N = len(pairs)
    # the counts first: they say why, when plan_steps stops on too few pairs (all skipped or dropped)
    print0(f"pairs: {N}; {n_bad} bad rows skipped, {n_drop} dropped (a response empty after truncation to "
           f"--max-len {args.max_len}); mean response tokens chosen {lengths[:, 0].mean():.1f}, "
           f"rejected {lengths[:, 1].mean():.1f}")
    accum, steps_per_epoch, total, warmup = plan_steps(N, args, world, "preference pairs")
    B, mB = args.batch_size, args.micro_batch_size
    n_params = sum(q.numel() for q in model.parameters())
    print0(f"model: {n_params / 1e6:.2f}M parameters | world {world} | batch {B} pairs = micro {mB} x accum {accum} "
           f"x world {world} | {total} steps ({steps_per_epoch}/epoch), warmup {warmup} | device {device}")
    print0(f"preset {args.preset}: lr {args.lr} {args.schedule}, max length {args.max_len}, saved in {args.save_dtype}")
    print0(f"loss: {args.loss_type}, beta {args.beta}" + (f", gamma/beta {args.gamma_beta_ratio}" if args.loss_type ==
           "simpo" else "") + (f", label smoothing {args.label_smoothing}" if args.label_smoothing else ""))

    def pair_batch(idx):
        # the 2n sequences of pairs[idx], chosen first, right-padded to a common length, on the device
        return pad_batch([pairs[i][0] for i in idx] + [pairs[i][1] for i in idx], tok.pad_id, device)

    def sequence_logps(idx, lsq=False, batch=None):
        """Summed log-probs of the chosen and rejected responses of pairs[idx]: (n,), (n,) fp32, and with
        lsq=True the summed log sum_v p_v^2 of both (WPO). One forward over the 2n sequences (pair_batch(idx),
        or `batch` when given)."""
        n = len(idx)
        batch = batch or pair_batch(idx)
        out = token_logprobs(model, batch["input_ids"], batch["targets"], return_lsq=lsq)  # (2n, T), 0 off-target
        logp, q = (out[0].sum(-1), out[1].sum(-1)) if lsq else (out.sum(-1), None)
        return (logp[:n], logp[n:]) + ((q[:n], q[n:]) if lsq else ())

    # -----------------------------------------------------------------------------
    # reference log-probs: once, with the starting model, cached beside the output

    ref = torch.zeros(N, 2, dtype=torch.float64)  # (N, 2) summed log pi_ref: chosen, rejected
    if args.loss_type != "simpo":
        key = reference_key(start_fp, args.max_len, device.type, pairs)
        cache = f"{os.path.abspath(args.out)}.ref-{key}.pt"
        cached = None
        if os.path.isfile(cache):
            try:
                cached = torch.load(cache, map_location="cpu")["logps"]
            except Exception as e:  # noqa: BLE001  a cache that cannot be read is recomputed
                print(f"reference log-probs: cannot read {cache} ({type(e).__name__}), computing them again")
        # every rank must take the same branch (the computation is collective): a hit only if every rank read it
        if all_reduce(float(not (torch.is_tensor(cached) and cached.shape == (N, 2))), op="max") == 0:
            ref = cached
            print0(f"reference log-probs: loaded {cache}")
        else:
            t0 = time.time()
            model.eval()
            with torch.no_grad():
                for j in range(0, N, mB * world):
                    idx = list(range(j + rank * mB, min(j + (rank + 1) * mB, N)))
                    # a rank out of pairs runs a dummy batch: FSDP forwards are collective
                    pc, pr = sequence_logps(idx or [0])
                    if idx:
                        ref[idx] = torch.stack([pc, pr], 1).double().cpu()
            model.train()
            reshard(model)  # before the optimizer is built on it
            ref = all_reduce(ref).cpu()  # each pair was filled by exactly one rank
            if rank == 0:
                for left in glob.glob(f"{glob.escape(os.path.abspath(args.out))}.ref-*.pt.tmp"):
                    os.remove(left)  # a write killed before its rename (claim_out: no other run writes here)
                torch.save({"logps": ref, "ckpt": args.ckpt, "max_len": args.max_len}, cache + ".tmp")
                os.replace(cache + ".tmp", cache)
            print0(f"reference log-probs: {N} pairs in {time.time() - t0:.0f}s, cached in {cache}")

    # baseline accuracy on the held-out prompts: the SFT run's own eval.json when it scored these very
    # prompts with the same decoding, else the start model evaluated now
    if held_out is not None and args.eval_n is not None:
        held_out = held_out[:args.eval_n] or None  # --eval-n 0: no evaluation
    if held_out is not None:
        baseline = (earlier_eval(os.path.join(args.ckpt, "eval.json"), held_out, args.eval_max_new_tokens)
                    or evaluate(model, tok, held_out, args.eval_max_new_tokens, args.eval_batch_size))

    # -----------------------------------------------------------------------------
    # training loop

    if resumed:  # the policy continues from the checkpoint; the start model has done its part
        del model
        model = load_model(resumed, device, grad_checkpoint=args.grad_checkpoint, compile=args.compile,
                           weights=False)  # resume() fills it from train_state/
    model.train()
    opt = build_optimizer(model, args.lr, args.weight_decay)
    start = resume(resumed, args.out, model, opt, args, total)["step"]
    save_dtype = torch.bfloat16 if args.save_dtype == "bf16" else torch.float32
    bar = tqdm(range(start, total), initial=start, total=total, disable=rank != 0, desc="dpo")
    for step in bar:
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.lr, warmup, args.schedule)
        # this rank's pairs of the step: a pure function of (seed, step), so a resumed run sees the same batches
        order = epoch_order(N, step // steps_per_epoch, args.seed)
        i = step % steps_per_epoch
        mine = order[i * B:(i + 1) * B][rank::world]
        # summed over the step's pairs: loss, rewards chosen/rejected, correct pairs, policy logps, tokens in
        # Every copy to the device is made before the first forward and the sums stay there until the step's end: on a
        # GPU a blocking host-to-device copy or a .cpu() between micro-batches waits for the backward queued before it,
        # and the GPU idles while Python launches the next forward
        stats = torch.zeros(7, dtype=torch.float64, device=device)
        mbs = [(mine[j:j + mB], pair_batch(mine[j:j + mB]), ref[mine[j:j + mB]].to(device),
                lengths[mine[j:j + mB]].to(device)) for j in range(0, len(mine), mB)]
        for idx, batch, rf, n in mbs:
            pc, pr, *lsq = sequence_logps(idx, lsq=args.loss_type == "wpo", batch=batch)
            losses, rc, rr = preference_loss(pc, pr, rf[:, 0], rf[:, 1], n[:, 0], n[:, 1], args.loss_type,
                                             args.beta, args.gamma_beta_ratio, args.label_smoothing, *lsq)
            # every step has exactly B pairs: dividing each micro-batch's sum by B makes the accumulated
            # gradient that of the step's mean pair loss; FSDP averages over ranks, * world undoes that
            (losses.sum() / B * world).backward()
            stats += torch.stack([losses.sum(), rc.sum(), rr.sum(), (rc > rr).sum(), pc.sum(), pr.sum(),
                                  n[:, 2].sum()]).detach().double()
        stats = (all_reduce(stats).cpu() / B).tolist()
        if not math.isfinite(stats[0]):
            raise SystemExit(f"error: loss is {stats[0]} at step {step}; stopping. The last good checkpoint "
                             f"(if any) is untouched in {args.out}")
        gnorm = clip_grad_norm(model, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step, "loss": stats[0], "reward_chosen": stats[1], "reward_rejected": stats[2],
               "margin": stats[1] - stats[2], "accuracy": stats[3], "logp_chosen": stats[4], "logp_rejected": stats[5],
               "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm, "tok_per_s": stats[6] * B / (time.time() - t0)}
        log_metrics(args.out, row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}", margin=f"{row['margin']:.3f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            save_checkpoint(args.out, model, tok, opt, {"step": step + 1, "args": vars(args), "start": start_fp,
                                                        "stage": "dpo"}, dtype=save_dtype)

    save_checkpoint(args.out, model, tok, opt, {"step": total, "args": vars(args), "start": start_fp, "stage": "dpo"},
                    dtype=save_dtype)
    write_json(os.path.join(args.out, "args.json"), vars(args))
    if held_out is not None:
        res = evaluate(model, tok, held_out, args.eval_max_new_tokens, args.eval_batch_size)
        write_json(os.path.join(args.out, "eval.json"), {**res, "start": baseline})
        fmt = lambda r: f"{r['accuracy']:.3f} (" + ", ".join(  # noqa: E731
            f"{k} {v['accuracy']:.3f}" for k, v in r["per_task"].items()) + ")"
        print0(f"held-out accuracy on {res['n']} prompts: start {fmt(baseline)} -> dpo {fmt(res)}")
    print0(f"saved {args.out}")
    cleanup()
