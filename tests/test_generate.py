"""
The generation engine (model.generate) against full forwards, transformers' greedy generate, and the
softmax it claims to sample from.

    python -m pytest tests/test_generate.py -v
"""
import math
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import Llama, LlamaConfig, decode_step, generate, prefill

# prompts of different lengths (ids < 251, the smallest vocabulary below)
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42] * 6, [200], [17, 3, 99, 250, 8]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread avoids OpenMP overhead (10x on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["llama3", "llama2", "qwen2"])
def pair(request, tmp_path_factory):
    """(our model, transformers' model) with the same random weights: a GQA Llama, a Llama 2 without GQA (a
    masked decode step takes another attention branch) and a Qwen2."""
    from test_model import make_hf  # imports transformers: not at module level, so that the
    path = str(tmp_path_factory.mktemp(request.param))  # FSDP worker processes start fast
    hf = make_hf(request.param, path)
    return Llama.from_pretrained(path).eval(), hf


def full_logits(model, prompt, new):
    """(len(new), V) fp32 logits that predicted each new token, from one uncached forward."""
    x = torch.tensor([prompt + new], device=model.lm_head_weight.device)
    return model(x)[0, len(prompt) - 1:len(prompt) + len(new) - 1].float()


def truncated_logp(logits, temperature, top_k=0, top_p=1.0):
    """Reference for the sampled-from distribution, in float64 and written independently of sample():
    log_softmax(logits / T) restricted to the top-k / top-p set and renormalised. (N, V) -> (N, V)."""
    z = logits.double() / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k:
        keep &= z >= z.topk(top_k, dim=-1).values[:, -1:]
    if top_p < 1:  # on the top-k-truncated distribution, as transformers applies them in turn
        p = z.masked_fill(~keep, float("-inf")).softmax(-1)
        for r in range(z.shape[0]):  # walk down the ranking until the mass reaches top_p
            order, mass = p[r].argsort(descending=True), 0.0
            for j, v in enumerate(order.tolist()):
                if mass >= top_p:
                    keep[r, order[j:]] = False
                    break
                mass += p[r, v].item()
    return z.masked_fill(~keep, float("-inf")).log_softmax(-1)


@torch.no_grad()
def test_cached_decoding_equals_full_forward(pair):
    """Prefill + one-token decode steps over a left-padded batch give the full forward's logits."""
    model, _ = pair
    new = [[(7 * i + 3 * j) % 251 for j in range(6)] for i in range(len(PROMPTS))]  # fixed continuations
    S = max(map(len, PROMPTS)) + 6
    logits, st = prefill(model, PROMPTS, S)
    steps = [logits]
    for j in range(5):
        st["tok"].copy_(torch.tensor([n[j] for n in new]))
        steps.append(decode_step(model, st))
    cached = torch.stack(steps, 1)                                       # (B, 6, V)
    for i, p in enumerate(PROMPTS):
        ref = full_logits(model, p, new[i])
        assert (cached[i] - ref).abs().max().item() <= 1e-5, f"prompt {i}"


@torch.no_grad()
def test_greedy_equals_transformers(pair):
    model, hf = pair
    P, N = max(map(len, PROMPTS)), 16
    ids = torch.zeros(len(PROMPTS), P, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):  # transformers wants left padding plus an attention mask
        ids[i, P - len(p):], attn[i, P - len(p):] = torch.tensor(p), 1
    hf.generation_config.eos_token_id = None
    ref = hf.generate(ids, attention_mask=attn, max_new_tokens=N, do_sample=False, pad_token_id=0)
    ref = ref[:, P:].tolist()
    tokens, logprobs = generate(model, PROMPTS, N, temperature=0)
    assert tokens == ref
    # batches of 2 (sorted by length, then put back in order) give the same answer
    assert generate(model, PROMPTS, N, temperature=0, batch_size=2)[0] == ref
    # greedy logprobs are those of the untempered softmax
    for p, new, lp in zip(PROMPTS, tokens, logprobs):
        want = full_logits(model, p, new).log_softmax(-1).gather(-1, torch.tensor(new)[:, None])[:, 0]
        assert (torch.tensor(lp) - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 20, 1.0),
                                                     (1.3, 0, 0.8), (1.0, 10, 0.5)])
