"""
Supervised fine-tuning, the first stage of Tülu 3 (paper §4): next-token loss on assistant tokens only.

    python sft.py                                   # tiny default on the CPU: trains a small model from
                                                    # scratch on the built-in tasks, writes out/sft/ (and
                                                    # its random start, tokenizer included, to out/base/)
    python sft.py --ckpt path/to/hf --data tulu3_sft.jsonl:1.0 extra.jsonl:5000 --preset tulu3-8b
    torchrun --standalone --nproc_per_node 8 sft.py --ckpt ... --data ... --preset tulu3-8b

What it does:
1. The loss is summed over target tokens and divided by the number of target tokens in the whole
   optimizer step, across micro-batches and ranks: every token weighs the same, whatever the
   padding, packing or accumulation (Tülu 3's --reduce_loss sum weighs tokens alike too, with the
   step's size growing with its token count). --loss-reduction mean gives the common per-micro-batch mean,
   as an ablation.
2. Batches are padded, or with --packing padding-free: one row per micro-batch with attention
   that never crosses a document boundary. Both give the same loss.
3. AdamW, warmup then linear/cosine decay, gradient clipping. FSDP2 under torchrun (and on any
   CUDA device); on a CPU process plain fp32.
4. The output directory is an HF checkpoint (transformers and vLLM load it), rewritten atomically at
   every --save-every and at the end, with train_state/ (each rank's shards of the fp32 weights and Adam
   moments) and train_state.pt (step, flags) to --resume from, and metrics.jsonl.
"""
import argparse
import math
import os
import time

import torch
from tqdm import tqdm

from common import (IGNORE, add_data_args, add_optim_args, all_reduce, build_optimizer, check_data_args, check_out,
                    cleanup, clip_grad_norm, evaluate, init_distributed, load_model, log_metrics, lr_at, number,
                    plan_steps, positive, print0, read_checkpoint, resume, save_checkpoint, seed_everything, start_run,
                    write_json)
from data import DataError, compact, encode_rows, encode_sft, epoch_order, load_mixture, pack_batch, pad_batch, sft_row
from tokenizer import Tokenizer

p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
# what to train
p.add_argument("--ckpt", default=None, help="HF checkpoint dir to start from, given together with --data "
               "(neither: a tiny model from scratch on the built-in tasks)")
p.add_argument("--data", nargs="+", default=None, help="SFT JSONL files, 'file:fraction' or 'file:count'")
p.add_argument("--out", default="out/sft")
p.add_argument("--preset", choices=["tiny", "tulu3-8b"], default=None, help="fills the hyperparameters not "
               "given (default: tiny on the built-in tasks, tulu3-8b on --data)")
p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
p.add_argument("--seed", type=int, default=0)
# data
p.add_argument("--max-len", type=positive, default=None)
p.add_argument("--drop-long", action="store_true", help="drop examples over --max-len instead of truncating")
p.add_argument("--packing", action="store_true", help="padding-free packed micro-batches")
p.add_argument("--chat-template", default=None, help="own: the checkpoint's (Tülu 3's if it has none); tulu: "
               "Tülu 3's in any case (open-instruct's default); or a .jinja file. Saved with the output")
p.add_argument("--add-bos", action="store_true", help="prepend BOS to the chat template (saved with the output): "
               "for base models pretrained with BOS whose template does not write it")
p.add_argument("--val-frac", type=number(0, 1), default=None,
               help="share of each data file held out for validation loss")
add_data_args(p)  # --skip-bad --eval-prompts --eval-n --eval-max-new-tokens --eval-batch-size
# optimization
p.add_argument("--epochs", type=number(0, above=True), default=None)
p.add_argument("--max-steps", type=positive, default=None, help="stop after this many optimizer steps")
p.add_argument("--batch-size", type=positive, default=None, help="examples per optimizer step, all ranks")
p.add_argument("--micro-batch-size", type=positive, default=None, help="examples per forward, per rank")
add_optim_args(p)  # --lr --schedule --warmup-ratio ... --save-every (shared: common.py)
p.add_argument("--loss-reduction", choices=["sum", "mean"], default="sum")
# validation
p.add_argument("--eval-every", type=positive, default=None, help="validation loss every N steps")
args = p.parse_args()
check_data_args(args)
if args.eval_every is not None and args.val_frac == 0:
    raise SystemExit("error: --eval-every sets how often the validation loss is computed, and --val-frac 0 holds out "
                     "no rows for it")

