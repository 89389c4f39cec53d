"""
Data for the three stages: JSONL readers for the formats people already have, a dataset mixer,
tokenization with assistant-only targets, and padded or packed batches.

  SFT          {"messages": [{"role", "content"}, ...]}                        (Tülu 3 SFT mixture)
  preferences  {"chosen": [messages], "rejected": [messages]}  or
               {"prompt": str | [messages], "chosen": str | [messages], "rejected": ...}
  RLVR         {"messages": [...], "ground_truth": ..., "dataset": "gsm8k" | "math" | "ifeval" | ...}

Files may be .jsonl or .jsonl.gz; a mixture is "a.jsonl:0.5 b.jsonl:5000" (up to 1 a fraction of the
file's rows, rounded down, so 1 is all of it; a larger whole number that many rows), as Tülu's dataset mixer
reads it. Bad input is one clear error naming file and line, or with skip_bad=True a counted skip reported by
the caller.
"""
import gzip
import json
import os
import random
import re
import zlib

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from common import IGNORE, all_gather_object, is_dist, is_rank0
from model import seeded
from tokenizer import tokenize_conversation
from verifiers import scorer

ROLES = {"system", "user", "assistant"}

# -----------------------------------------------------------------------------
# reading and validating rows


class DataError(ValueError):
    pass


