"""The decode paths experiments/bench_decode.py times beyond generate.py's (experiments/decode_paths.py):
each equals generate.py's reference twin, the FlexAttention block mask lists exactly each
stream's pages, and the bench prints a row per path."""

import pytest
import torch
from hypothesis import given, strategies as st

import decode_paths as DP
import generate as G
from checkpoint import load_model
from conftest import needs_cuda
from test_generate import REUSED_PAGES, random_gate_model, reused_pages_case, setups  # noqa: F401 (helpers)
from tiny import tiny_checkpoint


@given(setups(), st.sampled_from(["split", "paged_flex"]))
def test_experimental_paths_match_the_reference_twin(setup, path):
    cfg, prompts, chunk, n_new, seed = setup
    model = random_gate_model(seed, **cfg)
    fast = DP.generate(model, prompts, n_new, path, chunk=chunk)
    plain = G.generate(model, prompts, n_new, chunk=chunk, impl="reference")
    assert torch.equal(fast[0], plain[0])
    if n_new:
        assert (fast[1] - plain[1]).abs().max().item() <= 1e-4


@given(*REUSED_PAGES)
def test_paged_flex_kernel_equals_gather_path_with_reused_pages(B, heads, window, page, seed):
    """paged_flex_decode_attention, whose block mask must list exactly each stream's pages, against
    the gather path on a pool of reused pages."""
    cache, q, k, v, pos, want = reused_pages_case(B, heads, window, page, seed)
    store = cache.stores[0]
    ring = (cache.ring_k[0], cache.ring_v[0], cache.ring_pos[0], cache.ring_keep[0])
    flex = DP.paged_flex_decode_attention(q, k, v, pos, store.pool(), DP.page_table(store), ring, window)
    k_pool, _, pos_pool, owner = store.pool()
    blocks = DP.page_block_mask(pos_pool, owner, *DP.page_table(store)).to_dense()[:, 0, 0]  # (S, P): pages listed
    assert torch.equal(blocks.bool(), owner[None] == torch.arange(B * heads[0])[:, None])  # exactly each stream's own pages
    assert (flex - want).abs().max().item() <= 1e-5


def test_time_ideal_prices_kv_bytes_at_the_measured_rate():
    from bench_decode import time_ideal

    assert time_ideal(10.0, 2.0, 0.25) == pytest.approx(2.5)  # 10 / (2 + 8 * 0.25)
    assert time_ideal(10.0, 2.0, 1.0) == pytest.approx(1.0)  # everything kept: no gain
    assert time_ideal(10.0, 2.0, 0.0) == pytest.approx(5.0)  # nothing kept: only the KV-free step is left


def test_bench_decode_prints_a_row_per_path(tmp_path, capsys):
    """bench_decode runs end to end on a tiny checkpoint (forced densities and its real gates) for
    every path asked, and refuses an unknown one."""
    import bench_decode

    path = tiny_checkpoint(tmp_path / "t.pt")
    bench_decode.main([f"--ckpt={path}", "--contexts=64", "--batch=2", "--densities=0.25", "--steps=1",
                       "--repeats=2", "--impl=paged,split,paged_flex,static", "--device=cpu"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("64 ")]
    assert sorted(r[2] for r in rows) == ["paged", "paged", "paged_flex", "paged_flex", "split", "split",
                                          "static", "static"]  # 0.25, real
    assert all(r[5].endswith("x") and float(r[5][:-1]) > 0 for r in rows)
    bench_decode.main([f"--ckpt={path}", "--contexts=64", "--batch=2", "--densities=0.25", "--steps=1",
                       "--repeats=1", "--impl=paged,split,static", "--device=cpu", "--dtype=bfloat16"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("64 ")]
    assert sorted(r[2] for r in rows) == ["paged", "paged", "split", "split", "static", "static"]  # the GPU dtype, on CPU
    with pytest.raises(ValueError, match="unknown --impl"):
        bench_decode.main([f"--ckpt={path}", "--impl=fast"])
    with pytest.raises(ValueError, match="must be >= 1"):
        bench_decode.main([f"--ckpt={path}", "--contexts=64", "--batch=1", "--densities=0.25", "--page_size=0"])
    with pytest.raises(ValueError, match="page_size=0"):  # and generate.py gets the cache's own error
        G.new_cache(load_model(path)[0], 1, 8, dense=False, page_size=0)


@needs_cuda
@pytest.mark.parametrize("n_head,dtype,tol", [(4, torch.float32, 1e-3), (6, torch.float32, 1e-3),
                                              (6, torch.bfloat16, 5e-2)])
def test_paged_flex_compiled_on_cuda_matches_reference(n_head, dtype, tol):
    """On CUDA "paged_flex" runs the decode step compiled (the fused FlexAttention kernel reading the
    pages the block mask lists): same logits as the reference path, pool growing. n_head=6 over 2
    KV heads is SmolLM2's query group (G = 3, not a power of two) at its head dim D = 64."""
    model = random_gate_model(0, window=8, tau=0.5, n_kv_head=2, n_head=n_head, n_embd=64 * n_head)
    model = model.to("cuda", dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (20, 90, 47)]
    fast = DP.generate(model, prompts, 40, "paged_flex", chunk=16, page_size=16)
    plain = G.generate(model, prompts, 40, chunk=16, impl="reference", page_size=16)
    if dtype == torch.float32:  # bf16 rounding may flip a near-tie argmax; the logits still agree
        assert torch.equal(fast[0], plain[0])
    assert (fast[1].float() - plain[1].float()).abs().max().item() <= tol