# presets fill whatever was not given on the command line (README: "How the scripts map to Tülu 3")
PRESETS = {
    # the tiny default: a 0.85M-parameter model from scratch, a few minutes on 2 CPU cores
    "tiny": dict(epochs=8, batch_size=32, micro_batch_size=32, lr=3e-3, schedule="cosine", warmup_ratio=0.05,
                 max_len=256, save_dtype="fp32", val_frac=0.02, eval_every=50, chat_template="own",
                 grad_checkpoint=False, eval_batch_size=256, eval_max_new_tokens=64, save_every=0),
    # Tülu 3 8B SFT (open-instruct docs/tulu3.md): lr 5e-6 linear, warmup 0.03, wd 0, 2 epochs,
    # max length 4096, effective batch 128, sum loss
    # (Tülu trains on every row; ~0.1% is held out here for a validation loss every 500 steps)
    "tulu3-8b": dict(epochs=2, batch_size=128, micro_batch_size=1, lr=5e-6, schedule="linear", warmup_ratio=0.03,
                     max_len=4096, save_dtype="bf16", val_frac=0.001, eval_every=500, chat_template="tulu",
                     grad_checkpoint=False, eval_batch_size=64, eval_max_new_tokens=512, save_every=0),
}
# the built-in tasks train a 0.85M-parameter model; data of one's own is for a real checkpoint, whose
# tiny-model hyperparameters (lr 1e-4..3e-3, fp32 saves) would wreck it
args.preset = args.preset or ("tiny" if args.data is None else "tulu3-8b")
for k, v in PRESETS[args.preset].items():
    if getattr(args, k) is None:
        setattr(args, k, v)

# -----------------------------------------------------------------------------
# setup

check_out(args.out)
rank, world, device = init_distributed()
seed_everything(args.seed + rank)

held_out = None
resumed, _ = start_run(args.out, args.resume, "sft")
if args.ckpt is None and args.data is None:
    # the embedded default: built-in tasks, a tokenizer trained on their text, a model from scratch
    from tasks import make_base_checkpoint, make_tasks
    sft_rows, _, _, held_out = make_tasks(seed=args.seed)
    args.ckpt = os.path.join(os.path.dirname(os.path.normpath(args.out)) or ".", "base")
    # one writer, the other ranks read it once it is complete; a resumed run keeps the base (and tokenizer)
    # its checkpoint was trained from, if the base there still is that one: another run's --out beside this
    # one (another --seed) rewrites the shared base with its own tokenizer, which is then made again
    def same_tokenizer():
        try:
            with open(os.path.join(args.ckpt, "tokenizer.json"), "rb") as a, \
                    open(os.path.join(resumed, "tokenizer.json"), "rb") as b:
                return a.read() == b.read()
        except OSError:
            return False
    if rank == 0 and not (resumed and same_tokenizer()):
        make_base_checkpoint(args.ckpt, sft_rows, args.seed)
    if world > 1:
        torch.distributed.barrier()
    if resumed and not same_tokenizer():
        raise SystemExit(f"error: --resume: the checkpoint in {args.out} was trained with another tokenizer than "
                         f"the base {args.ckpt} made with --seed {args.seed}")
elif args.ckpt is None or args.data is None:
    raise SystemExit("give both --ckpt and --data (or neither, for the built-in tiny default)")
ckpt = args.ckpt
tok = read_checkpoint(Tokenizer.from_pretrained, ckpt)
try:
    tok.use_chat_template(args.chat_template)
except (OSError, ValueError) as e:
    raise SystemExit(f"error: --chat-template: {e}")