@torch.no_grad()
def test_logprobs_equal_full_forward(pair, temperature, top_k, top_p):
    """Each returned logp is the full forward's log-probability of that token under the (truncated,
    renormalised) distribution, and every sampled token lies in the kept set."""
    model, _ = pair
    tokens, logprobs = generate(model, PROMPTS, 12, temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    for p, new, lp in zip(PROMPTS, tokens, logprobs):
        assert len(new) == len(lp) == 12
        ref = truncated_logp(full_logits(model, p, new), temperature, top_k, top_p)
        want = ref.gather(-1, torch.tensor(new)[:, None])[:, 0]
        assert torch.isfinite(want).all(), "a token outside the top-k/top-p set was sampled"
        assert (torch.tensor(lp, dtype=torch.float64) - want).abs().max().item() <= 1e-5
        if top_k:
            assert (ref > float("-inf")).sum(-1).le(top_k).all()


# ---- sampling frequencies


def chi2_bound(df, z=4.75):
    """Upper (1 - 1e-6) quantile of chi-square(df), Wilson-Hilferty approximation (z = 4.75 sigma)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts, p):
    """Pearson statistic and degrees of freedom; tokens with expected count < 5 are pooled into one
    cell (so the chi-square approximation holds); tokens with p = 0 must never occur."""
    n = counts.sum()
    assert counts[p == 0].sum() == 0, "sampled a token of probability 0"
    exp = n * p
    big = exp >= 5
    obs_cells = torch.cat([counts[big], counts[~big & (p > 0)].sum()[None]])
    exp_cells = torch.cat([exp[big], exp[~big & (p > 0)].sum()[None]])
    obs_cells, exp_cells = obs_cells[exp_cells > 0], exp_cells[exp_cells > 0]
    return ((obs_cells - exp_cells) ** 2 / exp_cells).sum().item(), len(exp_cells) - 1


@pytest.fixture(scope="module")
def small():
    """A 1-layer model over 16 tokens with peaked, non-uniform next-token distributions."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=16, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64))
    model.init_weights(std=0.3)
    return model.eval()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.7)])
@torch.no_grad()
def test_sampling_frequencies_match_softmax(small, temperature, top_k, top_p):
    """n independent draws (rows) of the first and second token follow the softmax: a chi-square test
    at false-alarm rate 1e-6 (the seed is fixed, so the test is deterministic), and a check that the
    same counts reject the wrong distribution (the untempered / untruncated one), so it has power."""
    n, prompt = 20000, [3, 1, 4, 1, 5]
    tokens, _ = generate(small, [prompt] * n, 2, temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    first = torch.tensor([t[0] for t in tokens])
    logits = full_logits(small, prompt, [0])                            # (1, V)
    p = truncated_logp(logits, temperature, top_k, top_p).exp()[0]
    stat, df = chi2(torch.bincount(first, minlength=16).double(), p)
    assert df > 0 and stat < chi2_bound(df), f"first token: chi2 {stat:.1f} on {df} df"
    if (temperature, top_k, top_p) != (1.0, 0, 1.0):                    # power: plain softmax is rejected
        q = logits.double().softmax(-1)[0]
        wrong, dfw = chi2(torch.bincount(first, minlength=16).double(), q.clamp(min=1e-12))
        assert wrong > chi2_bound(dfw)
    # second token (a decode step through the cache), given the most common first token
    a = first.bincount().argmax().item()
    second = torch.tensor([t[1] for t in tokens if t[0] == a])
    p2 = truncated_logp(full_logits(small, prompt + [a], [0]), temperature, top_k, top_p).exp()[0]
    stat, df = chi2(torch.bincount(second, minlength=16).double(), p2)
    assert df == 0 or stat < chi2_bound(df), f"second token: chi2 {stat:.1f} on {df} df"


# ---- stopping and reproducibility


@torch.no_grad()
def test_eos_included_nothing_after_early_stop(pair):
    model, _ = pair
    N = 16
    free, _ = generate(model, PROMPTS, N, temperature=1.0, seed=3)      # no EOS: all N tokens
    assert all(len(t) == N for t in free)
    # EOS ids: tokens every row samples within its first 6 steps (so all rows stop before N)
    eos = {t[min(5, i + 1)] for i, t in enumerate(free)}
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        tokens, logprobs = generate(model, PROMPTS, N, temperature=1.0, seed=3, eos_token_ids=eos)
    finally:
        hook.remove()
    for t, lp, f in zip(tokens, logprobs, free):
        first = min(j for j, x in enumerate(f) if x in eos)
        assert t == f[:first + 1] and len(lp) == len(t)                # EOS included, nothing after
    # early stop: one prefill + decode steps only until the last row's EOS (checked every step on CPU)
    assert len(calls) == max(map(len, tokens)) < N


@torch.no_grad()
def test_same_seed_same_samples(pair):
    model, _ = pair
    a = generate(model, PROMPTS, 10, seed=7)
    b = generate(model, PROMPTS, 10, seed=7)
    c = generate(model, PROMPTS, 10, seed=8)
    assert a == b and a[0] != c[0]


@torch.no_grad()
def test_batches_and_unseeded_calls_draw_fresh_noise(pair):
    # the copies of one prompt split over batches (PPO's n samples with --gen-batch-size < n) must not share
    # noise (a group of identical samples has no spread to learn from); seed=None is a fresh draw each call
    model, _ = pair
    tokens, _ = generate(model, [PROMPTS[0]] * 4, 12, temperature=1.0, seed=0, batch_size=1)
    assert len({tuple(t) for t in tokens}) == 4
    assert generate(model, PROMPTS[:1], 12)[0] != generate(model, PROMPTS[:1], 12)[0]


def test_top_p_boundary_as_transformers():
    # uniform probabilities 1/V make every cumulative sum exact: the kept set's size must be transformers'
    from transformers.generation.logits_process import TopPLogitsWarper

    from model import sample
    for V, top_p in [(4, 0.5), (8, 0.25), (8, 0.75), (4, 0.75), (8, 0.3)]:
        logits = torch.zeros(1, V)
        _, logp = sample(logits, 1.0, 0, top_p, torch.rand(1, V, generator=torch.Generator().manual_seed(0)))
        kept = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone())).sum().item()
        assert logp.item() == pytest.approx(-math.log(kept), abs=1e-6), (V, top_p, kept)


