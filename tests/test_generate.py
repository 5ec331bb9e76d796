"""Property tests of the compacting cache: cached decoding equals full recompute under hard gates,
the cache holds exactly what the method says, and its bytes follow the kept pairs."""

import re

import pytest
import torch
from hypothesis import assume, given, strategies as st

import generate as G
import spkv
from checkpoint import load_model, save_checkpoint
from model import GPT
from tiny import tiny_checkpoint, tiny_config


def random_gate_model(seed, **cfg):
    """A tiny model whose predictors give spread-out gates (not the open init)."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**cfg)).eval()
    for block in model.blocks:
        if block.attn.is_spkv:
            torch.nn.init.normal_(block.attn.predictor.proj.weight, std=1.0)
            torch.nn.init.normal_(block.attn.predictor.proj.bias, std=1.5)
    return model


def full_gates(model, seq):
    """Gate logits of every SP-KV layer for one full sequence: list of (Hkv, T)."""
    gates = []
    with torch.no_grad():
        model(torch.tensor(seq)[None], a=1.0, gates=gates)
    return [g[0] for g in gates]


@st.composite
def setups(draw):
    n_kv = draw(st.sampled_from([1, 2]))
    cfg = dict(window=draw(st.integers(1, 12)), tau=draw(st.floats(0.05, 0.95)), n_kv_head=n_kv,
               n_head=n_kv * draw(st.sampled_from([1, 2])), n_embd=32 if n_kv == 1 else 32,
               dense_layers=draw(st.sampled_from([(), (1,)])))
    lengths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10**6)))
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in lengths]
    return cfg, prompts, draw(st.integers(1, 17)), draw(st.integers(0, 12)), draw(st.integers(0, 10**6))


@given(setups())
def test_cached_decoding_equals_full_recompute_under_hard_gates(setup):
    cfg, prompts, chunk, n_new, seed = setup
    model = random_gate_model(seed, **cfg)
    tokens, logits, cache = G.generate(model, prompts, n_new, chunk=chunk)
    want_tokens, want_logits = G.generate_uncached(model, prompts, n_new)
    for r, p in enumerate(prompts):  # a gate within 1e-5 of tau may flip between two float paths
        u = torch.cat([torch.sigmoid(g) for g in full_gates(model, p + want_tokens[r])])
        assume(((u - model.cfg.tau).abs() > 1e-5).all())
    for r in range(len(prompts)):
        assert tokens[r].tolist() == want_tokens[r]
        if n_new:
            assert (logits[r] - want_logits[r]).abs().max().item() <= 1e-4


@given(setups())
def test_cache_holds_exactly_window_and_kept(setup):
    cfg, prompts, chunk, n_new, seed = setup
    model = random_gate_model(seed, **cfg)
    tokens, _, cache = G.generate(model, prompts, n_new, chunk=chunk)
    w, page = model.cfg.window, cache.stores[0].page_size
    for r, p in enumerate(prompts):
        # the cache holds the pairs of every token fed to the model: prompt + all but the last sample
        seq = p + tokens[r].tolist()[:-1] if n_new else p
        n = len(seq)
        gates = iter(full_gates(model, seq))
        for layer, block in enumerate(model.blocks):
            keep = spkv.hard_keep(next(gates), model.cfg.tau) if block.attn.is_spkv else None
            for h in range(model.cfg.n_kv_head):
                want = {s for s in range(n) if n - 1 - s < w or keep is None or keep[h, s]}
                assert cache.held_positions(layer, r, h) == want
    for store in cache.stores:  # pages held: kept pairs plus at most one partly filled page per stream
        kept_pages = -(-store.length // page)
        assert store.pages_in_use() == int(kept_pages.sum())
        assert store.pages_in_use() * page <= int(store.length.sum()) + page * store.length.numel()


@given(setups())
def test_tau_zero_equals_dense_cache_equals_uncached(setup):
    cfg, prompts, chunk, n_new, seed = setup
    model = random_gate_model(seed, **{**cfg, "tau": 0.0})
    spkv_tokens, spkv_logits, _ = G.generate(model, prompts, n_new, chunk=chunk)
    dense_tokens, dense_logits, _ = G.generate(model, prompts, n_new, dense=True, chunk=chunk)
    ref_tokens, ref_logits = G.generate_uncached(model, prompts, n_new, a=1.0)  # hard gates at tau 0 keep every pair
    for r in range(len(prompts)):
        assert spkv_tokens[r].tolist() == dense_tokens[r].tolist() == ref_tokens[r]
        if n_new:
            assert (spkv_logits[r] - dense_logits[r]).abs().max().item() <= 1e-4
            assert (dense_logits[r] - ref_logits[r]).abs().max().item() <= 1e-4


def test_heads_that_keep_nothing_and_everything():
    torch.manual_seed(3)
    model = GPT(tiny_config(window=4, n_kv_head=2, n_head=4)).eval()
    for block in model.blocks:  # head 0 drops every old pair, head 1 keeps every one
        block.attn.predictor.proj.bias.data = torch.tensor([-30.0, 30.0])
    prompt = torch.randint(0, 257, (37,)).tolist()
    tokens, logits, cache = G.generate(model, [prompt], 5, chunk=6)
    want_tokens, want_logits = G.generate_uncached(model, [prompt], 5)
    assert tokens[0].tolist() == want_tokens[0]
    assert (logits[0] - want_logits[0]).abs().max().item() <= 1e-4
    n = 37 + 4
    for layer in range(2):
        assert cache.held_positions(layer, 0, 0) == set(range(n - 4, n))
        assert cache.held_positions(layer, 0, 1) == set(range(n))
        assert cache.stores[layer].length.tolist() == [0, n - 4]


def test_pages_are_only_taken_for_kept_pairs():
    """A store whose heads keep nothing allocates no page however long the sequence."""
    torch.manual_seed(0)
    model = GPT(tiny_config(window=3)).eval()
    for block in model.blocks:
        block.attn.predictor.proj.bias.data.fill_(-30.0)
    _, _, cache = G.generate(model, [list(range(100))], 20, chunk=7)
    assert all(s.pages_in_use() == 0 for s in cache.stores)
    report = G.cache_report(cache, [120], 2 * 8 * 4, 2, 2)
    assert report["density"] == 0.0 and report["pairs"] == 2 * 2 * 3


def test_sampling_modes():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    assert (G.sample(logits) == 1).all()
    assert (G.sample(logits, temperature=1.0, top_k=1, gen=gen) == 1).all()
    assert set(G.sample(logits, temperature=1.0, top_k=2, gen=gen).tolist()) == {1, 3}
    assert (G.sample(logits, temperature=1.0, top_p=0.01, gen=gen) == 1).all()
    assert set(G.sample(logits, temperature=5.0, gen=gen).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("prompts,n,message", [([[]], 4, "empty prompt"), ([[1] * 250], 10, "longer than the model's context"),
                                               ([[1, 2]], -1, "max_new_tokens=-1 must be >= 0")])
def test_bad_requests_are_refused(prompts, n, message):
    with pytest.raises(ValueError, match=message):
        G.generate(GPT(tiny_config()).eval(), prompts, n)


def test_bad_tau_and_missing_tokenizer(tmp_path):
    path = tiny_checkpoint(tmp_path / "t.pt")
    with pytest.raises(ValueError, match="unknown flag --temp; did you mean --temperature"):
        G.main([f"--ckpt={path}", "--temp=1"])
    with pytest.raises(ValueError, match="tau=1.5 is outside"):
        G.main([f"--ckpt={path}", "--tau=1.5"])
    model, _, _ = load_model(path)
    save_checkpoint(str(tmp_path / "notok.pt"), model, None, source="test")
    with pytest.raises(ValueError, match="has no tokenizer"):
        G.main([f"--ckpt={tmp_path / 'notok.pt'}"])


def test_cli_prints_text_and_cache_figures(tmp_path, capsys):
    path = tiny_checkpoint(tmp_path / "t.pt")
    G.main([f"--ckpt={path}", "--prompt=hello world, " * 5, "--max_new_tokens=8", "--tau=0.5", "--device=cpu"])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "compression" in out and "density" in out
    line = next(s for s in out.splitlines() if s.startswith("KV pairs held"))
    held, dense = (int(x.replace(",", "")) for x in re.search(r"in use ([\d,]+) vs dense ([\d,]+)", line).groups())
    assert ("no compression" in line) == (held > dense), line  # never "compression 0.5x" for a bigger cache
    (tmp_path / "prompt.txt").write_text("hello world, " * 15)
    G.main([f"--ckpt={path}", f"--prompt_file={tmp_path / 'prompt.txt'}", "--max_new_tokens=2", "--device=cpu"])
    assert "--- 195 prompt + 2 new tokens" in capsys.readouterr().out  # the file's 195 bytes, not --prompt


@given(setups())
def test_paged_path_matches_its_reference_twin(setup):
    cfg, prompts, chunk, n_new, seed = setup
    model = random_gate_model(seed, **cfg)
    fast = G.generate(model, prompts, n_new, chunk=chunk, impl="paged")
    plain = G.generate(model, prompts, n_new, chunk=chunk, impl="reference")
    assert torch.equal(fast[0], plain[0])
    if n_new:
        assert (fast[1] - plain[1]).abs().max().item() <= 1e-4


def reused_pages_case(B, heads, window, page, seed):
    """A one-layer SP-KV cache whose pool holds pages freed by other streams and taken again
    (stale slots must be invisible), a full ring, and one decode step's q, k, v, pos; with the
    gather-path answer for it (gather the store, concatenate the ring and the new pair,
    kernels.cached_attention "reference"). Returns (cache, q, k, v, pos, want)."""
    import kernels
    from cache import SPKVCache

    Hkv, G_ = heads
    D, g = 4, torch.Generator().manual_seed(seed)
    cache = SPKVCache(1, B, Hkv, D, window, 0.5, torch.float32, "cpu", page_size=page)
    store = cache.stores[0]

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    n_old = torch.randint(0, 12, (B * Hkv,), generator=g)  # first fill, then free some streams, refill
    store.append(torch.arange(B * Hkv).repeat_interleave(n_old), rand(int(n_old.sum()), D),
                 rand(int(n_old.sum()), D), torch.randint(0, 5, (int(n_old.sum()),), generator=g))
    store.free_streams(torch.arange(0, B * Hkv, 2))
    t = 40  # the new token's position; older pairs sit below t - window
    n_kept = torch.randint(0, 12, (B * Hkv,), generator=g)
    kept_pos = torch.cat([torch.randperm(t - window, generator=g)[:int(n)].sort().values for n in n_kept])
    store.append(torch.arange(B * Hkv).repeat_interleave(n_kept), rand(kept_pos.numel(), D),
                 rand(kept_pos.numel(), D), kept_pos)
    ring_pos = torch.arange(t - window, t)
    cache.ring_pos[0, :, ring_pos % window] = ring_pos  # a full ring: slot = position % window
    cache.ring_k.copy_(rand(*cache.ring_k.shape))
    cache.ring_v.copy_(rand(*cache.ring_v.shape))
    cache.ring_keep.copy_(torch.rand(cache.ring_keep.shape, generator=g) < 0.5)
    q, k, v = rand(B, Hkv * G_, 1, D), rand(B, Hkv, 1, D), rand(B, Hkv, 1, D)
    pos = torch.full((B,), t)
    pieces = cache.keys(0, torch.arange(B)) + [(k, v, pos[:, None, None].expand(B, Hkv, 1), torch.ones(B, Hkv, 1, dtype=torch.bool))]
    k_all, v_all, pos_all, keep_all = (torch.cat(x, 2) for x in zip(*pieces))
    want = kernels.cached_attention(q, k_all, v_all, kernels.cache_bias(pos[:, None], pos_all, keep_all, window), "reference")
    return cache, q, k, v, pos, want


REUSED_PAGES = (st.integers(1, 3), st.sampled_from([(1, 1), (2, 1), (2, 2), (3, 1)]), st.integers(1, 6),
                st.integers(1, 5), st.integers(0, 10**6))


@given(*REUSED_PAGES)
def test_paged_decode_kernel_equals_gather_path_with_reused_pages(B, heads, window, page, seed):
    """kernels.paged_decode_attention against its twin, the gather path, on a pool of reused pages."""
    import kernels

    cache, q, k, v, pos, want = reused_pages_case(B, heads, window, page, seed)
    store = cache.stores[0]
    got = kernels.paged_decode_attention(q, k, v, pos, (store.k, store.v, store.pos, store.owner),
                                         (cache.ring_k[0], cache.ring_v[0], cache.ring_pos[0], cache.ring_keep[0]), window)
    assert (got - want).abs().max().item() <= 1e-5


def test_compiled_decode_step_matches_and_never_recompiles():
    """The compiled decode step gives the eager tokens and logits, and neither growing lengths nor
    a growing page pool recompile it (dynamo is told to raise on any recompile)."""
    import torch._dynamo

    torch._dynamo.reset()
    G.compiled_decode_step.cache_clear()
    model = random_gate_model(0, window=4, tau=0.5, n_kv_head=2, n_head=4)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (5, 30, 17)]
    lengths = [len(p) for p in prompts]
    cache = G.new_cache(model, 3, 80, dense=False, page_size=2)
    first = G.prefill(model, cache, prompts, chunk=5)
    pool_before = [s.k.shape[0] for s in cache.stores]
    with torch._dynamo.config.patch(error_on_recompile=True):
        tokens, logits = G.decode_n_tokens(model, cache, first, lengths, 40, {}, compiled=True)
    pool_after = [s.k.shape[0] for s in cache.stores]
    want_tokens, want_logits, _ = G.generate(model, prompts, 40, chunk=5, impl="reference", page_size=2)
    assert torch.equal(tokens, want_tokens)
    assert (logits - want_logits).abs().max().item() <= 1e-4
    assert any(a > b for a, b in zip(pool_after, pool_before))  # the pool grew while decoding


def test_paged_decode_kernel_on_bf16_pages():
    """bf16 pages (the GPU dtype) over a long store: the output is bf16 and within bf16 rounding
    of the fp32 gather path on the same (upcast) pairs (measured 2.8e-3 on CPU)."""
    import kernels
    from cache import SPKVCache

    g = torch.Generator().manual_seed(0)
    B, Hkv, G_, D, w, t = 2, 2, 2, 16, 4, 300
    cache = SPKVCache(1, B, Hkv, D, w, 0.5, torch.bfloat16, "cpu", page_size=8)
    n = 250  # kept pairs per stream: a long store, where bf16 normalizers would drift
    pos_kept = torch.arange(n).repeat(B * Hkv)
    cache.stores[0].append(torch.arange(B * Hkv).repeat_interleave(n), torch.randn(B * Hkv * n, D, generator=g).bfloat16(),
                           torch.randn(B * Hkv * n, D, generator=g).bfloat16(), pos_kept)
    ring_pos = torch.arange(t - w, t)
    cache.ring_pos[0, :, ring_pos % w] = ring_pos
    cache.ring_k.normal_(generator=g), cache.ring_v.normal_(generator=g)
    cache.ring_keep.fill_(True)
    q, k, v = (torch.randn(*s, generator=g).bfloat16() for s in [(B, Hkv * G_, 1, D), (B, Hkv, 1, D), (B, Hkv, 1, D)])
    pos = torch.full((B,), t)
    store = cache.stores[0]
    got = kernels.paged_decode_attention(q, k, v, pos, store.pool(),
                                         (cache.ring_k[0], cache.ring_v[0], cache.ring_pos[0], cache.ring_keep[0]), w)
    assert got.dtype == torch.bfloat16
    pieces = cache.keys(0, torch.arange(B)) + [(k, v, pos[:, None, None].expand(B, Hkv, 1), torch.ones(B, Hkv, 1, dtype=torch.bool))]
    k_all, v_all, pos_all, keep_all = (torch.cat(x, 2) for x in zip(*pieces))
    want = kernels.cached_attention(q.float(), k_all.float(), v_all.float(),
                                    kernels.cache_bias(pos[:, None], pos_all, keep_all, w), "reference")
    assert (got.float() - want).abs().max().item() <= 1e-2


@pytest.mark.parametrize("impl", ["paged", "reference"])
def test_bf16_model_decodes_like_its_uncached_forward(impl):
    """A model cast to bf16 decodes through the compacting cache (bf16 pages, fp32 gates) to the
    tokens of its own full recompute, with logits within bf16 rounding (measured 4e-3)."""
    model = random_gate_model(0, window=4, tau=0.5).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (5, 30, 17)]
    tokens, logits, cache = G.generate(model, prompts, 12, chunk=5, impl=impl)
    want_tokens, want_logits = G.generate_uncached(model, prompts, 12)
    assert logits.dtype == torch.bfloat16 and cache.ring_k.dtype == torch.bfloat16
    for r in range(len(prompts)):
        assert tokens[r].tolist() == want_tokens[r]
        assert (logits[r].float() - want_logits[r].float()).abs().max().item() <= 2e-2
