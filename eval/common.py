"""
What every benchmark script in eval/ shares, written once: the command line, loading a checkpoint,
greedy batched generation through the checkpoint's chat template with stop strings, the rank-strided
split under torchrun, and the two output files:

    OUT/predictions.jsonl   one line per example: its fields, the response, how it ended, its verdict
    OUT/summary.json        the metrics, the protocol, the arguments, one rendered prompt for audit

OUT defaults to CKPT/eval/<benchmark>/. One process (CPU or one GPU) or torchrun with N GPUs: each
rank holds a full copy of the model and generates every N-th prompt; rank 0 gathers and scores (builtin
scores on every rank through the training scripts' common.evaluate, which sums the counts over ranks).

Stop strings: generation stops on the checkpoint's EOS tokens or after --max-new-tokens; a stop
string ("Question:" for GSM8K) is applied afterwards by cutting the decoded text at its first
occurrence. Under greedy decoding the text before the stop string is the same as if generation had
stopped there (as vLLM does), so the scores are the same; only the tokens after it are wasted work.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

# cleanup: re-exported for the benchmark scripts
from common import (check_out, cleanup, init_distributed, is_dist, is_rank0, positive, print0,  # noqa: F401
                    read_checkpoint, write_json)
from data import DataError, read_jsonl
from model import Llama, generate
from tokenizer import Tokenizer

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def parser(name, doc, max_new_tokens, data=True, out=None):
    # out: how the help names the default output folder under CKPT/eval/, when it is not always `name`
    p = argparse.ArgumentParser(prog=f"python -m eval.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="HF checkpoint folder (weights, tokenizer, chat template)")
    if data:
        p.add_argument("--data", default=DATA, help="folder holding gsm8k/, math/, ifeval/ (default: the project's data/)")
    p.add_argument("--out", default=None, help=f"output folder (default: CKPT/eval/{out or name})")
    p.add_argument("--limit", type=positive, default=None, help="only the first N examples")
    p.add_argument("--batch-size", type=positive, default=64, help="prompts per generation batch, per process")
    p.add_argument("--max-new-tokens", type=positive, default=max_new_tokens,
                   help=f"default {max_new_tokens} (the protocol's)")
    return p


def run(main):
    """A benchmark's main(), with bad data reported as the one sentence naming its file and line."""
    try:
        main()
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


def load_rows(path, keys, limit=None, check=None):
    """The rows of a JSONL file (the first `limit`). A row lacking one of `keys`, or on which `check(row)`
    raises ValueError (a gold answer the verifier cannot read), is an error naming its line: found
    before generating, not after."""
    rows = []
    for where, row in read_jsonl(path):
        missing = [k for k in keys if k not in row]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}")
        try:
            check and check(row)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        rows.append(row)
        if limit is not None and len(rows) == limit:
            break
    return rows


def setup(args, name):
    """-> (model, tok, out folder). Every rank loads the whole model: bf16 on a GPU, fp32 on the CPU."""
    # the results are written after the whole generation (hours, for MATH on a large model): a folder that
    # cannot be written stops the run now; CKPT/eval/<name> by default (a read-only checkpoint: --out)
    check_out(args.out or os.path.join(args.ckpt, "eval", name), swapped=False)
    rank, world, device = init_distributed()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = read_checkpoint(Llama.from_pretrained, args.ckpt, device=device, dtype=dtype).eval()
    tok = read_checkpoint(Tokenizer.from_pretrained, args.ckpt)
    print0(f"{name}: {args.ckpt} on {world} x {device.type} ({dtype}), batch {args.batch_size}, "
           f"max {args.max_new_tokens} new tokens")
    return model, tok, args.out or os.path.join(args.ckpt, "eval", name)


def render(tok, messages, prefix=""):
    """The prompt text: `messages` through the chat template up to the assistant header, plus `prefix`,
    text the assistant turn is made to start with (OLMES' assistant_prefix, e.g. "Answer:")."""
    return tok.apply_chat_template(messages, add_generation_prompt=True) + prefix


def cut(text, stops):
    """`text` up to the earliest stop string -> (text, True if one was found)."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if at < 0 else (text[:at], True)


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if is_dist() else (0, 1)


def gather(items):
    """The lists of all ranks, concatenated on rank 0; [] on the other ranks (identity on one process)."""
    if not is_dist():
        return items
    rank0 = dist.get_rank() == 0
    out = [None] * dist.get_world_size() if rank0 else None
    dist.gather_object(items, out, dst=0)  # every rank reaches this: each calls complete() once
    return [x for part in out for x in part] if rank0 else []


@torch.no_grad()
def complete(model, tok, prompts, args, stops=(), desc="generate"):
    """Greedy completions of prompt texts. -> one dict per prompt, in order, on rank 0 ([] elsewhere):
    {"response": decoded text cut at the first stop string, "finish_reason": "eos" | "stop" | "length",
    "n_tokens": tokens generated}. Rank r generates prompts r, r + world, ... in length-sorted batches
    (little padding), then the results are gathered. Scoring then runs on rank 0 alone (the zips over
    rows and [] give nothing to score elsewhere)."""
    rank, world = rank_world()
    ids = {i: tok.encode(prompts[i]) for i in range(rank, len(prompts), world)}
    order = sorted(ids, key=lambda i: -len(ids[i]))  # longest first: an out-of-memory shows up at once
    eos = set(tok.eos_token_ids)
    done = []
    bar = tqdm(total=len(prompts), desc=desc, disable=rank != 0, dynamic_ncols=True)
    for b in range(0, len(order), args.batch_size):
        idx = order[b:b + args.batch_size]
        outs, _ = generate(model, [ids[i] for i in idx], args.max_new_tokens, temperature=0.0,
                           eos_token_ids=tok.eos_token_ids)
        for i, out in zip(idx, outs):
            text, stopped = cut(tok.decode(out, skip_special_tokens=True), stops)
            end = "stop" if stopped else "eos" if out and out[-1] in eos else "length"
            done.append((i, {"response": text, "finish_reason": end, "n_tokens": len(out)}))
        bar.update(min(len(idx) * world, bar.total - bar.n))  # rank 0's progress stands for all ranks'
    bar.close()
    return [g for _, g in sorted(gather(done), key=lambda x: x[0])]


def save(out, name, args, records, metrics, primary, protocol, prompt, t0):
    """Writes OUT/predictions.jsonl and OUT/summary.json (rank 0) and prints the metrics."""
    if not is_rank0():
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "predictions.jsonl"), "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary = {"benchmark": name, "ckpt": os.path.abspath(args.ckpt), "n": len(records), "primary": primary,
               "metrics": metrics, "protocol": protocol, "args": vars(args), "seconds": round(time.time() - t0, 1),
               "example_prompt": prompt}
    write_json(os.path.join(out, "summary.json"), summary)
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print0(f"{name} | n {len(records)} | " + " | ".join(f"{k} {100 * v:.2f}" for k, v in flat.items()))
    print0(f"{name}: wrote {out}/predictions.jsonl and summary.json")
