"""The static decode path (cache.StaticSPKVCache, generate.decode_static): it decodes what the
paged cache decodes and holds the same pairs, its whole step traces with fullgraph=True and
dynamo's scalar / dynamic-shape captures off (so it has no host sync), and 300 steps across page
boundaries and the window never recompile it."""

import pytest
import torch
import torch._dynamo
from hypothesis import example, given, settings, strategies as st

import generate as G
from cache import StaticSPKVCache
from conftest import needs_cuda
from test_generate import random_gate_model


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (n,), generator=g).tolist() for n in lengths]


@settings(max_examples=25, deadline=None)
@given(window=st.integers(1, 9), page=st.sampled_from([1, 2, 3, 16]), lengths=st.lists(st.integers(1, 30), min_size=1,
       max_size=3), n_new=st.integers(1, 40), check_every=st.sampled_from([1, 3, 16]), dense_layers=st.sampled_from([(), (1,)]),
       seed=st.integers(0, 10**6))
@example(window=1, page=1, lengths=[1], n_new=2, check_every=1, dense_layers=(), seed=0)  # a full free stack, no pop
def test_static_decode_equals_the_paged_cache_and_holds_the_same_pairs(window, page, lengths, n_new, check_every,
                                                                      dense_layers, seed):
    model = random_gate_model(seed, window=window, tau=0.5, n_kv_head=2, n_head=4, dense_layers=dense_layers)
    prompts = prompts_of(lengths, seed)
    want_tokens, want_logits, paged = G.generate(model, prompts, n_new, chunk=7, page_size=page)
    tokens, logits, static = G.generate(model, prompts, n_new, chunk=7, page_size=page, impl="static",
                                        check_every=check_every)
    assert isinstance(static, StaticSPKVCache)
    assert torch.equal(tokens, want_tokens)
    assert (logits - want_logits).abs().max().item() <= 1e-5
    for layer in range(model.cfg.n_layer):
        for row in range(len(prompts)):
            for head in range(model.cfg.n_kv_head):
                assert static.held_positions(layer, row, head) == paged.held_positions(layer, row, head)
    assert static.kept_per_layer() == paged.kept_per_layer()
    assert not bool(static.overflow)


