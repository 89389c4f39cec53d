"""
Plumbing shared by sft.py, dpo.py and ppo_rlvr.py, written once: distributed setup and FSDP2,
loading a checkpoint onto the device mesh, AdamW + schedule, per-token log-probs through the fused
kernel, checkpoints that are written atomically and resume exactly, and metrics to metrics.jsonl.

One code path for 1 and N processes: under torchrun every rank runs the same lines; on a single
CPU process the model is a plain fp32 module (no process group), on CUDA it is always FSDP2-sharded
(at world size 1 too) so that the precision policy is the same everywhere:
params fp32 (master weights), compute in bf16, gradient reduction in fp32.
"""
import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import pickle
import random
import shutil
import tempfile
import warnings

import numpy as np
import torch
import torch.distributed as dist

from model import Llama, new_dir_beside, replace_dir

IGNORE = -100  # target id that is not trained on (prompt, user turns, padding)

# -----------------------------------------------------------------------------
# distributed


def init_distributed():
    """-> (rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a lone CUDA process still
    gets a 1-rank group so that it can use FSDP2 like the N-GPU run."""
    if "RANK" not in os.environ and torch.cuda.is_available():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(29500 + os.getpid() % 1000))
    if "RANK" in os.environ:
        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        # rank 0 alone reads the HF checkpoint (load_model) and writes the HF weights of a save (16 GB at 8B in
        # bf16, 140 GB at 70B, by one thread) while the other ranks wait in a collective; NCCL's default timeout
        # (10 minutes) would kill them first on a slow filesystem
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None, timeout=timeout())
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device("cpu")


def timeout():  # of every collective
    return datetime.timedelta(seconds=int(os.environ.get("NANOPOST_TIMEOUT_S", 3600)))


def is_dist():
    return dist.is_available() and dist.is_initialized()


def is_rank0():
    return not is_dist() or dist.get_rank() == 0


def print0(*args, **kw):
    if is_rank0():
        print(*args, **kw, flush=True)


def all_reduce(x, op="sum"):
    """Sum (or max) of a float/tensor over ranks; identity on one process. Every rank must call it."""
    t = torch.as_tensor(x, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t if torch.is_tensor(x) else t.item()


_cpu_group = None


def all_gather_object(obj):
    """-> [rank 0's obj, rank 1's, ...] ([obj] on one process). Every rank must call it. Over a gloo group: host
    objects (tokenized data) do not pass through GPU memory, as NCCL's object collectives would take them."""
    global _cpu_group
    if not is_dist():
        return [obj]
    if _cpu_group is None:  # (made by the first call, which every rank reaches: new_group is collective too)
        _cpu_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo",
                                                                                          timeout=timeout())
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, obj, group=_cpu_group)
    return got


def cleanup():
    global _cpu_group
    _cpu_group = None
    if is_dist():
        dist.destroy_process_group()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# model on the device: load, shard, and gather back


def load_model(path, device, requires_grad=True, grad_checkpoint=False, body_only=False, compile=False,
               weights=True):
    """Loads an HF checkpoint for training. CPU single process: fp32 module. CUDA / torchrun: built on
    the meta device, FSDP2-sharded per block and at the root, then filled from rank 0's full state
    dict by broadcast, so no rank ever holds a second full copy on the GPU; frozen (requires_grad=False), in
    the compute dtype. body_only: no output projection (a value model's body; see Llama.from_pretrained).
    compile: Llama.compile_blocks. weights=False: the config's module with its parameters unset (uninitialised
    memory), for a resume, whose load_train_state fills them with the fp32 master weights the safetensors are a
    copy of (reading those too costs rank 0 16 GB of reads and a broadcast at 8B, for nothing)."""
    if not is_dist():
        model = read_checkpoint(Llama.from_pretrained, path, device=device, dtype=torch.float32, body_only=body_only,
                                weights=weights)
        if not weights:
            model.to_empty(device=device)
        if compile:
            model.compile_blocks()
        model.grad_checkpoint = grad_checkpoint
        return model.requires_grad_(requires_grad)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    full = None
    if dist.get_rank() == 0:
        full = read_checkpoint(Llama.from_pretrained, path, device="cpu", body_only=body_only, weights=weights)
    obj = [full.cfg if full is not None else None]
    dist.broadcast_object_list(obj, src=0)  # the config is small: every rank builds the same module
    with torch.device("meta"):
        model = Llama(obj[0], body_only=body_only)
    if compile:
        model.compile_blocks()
    mp = mp_policy(device)
    if not requires_grad and mp.param_dtype is not None:
        # a frozen model (PPO's reference) takes no optimizer step, so it keeps no fp32 master weights: it is
        # stored as it computes (bf16 on CUDA), the same forward in half the memory (2 GB a GPU at 8B on 8)
        model.to(mp.param_dtype)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)
    if weights:
        sd = full.state_dict() if full is not None else {}
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    model.grad_checkpoint = grad_checkpoint
    return model.requires_grad_(requires_grad)