if args.add_bos:
    try:
        tok.add_bos()
    except ValueError as e:
        raise SystemExit(f"error: --add-bos: {e}")
# a resume's weights come from its train_state/ (the fp32 master weights), not from its safetensors too
model = load_model(resumed or ckpt, device, grad_checkpoint=args.grad_checkpoint, compile=args.compile,
                   weights=not resumed)
model.train()

# -----------------------------------------------------------------------------
# data

cut = []  # the lengths of the examples this rank truncated to --max-len (encode_rows shares the rows out)


def encode(msgs):
    """-> (ids, labels) as int32 arrays (data.compact), or None: over --max-len with --drop-long, or nothing left
    to train on."""
    return compact(encode_sft(tok, msgs, args.max_len, truncate=not args.drop_long, cut=cut))


try:
    if args.data is not None:  # one list per file: each gives its share of the validation rows
        sources = [load_mixture([s], sft_row, seed=args.seed, skip_bad=args.skip_bad, encode=encode)
                   for s in args.data]
        n_bad = sum(k for _, k in sources)
        sources = [rows for rows, _ in sources]
    else:
        sources, n_bad = [encode_rows([(f"built-in row {i}", r["messages"]) for i, r in enumerate(sft_rows)], encode,
                                      skip_bad=False)[0]], 0
    if args.eval_prompts:
        from data import read_eval_prompts
        held_out = read_eval_prompts(args.eval_prompts)
except DataError as e:
    raise SystemExit(f"error: {e}")
val, train, n_drop = [], [], 0
for rows in sources:
    examples = [ex for ex in rows if ex is not None]
    n_drop += len(rows) - len(examples)
    n_val = int(len(examples) * args.val_frac)  # the first rows of the file's seeded shuffle
    val, train = val + examples[:n_val], train + examples[n_val:]
# the counts first: they say why, when plan_steps stops on too few examples (all skipped or dropped)
n_cut = int(all_reduce(len(cut)))
print0(f"examples: {len(train)} train, {len(val)} val; {n_bad} bad rows skipped, {n_cut} truncated to --max-len, "
       f"{n_drop} dropped (over --max-len {args.max_len} or nothing to train on)")
accum, steps_per_epoch, total, warmup = plan_steps(len(train), args, world, "training examples")
B, mB = args.batch_size, args.micro_batch_size
n_params = sum(p.numel() for p in model.parameters())
print0(f"model: {n_params / 1e6:.2f}M parameters | world {world} | batch {B} = micro {mB} x accum {accum} x world "
       f"{world} | {total} steps ({steps_per_epoch}/epoch), warmup {warmup} | device {device}")
print0(f"preset {args.preset}: lr {args.lr} {args.schedule}, max length {args.max_len}, saved in {args.save_dtype}")