def test_zero_noise_on_the_only_kept_token_still_picks_it():
    # uniform_ returns exactly 0 about once in 2^24 draws; on the one token that top_k=1 (or a top_p that keeps
    # one token) leaves, the sample must still be that token, with logp 0 (not token 0 with logp -inf)
    from model import sample
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    u = torch.full((1, 4), 0.5)
    u[0, 2] = 0.0
    for kw in (dict(top_k=1), dict(top_p=0.9)):
        tok, logp = sample(logits, 1.0, u=u, **kw)
        assert (tok.item(), logp.item()) == (2, 0.0), kw


def test_bad_input(pair):
    model, _ = pair
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match=r"prompts\[0\] .* outside \[0, "):
        generate(model, [[1, 100000]], 4)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 4, top_p=0)


# ---- FSDP2: two CPU processes with gloo


def fsdp_worker(rank, world, path, init, prompts, kw, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = Llama.from_pretrained(path)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    res = generate(model, prompts[rank], **kw, seed=rank)
    # the model is usable (and sharded) afterwards: a plain forward still agrees across ranks
    x = torch.tensor([[1, 2, 3]])
    torch.save(dict(res=res, calls=len(calls), logits=model(x)), f"{out}.{rank}")
    dist.destroy_process_group()


def test_fsdp_lockstep(tmp_path):
    """Rank 0 holds 3 prompts (2 batches) that hit EOS early, rank 1 one long-running prompt (1 batch):
    both ranks still run the same number of forwards, and each gets what 1 process would."""
    from test_model import make_hf
    path = str(tmp_path / "m")
    make_hf("llama3", path)
    model = Llama.from_pretrained(path).eval()
    prompts = [[[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [200]], [[17, 3, 99, 250, 8, 4, 4]]]
    base = dict(max_new_tokens=12, temperature=1.0, batch_size=2)
    free = [generate(model, prompts[r], **base, seed=r)[0] for r in range(2)]
    # EOS ids: for each of rank 0's rows an early token of it that rank 1's row never samples
    eos = sorted({next(x for x in t[1:] if x not in free[1][0]) for t in free[0]})
    kw = dict(base, eos_token_ids=eos)
    single, calls = [], []
    for r in range(2):
        n = []
        hook = model.register_forward_pre_hook(lambda *a: n.append(1))
        single.append(generate(model, prompts[r], **kw, seed=r))
        hook.remove()
        calls.append(len(n))
    assert calls[0] < calls[1], "the test needs rank 0 to finish early"
    out = str(tmp_path / "out")
    mp.spawn(fsdp_worker, args=(2, path, str(tmp_path / "init"), prompts, kw, out), nprocs=2)
    got = [torch.load(f"{out}.{r}") for r in range(2)]
    for r in range(2):
        assert got[r]["res"][0] == single[r][0]
        lp, want = torch.tensor(sum(got[r]["res"][1], [])), torch.tensor(sum(single[r][1], []))
        assert (lp - want).abs().max().item() <= 1e-5
    # lockstep: equal forward counts, more than either rank needs alone (rank 0 kept stepping
    # while rank 1 ran, rank 1 ran a dummy batch while rank 0 ran its second one)
    assert got[0]["calls"] == got[1]["calls"] > max(calls)
    with torch.no_grad():
        ref = model(torch.tensor([[1, 2, 3]]))
    assert max((got[r]["logits"] - ref).abs().max().item() for r in range(2)) <= 1e-5


# ---- CUDA: the captured decode step equals the eager one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_graph_equals_eager():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256)
    model = Llama(cfg)
    model.init_weights(std=0.2)
    model = model.cuda().eval()
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=50, seed=0, eos_token_ids=[7, 8])
    with warnings.catch_warnings():
        # a failed capture warns and decodes eagerly: here that is a failure (other warnings are not)
        warnings.filterwarnings("error", message="generate: CUDA graph capture failed")
        a = generate(model, PROMPTS, **kw, cuda_graph=True)
    b = generate(model, PROMPTS, **kw, cuda_graph=False)
    assert a == b
    for p, new, lp in zip(PROMPTS, *a):  # and the logprobs are right on the device too
        ref = truncated_logp(full_logits(model, p, new).cpu(), 1.0, 50)
        want = ref.gather(-1, torch.tensor(new)[:, None])[:, 0]
        assert (torch.tensor(lp, dtype=torch.float64) - want).abs().max().item() <= 1e-4
    greedy_gpu = generate(model, PROMPTS, 20, temperature=0)[0]
    assert greedy_gpu == generate(model.cpu(), PROMPTS, 20, temperature=0)[0]