def mp_policy(device):
    """FSDP2's precision: bf16 compute and fp32 gradient reduction on CUDA (fp32 params); CPU/gloo: plain fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if device.type != "cuda":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def read_checkpoint(load, path, **kw):
    """load(path, **kw) (Llama.from_pretrained, Tokenizer.from_pretrained, ...), with a missing or broken
    checkpoint reported as the one sentence its error already is, not a traceback."""
    try:
        return load(path, **kw)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def check_out(path, swapped=True):
    """Refuses, before any work, an --out that exists as a file (the checkpoint is a directory, made if
    missing), that holds the working directory (a save swaps the whole directory), or that this process
    cannot write: a checkpoint is written beside `path` and swapped in, so its parent must take a new
    directory, and the run's logs go into `path` (swapped=False: files written into `path` only, as eval's).
    Found otherwise, that is at the first save or log line, after the data, the sampling, the evaluation."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: --out {path} is a file; it must be a directory (made if missing)")
    here, out = os.path.realpath(os.getcwd()), os.path.realpath(path)
    if here == out or here.startswith(out.rstrip(os.sep) + os.sep):
        raise SystemExit(f"error: --out {path} is, or holds, the working directory; a save replaces it whole: "
                         "give the run a directory of its own")
    where = [out] if os.path.isdir(out) else []
    if swapped or not where:
        where.append(os.path.dirname(out))  # (a symlinked --out: its target's, where the save swaps)
    for at in where:
        while not os.path.lexists(at):  # the nearest part of the path that exists: the one a makedirs writes in
            at = os.path.dirname(at)
        try:
            if not os.path.isdir(at):
                raise NotADirectoryError(f"{at} is a file")
            tempfile.TemporaryDirectory(dir=at, prefix=".write-test-").cleanup()  # leaves nothing behind
        except OSError as e:
            why = f"{e.strerror} in {at}" if e.strerror else str(e)
            raise SystemExit(f"error: cannot write {path} ({why}); give --out a directory this process can write")


def full_state_dict(model):
    """The full (unsharded) state dict on CPU, on rank 0 (other ranks get {}). Collective under FSDP."""
    if not is_dist():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def reshard(model):
    """After forwards without a backward (a frozen reference, a no-grad pass): FSDP2 keeps the root's parameters
    (embeddings, output projection, final norm: 2.1 GB in bf16 at Llama-3-8B's 128k vocabulary) gathered on
    every rank until a backward reshards them, which a frozen model never runs; an optimizer built meanwhile
    would hold those temporary tensors instead of the shards. A plain module (one process) has nothing to do."""
    if hasattr(model, "reshard"):
        model.reshard()


# -----------------------------------------------------------------------------
# optimizer and schedule


def positive(s):
    """argparse type of a count flag (steps, batch sizes, token limits): one sentence for 0, -3, 2.5 or x."""
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {s!r}")
    return int(s)


def count(s):
    """argparse type of a count flag where 0 means none (--eval-n)."""
    if not s.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {s!r}")
    return int(s)