# a JSON escape of a UTF-16 surrogate: a pair of them is one character (an emoji), a lone one decodes to a
# str that is not valid Unicode, which no tokenizer (nor UTF-8) takes
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def read_jsonl(path, bad=None):
    """Yields (where, row) with where = "file:line"; an empty file or a malformed line is an error
    (or, when a list `bad` is given, a malformed line is appended to it and skipped). Lines are decoded
    here, so a stray non-UTF-8 byte is a malformed line too, as is an unpaired surrogate escape ("\\ud83d",
    half an emoji: json reads it, but the tokenizer refuses the string with a TypeError); a truncated .gz
    is an error."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: is a directory, not a JSONL file" if os.path.isdir(path) else f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    n = skipped = i = 0
    try:
        with opener(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if i == 1 else "utf-8")  # a BOM may open the file
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
                    if _SURROGATE_ESCAPE.search(line):  # raises UnicodeEncodeError on a lone surrogate
                        json.dumps(row, ensure_ascii=False).encode("utf-8")
                except (UnicodeError, json.JSONDecodeError, DataError) as e:
                    if isinstance(e, UnicodeDecodeError):
                        err = DataError(f"{path}:{i}: not UTF-8 ({e.reason} at byte {e.start})")
                    elif isinstance(e, UnicodeEncodeError):
                        err = DataError(f"{path}:{i}: not valid Unicode (an unpaired surrogate "
                                        f"\\u{ord(e.object[e.start]):04x})")
                    elif isinstance(e, json.JSONDecodeError):
                        err = DataError(f"{path}:{i}: malformed JSON ({e.msg})")
                    else:
                        err = e
                    if bad is None:
                        raise err from None
                    bad.append(err)
                    skipped += 1
                    continue
                n += 1
                yield f"{path}:{i}", row
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e}; {i} lines read)") from None
    if n == 0:
        raise DataError(f"{path}: no valid row ({skipped} malformed lines skipped)" if skipped else f"{path}: empty file")


def check_messages(msgs, where, need_assistant=True):
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: messages must be a non-empty list")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            role = m.get("role") if isinstance(m, dict) else m
            raise DataError(f"{where}: bad message (role {role!r}; roles are {sorted(ROLES)}, content a string)")
    if need_assistant and not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: conversation has no assistant turn")
    return msgs


def messages_of(row, where):
    if "messages" not in row:  # e.g. ShareGPT's "conversations": converted beforehand, as open-instruct does
        raise DataError(f"{where}: no 'messages' field (the row has {sorted(row)})")
    return row["messages"]


def sft_row(row, where):
    return check_messages(messages_of(row, where), where)


def pref_row(row, where):
    """-> (chosen messages, rejected messages); both must share the same prompt (all but the last turn)."""
    c, r = row.get("chosen"), row.get("rejected")
    if c is None or r is None:
        raise DataError(f"{where}: a preference row needs 'chosen' and 'rejected'")
    # {"prompt", "chosen", "rejected"} with the prompt apart (strings, or assistant-only message lists).
    # Tülu 3's and UltraFeedback's rows also carry "prompt", but their chosen and rejected are whole
    # conversations that already contain it: those are taken as they are.
    whole = lambda x: isinstance(x, list) and bool(x) and isinstance(x[0], dict) and x[0].get("role") != "assistant"  # noqa: E731
    if "prompt" in row and not (whole(c) and whole(r)):
        p = row["prompt"]
        if not all(isinstance(x, (str, list)) for x in (p, c, r)):
            raise DataError(f"{where}: prompt, chosen and rejected must each be a string or a list of messages")
        p = [{"role": "user", "content": p}] if isinstance(p, str) else p
        wrap = lambda x: [{"role": "assistant", "content": x}] if isinstance(x, str) else x  # noqa: E731
        c, r = p + wrap(c), p + wrap(r)
    check_messages(c, where)
    check_messages(r, where)
    if c[:-1] != r[:-1] or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise DataError(f"{where}: chosen and rejected must share the same prompt and end with an assistant turn")
    return c, r


def rlvr_row(row, where):
    msgs = check_messages(messages_of(row, where), where, need_assistant=False)
    if msgs[-1]["role"] == "assistant":  # open-instruct rows sometimes carry the reference answer
        msgs = msgs[:-1]
    if "ground_truth" not in row or "dataset" not in row:
        raise DataError(f"{where}: an RLVR row needs 'ground_truth' and 'dataset'")
    try:  # read by its verifier now: a label it cannot score stops the run here, not at the step that samples it
        scorer(row["dataset"], row["ground_truth"])
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    return {"messages": msgs, "ground_truth": row["ground_truth"], "dataset": row["dataset"]}


def read_eval_prompts(path):
    """--eval-prompts: RLVR rows scored for held-out accuracy. Read whole and strictly, --skip-bad or not (that
    flag is for training data): a skipped row would change the prompts an accuracy is over, unseen."""
    return [rlvr_row(row, where) for where, row in read_jsonl(path)]


def load_mixture(specs, parse, seed=0, skip_bad=False, encode=None):
    """specs: ["a.jsonl:0.5", "b.jsonl.gz:5000", "c.jsonl"]; parse: sft_row/pref_row/rlvr_row.
    -> (rows, n_skipped). Fractions/counts are taken from a seeded shuffle of each file. `encode`
    (tokenization) runs on the rows taken only (encode_rows: shared out among the ranks, so collective); a
    ValueError from it (a conversation the chat template refuses or renders unusably) makes the row bad like a
    malformed one: named by file:line, or with skip_bad skipped and counted."""
    rows, skipped = [], 0
    for spec in specs:
        path, amount = spec, None
        if ":" in spec and not os.path.isfile(spec):
            path, amount = spec.rsplit(":", 1)
        got, bad = [], [] if skip_bad else None
        for where, row in read_jsonl(path, bad):
            try:
                got.append((where, parse(row, where)))
            except DataError:
                if not skip_bad:
                    raise
                skipped += 1
        skipped += len(bad or [])
        random.Random(seed).shuffle(got)
        if amount is not None:
            try:  # as open-instruct's mixer: up to 1 a fraction (":1" is the whole file), above it a row count
                f = float(amount)
                if not (0 <= f <= 1 or amount.isdigit()):
                    raise ValueError
            except ValueError:
                raise DataError(f"{spec}: the amount after ':' must be a fraction (0 to 1) or a row count") from None
            k = int(f * len(got)) if f <= 1 else int(amount)  # rounded down, as open-instruct's int(frac * len)
            if k > len(got):  # Tülu's mixer also refuses to invent rows
                raise DataError(f"{spec}: asks for {k} rows, the file has {len(got)} usable rows")
            if k == 0:
                raise DataError(f"{spec}: takes no row (the file has {len(got)} usable rows)")
            got = got[:k]
        rows += got
    if encode is None:
        return [x for _, x in rows], skipped
    rows, bad = encode_rows(rows, encode, skip_bad)
    return rows, skipped + bad


def encode_rows(rows, encode, skip_bad, block=4096):
    """[(where, row)] -> ([encode(row)] in order, n_skipped). Tokenization is the slow part of loading (about
    1 ms for a GSM8K-sized conversation on a CPU thread: 15 minutes or more for Tülu 3's 939k), so each rank encodes
    every world-th row of a block of them, and every rank gets every result (a collective; a block at a time,
    which bounds the memory of the exchange). A ValueError from encode makes its row bad, the same on every
    rank: named by file:line, or with skip_bad skipped and counted."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_dist() else (0, 1)
    out, skipped = [], 0
    bar = tqdm(total=len(rows), desc="tokenizing", unit=" rows", disable=not is_rank0(), leave=False)
    for s in range(0, len(rows), block * world):
        mine = []
        for where, x in rows[s + rank:s + block * world:world]:
            try:
                mine.append((True, encode(x)))
            except ValueError as e:
                mine.append((False, f"{where}: {e}"))
        parts = all_gather_object(mine)
        for k in range(sum(map(len, parts))):  # row s + k is rank k % world's (k // world)-th
            ok, x = parts[k % world][k // world]
            if not ok and not skip_bad:
                raise DataError(x)
            out += [x] if ok else []
            skipped += not ok
        bar.update(sum(map(len, parts)))
    bar.close()
    return out, skipped


# -----------------------------------------------------------------------------
# tokenization


def encode_sft(tok, msgs, max_len, truncate=True, cut=None):
    """-> (ids, labels) with labels = ids on assistant tokens, IGNORE elsewhere; None when the example
    is longer than max_len and truncate is False, or has no trained token left after truncation. When a
    list `cut` is given, the length of an example kept truncated is appended to it."""
    ids, mask = tokenize_conversation(tok, msgs)
    n = len(ids)
    if n > max_len:
        if not truncate:
            return None
        ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask[1:]):  # the first token is never a target
        return None
    if cut is not None and n > max_len:
        cut.append(n)
    return ids, [i if m else IGNORE for i, m in zip(ids, mask)]


def encode_prompt(tok, msgs):
    """Prompt token ids ending with the assistant header, for generation."""
    return tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))