def micro_batches(step):
    """This rank's micro-batches of optimizer step `step`: a pure function of (seed, step)."""
    order = epoch_order(len(train), step // steps_per_epoch, args.seed)
    i = step % steps_per_epoch
    idx = order[i * B:(i + 1) * B][rank::world]  # rank-strided
    for j in range(0, len(idx), mB):
        exs = [train[k] for k in idx[j:j + mB]]
        yield pack_batch(exs, device) if args.packing else pad_batch(exs, tok.pad_id, device)


def loss_sum(batch):
    """Summed next-token NLL over the target tokens of a batch (fused kernel), and their count."""
    fw = {k: batch[k] for k in ("position_ids", "doc_ids") if k in batch}
    loss = model(batch["input_ids"], targets=batch["targets"], reduction="sum", **fw)
    return loss, (batch["targets"] != IGNORE).sum()


@torch.no_grad()
def val_loss():
    """Mean per-token NLL on the validation examples (rank-strided, summed over ranks). Every rank runs
    the same number of forwards (FSDP's all-gathers are collective): one out of rows runs a dummy batch
    with no target."""
    model.eval()
    tot, n = 0.0, 0
    for r in range(-(-len(val) // (mB * world))):
        j = (r * world + rank) * mB
        batch = pad_batch(val[j:j + mB] or val[:1], tok.pad_id, device)
        if j >= len(val):
            batch["targets"].fill_(IGNORE)
        loss, k = loss_sum(batch)
        tot, n = tot + loss.item(), n + k.item()
    model.train()
    tot, n = all_reduce(tot), all_reduce(n)
    return tot / max(n, 1)


# -----------------------------------------------------------------------------
# training loop

opt = build_optimizer(model, args.lr, args.weight_decay)
start = resume(resumed, args.out, model, opt, args, total)["step"]
save_dtype = torch.bfloat16 if args.save_dtype == "bf16" else torch.float32
bar = tqdm(range(start, total), initial=start, total=total, disable=rank != 0, desc="sft")
for step in bar:
    t0 = time.time()
    for g in opt.param_groups:
        g["lr"] = lr_at(step, total, args.lr, warmup, args.schedule)
    mbs = list(micro_batches(step))
    # count the step's target tokens on all ranks first: each micro-batch's summed loss is divided by
    # this global count, so the accumulated gradient is the gradient of the step's mean token loss
    # one host sync for the count and one for the summed loss, kept on the device meanwhile: on a GPU an .item() per
    # micro-batch waits for its backward, and the GPU idles while Python launches the next micro-batch's forward
    n_tok = all_reduce(torch.stack([(b["targets"] != IGNORE).sum() for b in mbs]).sum().item())
    tot = torch.zeros((), dtype=torch.float64, device=device)  # (float64: the same sum as the Python floats' before)
    for mb in mbs:
        loss, k = loss_sum(mb)
        if args.loss_reduction == "sum":
            # FSDP averages gradients over ranks; * world turns that average back into the sum
            scaled = loss / n_tok * world
        else:  # ablation: mean over this micro-batch's tokens, then averaged over micro-batches/ranks
            scaled = loss / k.clamp(min=1) / accum
        scaled.backward()
        tot += loss.detach()
    loss_step = all_reduce(tot.item()) / max(n_tok, 1)
    if not math.isfinite(loss_step):
        raise SystemExit(f"error: loss is {loss_step} at step {step}; stopping. The last good checkpoint "
                         f"(if any) is untouched in {args.out}")
    gnorm = clip_grad_norm(model, args.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    dt = time.time() - t0
    row = {"step": step, "loss": loss_step, "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm,
           "tokens": int(n_tok), "tok_per_s": all_reduce(sum(b["input_ids"].numel() for b in mbs)) / dt}
    if device.type == "cuda":  # MFU: 6 N flops per token (fwd+bwd), against the H100/H200 bf16 peak
        row["mfu"] = 6 * n_params * row["tok_per_s"] / (989e12 * world)
    if val and (step % args.eval_every == 0 or step == total - 1):
        row["val_loss"] = val_loss()
    log_metrics(args.out, row)
    bar.set_postfix(loss=f"{loss_step:.4f}", lr=f"{row['lr']:.1e}",
                    **({"val": f"{row['val_loss']:.4f}"} if "val_loss" in row else {}))
    if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
        save_checkpoint(args.out, model, tok, opt, {"step": step + 1, "args": vars(args), "stage": "sft"},
                        dtype=save_dtype)

save_checkpoint(args.out, model, tok, opt, {"step": total, "args": vars(args), "stage": "sft"}, dtype=save_dtype)
write_json(os.path.join(args.out, "args.json"), vars(args))
if held_out is not None and args.eval_n is not None:
    held_out = held_out[:args.eval_n] or None  # --eval-n 0: no evaluation
if held_out is not None:
    res = evaluate(model, tok, held_out, args.eval_max_new_tokens, args.eval_batch_size)
    write_json(os.path.join(args.out, "eval.json"), res)
    print0(f"held-out accuracy {res['accuracy']:.3f} on {res['n']} prompts: "
           + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in res["per_task"].items()))
print0(f"saved {args.out}")
cleanup()