def number(lo=-math.inf, hi=math.inf, above=False):
    """argparse type of a real-valued flag within [lo, hi] ((lo, hi] when `above`): a learning rate of -1, a
    beta of 0 that a loss divides by, a fraction of 1.5 are one sentence at the command line, not a crash
    (or a silently wrong run) later."""
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not ((v > lo if above else v >= lo) and v <= hi and math.isfinite(v)):  # nan fails too
            want = [f"> {lo:g}" if above else f">= {lo:g}"] * (lo > -math.inf) + [f"<= {hi:g}"] * (hi < math.inf)
            raise argparse.ArgumentTypeError(f"expected a {'number ' + ' and '.join(want) if want else 'finite number'}"
                                             f", got {s!r}")
        return v
    return parse


def max_norm(s):
    """argparse type of --grad-clip: 0 (or less) is no clipping, an infinite max norm (clip_grad_norm_ with 0
    would zero every gradient)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    return v if v > 0 else math.inf


def add_optim_args(p):
    """The optimizer, schedule and checkpoint flags that sft.py, dpo.py and ppo_rlvr.py share; each
    script's preset fills the ones left at None."""
    p.add_argument("--lr", type=number(0), default=None)
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default=None)
    p.add_argument("--warmup-ratio", type=number(0, 1), default=None)
    p.add_argument("--weight-decay", type=number(0), default=0.0)
    # 1.0 is what Tülu 3's runs clipped at: open-instruct's own --clip_grad_norm is off (-1), but its DeepSpeed
    # config says "gradient_clipping": "auto", which accelerate's _prepare_deepspeed fills with 1.0
    p.add_argument("--grad-clip", type=max_norm, default=1.0,
                   help="max global gradient norm (0: off; the norm is logged either way)")
    # None until the script's preset fills it: ppo_rlvr.py's tulu3-8b turns it on (two 8B graphs of up to 8192 tokens)
    p.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in backward (default: the preset's)")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (training "
                   "forward and backward; generation stays eager)")
    p.add_argument("--save-every", type=count, default=None, help="checkpoint every N steps (0: only at the end; "
                   "default: the preset's, 100 in ppo_rlvr.py's tulu3-8b as Tülu 3's RLVR run, else 0)")
    p.add_argument("--save-dtype", choices=["fp32", "bf16"], default=None)


def add_data_args(p, prompts_help="RLVR JSONL scored for held-out accuracy at the end"):
    """--skip-bad and the held-out evaluation flags, which the three scripts share; the preset fills
    --eval-max-new-tokens and --eval-batch-size (check_data_args: before it does)."""
    p.add_argument("--skip-bad", action="store_true",
                   help="skip and count malformed --data rows instead of stopping (--eval-prompts is read whole)")
    p.add_argument("--eval-prompts", default=None, help=prompts_help)
    p.add_argument("--eval-n", type=count, default=None, help="score only the first N held-out prompts (0: none)")
    p.add_argument("--eval-max-new-tokens", type=positive, default=None, help="greedy tokens per held-out prompt "
                   "(default: 64 tiny; 512 tulu3-8b, GSM8K's in Tülu 3's evaluation: MATH's is 1024, IFEval's 2048)")
    # the KV cache of a batch sits beside the training state: at 8B, 256 prompts of ~1k tokens + 512 new ones
    # are ~48 GB (128 KiB per token), 64 are ~12 GB
    p.add_argument("--eval-batch-size", type=positive, default=None,
                   help="held-out prompts per generation batch, per rank (default: 256 tiny, 64 tulu3-8b)")


def check_data_args(args):
    """Refuses add_data_args's flags where they would do nothing (said, not silently ignored). Before the preset
    fills the held-out ones."""
    if args.skip_bad and args.data is None:
        raise SystemExit("error: --skip-bad skips the bad rows of --data; the built-in tasks have none")
    given = [k for k in ("eval_n", "eval_max_new_tokens", "eval_batch_size") if getattr(args, k)]  # (--eval-n 0: none)
    if given and args.data is not None and args.eval_prompts is None:
        raise SystemExit(f"error: --{given[0].replace('_', '-')} sets the held-out evaluation, and with --data there "
                         "is none without --eval-prompts")


def build_optimizer(model, lr, weight_decay=0.0):
    """AdamW with torch's betas (0.9, 0.999) and eps 1e-8 (open-instruct keeps them too); no decay on norms
    and biases (1-D tensors), as is customary."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def clip_grad_norm(model, max_norm):
    """Clips the gradients' global norm; -> the norm before clipping, a float (whole under FSDP: collective)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item()