def test_the_pool_grows_before_it_runs_out_and_decoding_stays_exact():
    model = random_gate_model(1, window=2, tau=0.0, n_kv_head=2, n_head=4)  # tau 0: every pair is kept
    prompts = prompts_of([3, 5])
    want, _, _ = G.generate(model, prompts, 60, page_size=2)
    tokens, _, static = G.generate(model, prompts, 60, page_size=2, impl="static", check_every=4)
    assert torch.equal(tokens, want)
    assert static.trash > 2 * 2 * (4 // 2 + 1) + 4  # more pages than from_cache gave it: it grew


def test_a_step_without_room_sets_the_overflow_flag_and_the_host_check_refuses():
    model = random_gate_model(2, window=1, tau=0.0, n_kv_head=2, n_head=4)
    cache = G.new_cache(model, 1, 40, dense=False, page_size=1)
    first = G.prefill(model, cache, prompts_of([4]), chunk=4)
    static = StaticSPKVCache.from_cache(cache, 40, room_steps=0)  # one spare page per stream
    tok, pos = first.argmax(-1), torch.tensor([4])
    for i in range(3):  # page size 1: each step needs a page per stream
        tok, _ = G.static_step(model, static, tok, pos + i, {})
    assert bool(static.overflow)
    with pytest.raises(RuntimeError, match="overflowed"):
        static.ensure_room(1)


def count_compiles():
    """A torch.compile backend that runs the traced graph eagerly and counts how often it is called."""
    calls = []

    def backend(gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return gm.forward

    return backend, calls


@pytest.mark.parametrize("dense", [False, True])
def test_the_whole_step_traces_as_one_graph_and_300_steps_never_recompile(dense):
    """fullgraph=True with capture_scalar_outputs and capture_dynamic_output_shape_ops off: a
    .item(), a nonzero, a bool() or any data-dependent shape in the step would fail the trace.
    300 steps cross the window (8) and many page boundaries (2) with dynamo raising on any recompile."""
    torch._dynamo.reset()
    model = random_gate_model(3, window=8, tau=0.5, n_kv_head=2, n_head=4, block_size=512)
    prompts = prompts_of([5, 20, 11])
    n = 300
    cache = G.new_cache(model, 3, 20 + n, dense=dense, page_size=2)
    first = G.prefill(model, cache, prompts, chunk=6)
    if not dense:
        cache = StaticSPKVCache.from_cache(cache, 20 + n, room_steps=n)  # room for all n steps: no growth
    backend, calls = count_compiles()
    step = torch.compile(G.static_step, fullgraph=True, dynamic=False, backend=backend)
    pos, tok = torch.tensor([5, 20, 11]), first.argmax(-1)
    got = []
    with torch._dynamo.config.patch(error_on_recompile=True, capture_scalar_outputs=False,
                                    capture_dynamic_output_shape_ops=False), torch.no_grad():
        for i in range(n):
            tok, _ = step(model, cache, tok, pos + i, {})
            got.append(tok)
    assert len(calls) == 1
    want, _, _ = G.generate(model, prompts, n + 1, chunk=6, page_size=2, dense=dense)
    assert torch.equal(torch.stack(got, 1), want[:, 1:])


def test_sampling_on_the_device_draws_from_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(4000, 1)  # (4000, 5)
    assert torch.equal(G.sample_on_device(logits), logits.argmax(-1))
    torch.manual_seed(0)
    for kw in (dict(temperature=0.7), dict(temperature=1.3, top_k=3), dict(temperature=1.0, top_p=0.8)):
        want = G.filtered(logits[:1], **{"top_k": 0, "top_p": 1.0, **kw}).softmax(-1)[0]
        freq = torch.bincount(G.sample_on_device(logits, **kw), minlength=5) / 4000
        assert (freq - want).abs().max() < 0.03, (kw, freq, want)
        assert (freq[want == 0] == 0).all()


@needs_cuda
@pytest.mark.parametrize("how", ["graph", "compiled"])
def test_on_cuda_the_recorded_and_the_compiled_step_decode_as_the_eager_one(how):
    """generate.GraphedStep (a CUDA graph of the eager step) and compiled_static_step (fullgraph,
    reduce-overhead) give the eager static step's tokens, across page boundaries and a pool that grows."""
    torch._dynamo.reset()
    model = random_gate_model(4, window=8, tau=0.5, n_kv_head=2, n_head=4, block_size=512).cuda()
    prompts = prompts_of([5, 20, 11])
    want, want_logits, _ = G.generate(model, prompts, 120, chunk=6, page_size=2, impl="static", check_every=16)
    cache = G.new_cache(model, 3, 140, dense=False, page_size=2)
    first = G.prefill(model, cache, prompts, chunk=6)
    cache = StaticSPKVCache.from_cache(cache, 140, room_steps=16)
    step = G.GraphedStep({}) if how == "graph" else (lambda m, c, t, p: G.compiled_static_step(True)(m, c, t, p, {}))
    tok, pos, got, logits = first.argmax(-1), torch.tensor([5, 20, 11], device="cuda"), [first.argmax(-1)], [first]
    for i in range(119):
        if i % 16 == 0:
            cache.ensure_room(16)
        tok, lg = step(model, cache, tok, pos + i)
        got.append(tok)
        logits.append(lg)
    assert torch.equal(torch.stack(got, 1), want)
    assert (torch.stack(logits, 1) - want_logits).abs().max().item() <= 1e-4


def test_generate_py_static_prints_its_path_and_the_same_text_and_cache_figures_as_paged(tmp_path, capsys):
    from tiny import tiny_checkpoint

    path = tiny_checkpoint(tmp_path / "t.pt")
    outs = {}
    for impl in ("paged", "static"):
        G.main([f"--ckpt={path}", "--prompt=hello world, " * 5, "--max_new_tokens=12", "--tau=0.5", "--device=cpu",
                f"--impl={impl}", "--check_every=5"])
        outs[impl] = capsys.readouterr().out.splitlines()
    assert "SP-KV static" in outs["static"][0] and "without a host sync" in outs["static"][0]
    text = lambda lines: lines[1:next(i for i, s in enumerate(lines) if s.startswith("--- "))]
    figures = lambda lines: [s for s in lines if s.startswith(("density", "KV pairs held"))]
    assert text(outs["static"]) == text(outs["paged"]) and figures(outs["static"]) == figures(outs["paged"])