# -----------------------------------------------------------------------------
# batches: inputs x, next-token targets y (IGNORE where nothing is trained)


def pad_batch(examples, pad_id, device="cpu"):
    """Right-padded: x, y (B, T). y[t] is the label of token t+1, so y = labels shifted left."""
    T = max(len(ids) for ids, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, (ids, labels) in enumerate(examples):
        x[b, :len(ids)] = torch.tensor(ids)
        y[b, :len(ids) - 1] = torch.tensor(labels[1:])
    return {"input_ids": x.to(device), "targets": y.to(device)}


def pack_batch(examples, device="cpu"):
    """Padding-free: all examples concatenated into one row (1, N) with position_ids restarting per
    document and doc_ids so that attention never crosses a document boundary. The last token of each
    document predicts nothing (its target is IGNORE), exactly as in the padded batch."""
    cat = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64))[None].to(device)  # noqa: E731
    return {"input_ids": cat([ids for ids, _ in examples]),
            "targets": cat([np.append(labels[1:], IGNORE) for _, labels in examples]),
            "position_ids": cat([np.arange(len(ids)) for ids, _ in examples]),
            "doc_ids": cat([np.full(len(ids), d) for d, (ids, _) in enumerate(examples)])}


def compact(ex):
    """(ids, labels) lists -> int32 arrays (None stays None), which pad_batch and pack_batch take as they are.
    Every rank holds every example: arrays take 8 bytes a token where lists of Python ints take ~46 (at 0.7B
    tokens, 6 GB a rank instead of 32)."""
    return None if ex is None else (np.asarray(ex[0], np.int32), np.asarray(ex[1], np.int32))


def epoch_order(n, epoch, seed):
    """A seeded permutation per epoch: the data order is a function of (seed, epoch), so a resumed
    run sees exactly the batches the uninterrupted run would have seen."""
    g = torch.Generator().manual_seed(seeded("order", seed, epoch))
    return torch.randperm(n, generator=g).tolist()