def plan_steps(n, args, world, what="examples"):
    """-> (accum, steps_per_epoch, total, warmup) for n rows, --batch-size rows per optimizer step over
    all ranks, --micro-batch-size rows per forward per rank, --epochs and --max-steps."""
    B = args.batch_size
    mB = args.micro_batch_size = min(args.micro_batch_size, max(1, B // world))  # a small batch: no accumulation
    if B % (mB * world):
        raise SystemExit(f"error: --batch-size {B} must be a multiple of --micro-batch-size {mB} x world size {world}")
    steps_per_epoch = n // B
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {n} {what} is fewer than one batch of {B}")
    # rounded up, but 1.1 x 100 is 110.00000000000001 in floating point: 110 steps, not 111
    total = min(math.ceil(round(args.epochs * steps_per_epoch, 9)), args.max_steps or 10**12)
    return B // (mB * world), steps_per_epoch, total, int(args.warmup_ratio * total)


def lr_at(step, total, lr, warmup, kind="linear"):
    """Linear warmup over `warmup` steps, then linear or cosine decay to 0 at `total`, or constant."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if kind == "constant":
        return lr
    frac = (step - warmup) / max(1, total - warmup)
    return lr * max(0.0, 1 - frac) if kind == "linear" else lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


# -----------------------------------------------------------------------------
# log-probs of target tokens from the final hidden states, never a full fp32 (B, T, V)


def token_logprobs(model, input_ids, targets, temperature=1.0, **fw):
    """log p(targets[b, t] | input_ids[b, :t+1]) under softmax(logits / temperature), as (B, T) fp32; 0 where
    targets == IGNORE (with return_lsq=True, also WPO's log sum_v p_v^2 (B, T): see Llama.forward). The output
    projection and log-softmax are fused (kernels/): on CUDA a Triton kernel that streams over the vocabulary,
    on the CPU a chunked PyTorch reference. Computed inside the model's forward, where FSDP2 has the output
    projection unsharded."""
    return model(input_ids, targets=targets, temperature=temperature, **fw)


# -----------------------------------------------------------------------------
# checkpoints: the output directory is itself an HF checkpoint plus train_state.pt and train_state/


def save_checkpoint(out, model, tokenizer, optimizer=None, state=None, dtype=None, others=None):
    """Writes `out` as an HF checkpoint (config, safetensors, tokenizer) plus, for resuming, train_state/ (the
    fp32 master weights and Adam moments of `model` and of `others`, {name: (module, optimizer)}: PPO's value
    model) and train_state.pt (`state`: step, args, ...; no RNG state: the data order and every sample come from
    generators seeded by --seed with the step or rank, so a resumed run needs none). train_state/ is written by
    torch.distributed.checkpoint, every rank its own shards in parallel (at 8B ~96 GB that no rank gathers; a
    resume reshards them to its world size); only the HF weights are gathered, on rank 0. Atomic: everything is
    written to a temp dir that replace_dir swaps in whole, so a crash mid-save leaves the last good checkpoint; the
    other files in `out` go along (the run's metrics.jsonl, DPO's pairs.jsonl, PPO's start_eval.json;
    resume() clears an earlier run's eval.json on a fresh start). Collective under FSDP: every rank must
    call it, and --out must be on a filesystem every rank sees."""
    import torch.distributed.checkpoint as dcp
    sd = full_state_dict(model)
    tmp = [new_dir_beside(out) if is_rank0() else None]
    if is_dist():
        dist.broadcast_object_list(tmp, src=0)  # made by rank 0 before any rank writes into it
    tmp = tmp[0]
    try:
        if optimizer is not None:
            modules = {"model": (model, optimizer), **(others or {})}
            with single_process_quiet():
                dcp.save(sharded_state(modules), checkpoint_id=os.path.join(tmp, "train_state"), no_dist=not is_dist())
        if is_rank0():
            model.save_pretrained(tmp, state_dict=sd, dtype=dtype, atomic=False)
            tokenizer.save_pretrained(tmp)
            if optimizer is not None:
                torch.save({**(state or {}), "sharded": sorted(modules)}, os.path.join(tmp, "train_state.pt"))
            replace_dir(tmp, out)
    except BaseException:
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_dist():
        dist.barrier()  # nobody reads the checkpoint before it is complete


def sharded_state(modules):
    """{name: {"model": ..., "optimizer": ...}} for each name: (module, optimizer) of `modules`: the state dicts as
    this rank holds them (its DTensor shards under FSDP, whole tensors on one process), keyed by parameter name
    on 1 process as on N, and sharing storage with the module and optimizer (torch.distributed.checkpoint's
    load fills them in place; set_state_dict then gives the optimizer its state)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    return {name: dict(zip(("model", "optimizer"), get_state_dict(m, o))) for name, (m, o) in modules.items()}


@contextlib.contextmanager
def single_process_quiet():
    # torch.distributed.checkpoint warns on every call without a process group that it "assumes" one process; and
    # it logs to the root logger, with a traceback each, every failed attempt at a missing or damaged .metadata
    # (on every rank) before it raises the error that load_train_state turns into one sentence
    def not_dcp(record):
        return record.name != "root" or os.path.join("distributed", "checkpoint", "") not in record.pathname
    root = logging.getLogger()
    root.addFilter(not_dcp)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            yield
    finally:
        root.removeFilter(not_dcp)


_claims = {}  # lock file -> its open file, held for the life of the process (closing any fd on it drops the lock)


def claim_out(out):
    """Refuses a second run writing to `out` while another still is (rank 0 holds a POSIX lock on .<name>.lock
    beside it until it exits, SIGKILL included). Under torchrun a launcher killed with SIGKILL leaves its workers
    running on (torchrun starts them in sessions of their own): a --resume started then trained, saved and logged
    into the same directory beside them (metrics.jsonl with steps twice and out of order, saves racing on the one
    .<name>.tmp). Collective: every rank must call it, before find_checkpoint. A filesystem without locks claims
    nothing."""
    import errno
    import fcntl
    busy = 0.0
    if is_rank0():
        path = os.path.realpath(out)
        lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
        try:
            os.makedirs(os.path.dirname(lock), exist_ok=True)  # (and where DPO's reference cache goes, beside out)
            f = _claims.get(lock) or open(lock, "a")
            _claims[lock] = f
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (the same process may claim again: a lock is per process)
        except OSError as e:
            busy = float(e.errno in (errno.EACCES, errno.EAGAIN))
    if all_reduce(busy, op="max"):
        raise SystemExit(f"error: another run is still writing to {out} (a torchrun killed with SIGKILL leaves its "
                         "workers running): stop it first, then --resume")


def find_checkpoint(out):
    """The directory to resume from (`out`, resolved), or None. A crash between replace_dir's two renames leaves
    the last checkpoint (in a first save: the run's logs and whatever else `out` held) only in out.old: it is
    moved back first (by rank 0), so the run's logs go on in place; left there, the next save would delete it.
    `out` is resolved as new_dir_beside and replace_dir resolve it (a symlink's target; "a/link/../sft" is where
    the link leads, not "a/sft"), not lexically: "out/sft/" is "out/sft", whose last checkpoint may be in
    out/sft.old."""
    def complete(d):
        return os.path.isfile(os.path.join(d, "train_state.pt")) and os.path.isfile(os.path.join(d, "config.json"))
    out = os.path.realpath(out)
    if not os.path.exists(out) and os.path.isdir(out + ".old") and is_rank0():
        os.rename(out + ".old", out)  # only replace_dir makes a .old, and it deletes it once `out` is back
    if is_dist():
        dist.barrier()
    return out if complete(out) else None


def read_train_state(ckpt):
    """ckpt/train_state.pt: the saved run's step, args, stage, ... (small: the tensors are in train_state/)."""
    path = os.path.join(ckpt, "train_state.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        why = str(e).splitlines()[0].split(". ")[0]  # (torch's for a file cut short goes on about miniz)
        raise SystemExit(f"error: {path} cannot be read ({why}): the checkpoint is damaged; "
                         f"run without --resume, or put back a copy of {ckpt}") from None


def load_train_state(ckpt, model, optimizer, others=None):
    """Restores the fp32 master weights and the optimizer of `model` (and of `others`, {name: (module,
    optimizer)}) from ckpt/train_state/, each rank its own shards (collective under FSDP; any world size);
    returns train_state.pt's state. The optimizers take the saved moments and step counts but keep this run's
    hyperparameters (--weight-decay, betas, lr, fused: their param groups' flags), as the resume message says
    the flags are in effect from here."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    st = read_train_state(ckpt)
    path = os.path.join(ckpt, "train_state")
    modules = {"model": (model, optimizer), **(others or {})}
    flags = {name: [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
             for name, (_, o) in modules.items()}
    tree = sharded_state(modules)
    try:
        if not os.path.isdir(path) and "optimizer" in st:  # (not damaged: the whole state pickled in train_state.pt)
            raise SystemExit(f"error: {ckpt} was saved by an earlier nanopost (its optimizer state is in "
                             "train_state.pt, not in train_state/): resume it with that version, or run without "
                             "--resume")
        if not os.path.isdir(path):
            raise FileNotFoundError("no such directory")
        if not os.path.isfile(os.path.join(path, ".metadata")):  # (a copy made with train_state/*: no dot files)
            raise FileNotFoundError("no .metadata in it")
        with single_process_quiet():
            dcp.load(tree, checkpoint_id=path, no_dist=not is_dist())
    except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001  (the latter: a BaseException)
        if isinstance(e, dcp.api.CheckpointException):  # the first failing rank's own exception
            e = next(iter(e.failures.values()))[0]
        # its first sentence: torch's for a shard cut short goes on with four more about miniz and corrupted files
        why = " ".join([type(e).__name__ + ":"] + [ln.split(". ")[0] for ln in str(e).strip().splitlines()[:1]])
        raise SystemExit(f"error: {path} cannot be read ({why}): the checkpoint is damaged; run without --resume, "
                         f"or put back a copy of {ckpt}") from None
    for name, (m, o) in modules.items():
        set_state_dict(m, o, model_state_dict=tree[name]["model"], optim_state_dict=tree[name]["optimizer"])
        for g, f in zip(o.param_groups, flags[name]):
            g.update(f)
    return st


def fingerprint(ckpt, whole=64 * 2**20, blocks=64, block=64 * 2**10):
    """A hash of the weights of HF checkpoint `ckpt`: config.json and every *.safetensors file, read whole up to
    `whole` bytes, past that its size, header (names, shapes, offsets) and `blocks` evenly spaced blocks of
    `block` bytes (4 MiB of a 16 GB file: a training step moves nearly every weight, so a retrained checkpoint
    differs in them). The same wherever the checkpoint is copied to, unlike its files' times."""
    h = hashlib.sha256()
    for f in sorted(os.listdir(ckpt)):
        if not (f.endswith(".safetensors") or f == "config.json"):
            continue
        path = os.path.join(ckpt, f)
        size = os.path.getsize(path)
        h.update(f"|{f}:{size}|".encode())
        with open(path, "rb") as fh:
            if size <= whole:
                h.update(fh.read())
                continue
            n = int.from_bytes(fh.read(8), "little")  # safetensors: a u64 header length, then the JSON header
            h.update(fh.read(min(n, whole)))
            for k in range(blocks):
                fh.seek(8 + n + max(0, size - 8 - n - block) * k // (blocks - 1))
                h.update(fh.read(block))
    return h.hexdigest()


def start_run(out, resume, stage, ref=None):
    """The start of a run into `out`, collective: claims `out` (claim_out), finds the checkpoint to go on from
    when `resume` (find_checkpoint), and refuses, before any work, a start that would train on from the wrong
    weights. -> (the checkpoint to resume or None, fingerprint(ref) for the run's saved state ("start") or None
    without a reference).
    - the checkpoint found must have been saved by this script (`stage`: "sft", "dpo" or "rlvr", recorded
      in train_state.pt; one saved before it was recorded passes): `dpo.py --resume --out out/sft` would take the
      SFT run's weights, Adam moments and step for its own and train on under another objective.
    - `ref`, the run's KL reference (DPO's and PPO's --ckpt; None for SimPO or PPO without a KL term): --out must
      not be it, however spelled (the first save would replace the reference with the policy), and on --resume it
      must still be the checkpoint the run started from: it is read again from --ckpt, and one retrained (or
      replaced) in place since would pull the resumed policy toward another model than the one it left."""
    claim_out(out)  # no other run writing to it meanwhile
    resumed = find_checkpoint(out) if resume else None
    if resume and resumed is None:
        print0(f"--resume: no checkpoint in {out}, starting fresh")
    saved = read_train_state(resumed) if resumed else {}
    if saved.get("stage", stage) != stage:
        raise SystemExit(f"error: --resume: the checkpoint in {out} was saved by the {saved['stage']} stage, not by "
                         f"{stage}; give this run an --out of its own (another stage's output goes in --ckpt)")
    if ref is not None and os.path.realpath(out) == os.path.realpath(ref):
        raise SystemExit(f"error: --out {out} is --ckpt {ref}, this run's reference: a save would overwrite it; "
                         "give the run an --out of its own")
    if resumed is None:
        # a fresh run: the earlier run's checkpoint in `out` goes now, not at this run's first write: a kill in
        # between (loading, tokenizing, DPO's reference pass: hours at 8B) left it resumable, and --resume then
        # went on from the other run's weights and step instead of starting this run afresh
        forget_checkpoint(out)
    if ref is None:
        return resumed, None
    fp = fingerprint(ref)
    if saved.get("start", fp) != fp:
        raise SystemExit(f"error: {ref} is not the checkpoint the run in {out} started from (its weights have "
                         "changed since), and it is this run's reference; pass the one it started from as --ckpt, "
                         "or start afresh without --resume")
    return resumed, fp


def resume(resumed, out, model, optimizer, args, total, others=None):
    """The saved state to continue from: load_train_state's when `resumed` is a checkpoint (refused past this
    run's `total` steps; the flags that differ from the saved run's `args` are listed), {"step": 0} for a
    fresh run. Either way the metrics rows logged at or after that step are dropped: they are about to be
    redone (all of them, for a fresh run, which also drops an earlier run's evaluations)."""
    st = load_train_state(resumed, model, optimizer, others) if resumed else {"step": 0}
    if resumed:
        print0(f"resumed from {resumed} at step {st['step']}")
        if st["step"] > total:
            raise SystemExit(f"error: the checkpoint in {out} is at step {st['step']}, past this run's {total} steps")
        saved = st.get("args", {})
        changed = [f"--{k.replace('_', '-')} {v} (saved: {saved[k]})" for k, v in vars(args).items()
                   if k in saved and saved[k] != v and k != "resume"]
        if changed:  # as the flags say from here on (data order, schedule, ...): said, not silent
            print0("--resume: flags that differ from the saved run's, in effect from here: " + ", ".join(changed))
        if st["step"] < total and is_rank0():
            # a finished run resumed for more steps: its eval.json scores weights about to change, and a save
            # would carry it along beside the new ones (a later stage would take it as its starting accuracy,
            # pipeline.py as this stage's); the run writes its own at the end
            if os.path.isfile(os.path.join(out, "eval.json")):
                os.remove(os.path.join(out, "eval.json"))
    elif is_rank0():  # an earlier run's results in this directory are not this run's (its checkpoint: start_run)
        for f in ("eval.json", "start_eval.json"):
            if os.path.isfile(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
        shutil.rmtree(os.path.join(out, "eval"), ignore_errors=True)  # eval/*.py's outputs for an earlier model
    trim_metrics(out, st["step"])
    return st


def forget_checkpoint(out):
    """At a fresh run's start (start_run, rank 0): the earlier run's checkpoint in `out` stops being resumable (its
    train_state.pt and train_state/ go; the weights stay). The fresh run restarts the log (resume ->
    trim_metrics) and DPO rewrites pairs.jsonl, so a kill before this run's first save must not leave `out`
    resumable at the earlier run's step: --resume would go on from another run's weights, with the log missing
    the steps between, or with this run's pairs; it starts afresh instead, as the killed run did."""
    if not is_rank0():
        return
    for d in (out, os.path.realpath(out) + ".old"):  # (.old: find_checkpoint moves it back)
        if os.path.isfile(os.path.join(d, "train_state.pt")):
            os.remove(os.path.join(d, "train_state.pt"))
        shutil.rmtree(os.path.join(d, "train_state"), ignore_errors=True)


def make_out(out):
    """Makes the output directory if missing (check_out's promise): for a symlink, its target, as the saves resolve
    it (os.makedirs of a link whose target is not there yet raises FileExistsError, after the work it follows)."""
    os.makedirs(os.path.realpath(out), exist_ok=True)


def log_metrics(out, row):
    """Appends one JSON line to out/metrics.jsonl (rank 0)."""
    if not is_rank0():
        return
    make_out(out)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def trim_metrics(out, step):
    """Drops the rows of out/metrics.jsonl logged at or after `step` (rank 0): a run resumed at `step`
    is about to redo them, and a fresh run (step 0) starts a new log."""
    path = os.path.join(out, "metrics.jsonl")
    if not is_rank0() or not os.path.isfile(path):
        return
    def before(ln):  # a line cut short by a kill, or that is not a row with a step, is dropped
        try:
            return json.loads(ln)["step"] < step
        except (json.JSONDecodeError, KeyError, TypeError):
            return False
    with open(path) as f:
        keep = [ln for ln in f if before(ln)]
    tmp = path + ".tmp"  # written beside, then swapped in: a crash or a full disk mid-write leaves the whole log
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def write_json(path, obj):
    if not is_rank0():
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# held-out accuracy: greedy generation scored by the verifiers


@torch.no_grad()
def evaluate(model, tok, rows, max_new_tokens=64, batch_size=256, desc="eval", predictions=None):
    """Greedy-decodes every RLVR row's prompt and scores it with verifiers.verify.
    -> {"accuracy", "n", "per_task": {dataset: {"accuracy", "n"}}, "max_new_tokens", "prompts": prompts_key(rows)}
    (the last two tell earlier_eval what was scored). Rows are split rank-strided;
    generation runs in lockstep across ranks; the counts are summed over ranks.
    predictions: a list that gets this rank's (index into rows, response, score) per row."""
    from data import encode_prompt
    from model import generate
    from verifiers import verify
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_dist() else (0, 1)
    mine = rows[rank::world]
    was_training = model.training
    model.eval()
    prompts = [encode_prompt(tok, r["messages"]) for r in mine]
    outs, _ = generate(model, prompts, max_new_tokens, temperature=0.0, eos_token_ids=tok.eos_token_ids,
                       batch_size=batch_size)
    model.train(was_training)
    names = sorted({r["dataset"] for r in rows})
    score = torch.zeros(len(names), 2, dtype=torch.float64)  # (correct, n) per dataset
    for i, r, out in zip(range(rank, len(rows), world), mine, outs):
        text = tok.decode(out, skip_special_tokens=True)
        s = verify(r["dataset"], text, r["ground_truth"])
        score[names.index(r["dataset"])] += torch.tensor([s, 1.0])
        if predictions is not None:
            predictions.append((i, text, s))
    score = all_reduce(score)
    per = {n: {"accuracy": (c / max(k, 1)).item(), "n": int(k)} for n, (c, k) in zip(names, score)}
    total = score.sum(0)
    return {"accuracy": (total[0] / max(total[1], 1)).item(), "n": int(total[1]), "per_task": per,
            "max_new_tokens": max_new_tokens, "prompts": prompts_key(rows)}


def prompts_key(rows):
    """Fingerprint of held-out RLVR rows (messages, answers, datasets): which prompts an eval.json scored."""
    blob = json.dumps([[r["messages"], r["ground_truth"], r["dataset"]] for r in rows], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def earlier_eval(path, rows, max_new_tokens):
    """The evaluation saved at `path` (a stage's eval.json) if it scored exactly these rows with this many new
    tokens, else None: a later stage takes its starting point's accuracy from it instead of decoding again."""
    if not os.path.isfile(path):
        return None
    got = json.load(open(path))
    return got if got.get("prompts") == prompts_key(rows) and got.get("max_new_tokens") == max_new_tokens else None
