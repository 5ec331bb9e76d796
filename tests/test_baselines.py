"""The eviction baselines keep what they claim, at the budget they are given, and the harness runs
the model exactly as GPT.forward does when the policy is SP-KV's own hard gates."""

import math

import torch
from hypothesis import given, strategies as st

import baselines as bl
from model import GPT
from tiny import tiny_config


def old_counts(visible, window):
    """(..., T) how many keys older than the window each query row sees."""
    T = visible.shape[-1]
    pos = torch.arange(T)
    old = (pos[:, None] - pos[None, :]) >= window
    return (visible & old).sum(-1)


def assert_window_and_causal(visible, window):
    T = visible.shape[-1]
    pos = torch.arange(T)
    rel = pos[:, None] - pos[None, :]
    assert not visible[..., rel < 0].any(), "a future key is visible"
    assert visible[..., (rel >= 0) & (rel < window)].all(), "a window key is hidden"


@given(st.integers(1, 80), st.integers(1, 20), st.floats(0.0, 1.0), st.integers(0, 6))
def test_streaming_keeps_sinks_and_most_recent_at_the_budget(T, window, density, n_sink):
    vis = bl.streaming_visible(T, window, density, n_sink)
    assert_window_and_causal(vis, window)
    budget = bl.old_budget(T, window, density)
    assert torch.equal(old_counts(vis, window), budget)
    for t in range(T):
        b = int(budget[t])
        sinks = min(n_sink, b)
        expected = set(range(sinks)) | set(range(t - window - (b - sinks) + 1, t - window + 1))
        kept = {s for s in range(T) if vis[t, s] and t - s >= window}
        assert kept == expected


@given(st.integers(0, 2**31 - 1), st.integers(2, 48), st.integers(1, 12), st.floats(0.0, 1.0),
       st.integers(1, 2), st.integers(1, 2))
def test_h2o_evicts_the_least_accumulated_attention_at_the_budget(seed, T, window, density, Hkv, G):
    g = torch.Generator().manual_seed(seed)
    B, D = 2, 8
    q = 2 * torch.randn(B, Hkv * G, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    vis = bl.h2o_visible(q, k, window, density)
    assert_window_and_causal(vis, window)
    assert torch.equal(old_counts(vis, window), bl.old_budget(T, window, density).expand(B, Hkv, T))
    # recompute the accumulated attention from the visible rows, independently of h2o_visible
    scores = q.view(B, Hkv, G, T, D) @ k[:, :, None].transpose(-1, -2) / math.sqrt(D)  # (B, Hkv, G, T, S)
    p = scores.masked_fill(~vis[:, :, None], float("-inf")).softmax(-1).sum(2)  # (B, Hkv, T, S)
    acc_before = torch.cumsum(p, dim=2) - p  # attention from queries < t
    pos = torch.arange(T)
    for t in range(window + 1, T):
        held_before = vis[:, :, t - 1] & (t - 1 - pos >= window)  # old keys held after step t-1
        candidates = held_before.clone()
        candidates[:, :, t - window] = True  # the key leaving the window at step t
        now = vis[:, :, t] & (t - pos >= window)
        assert not (now & ~candidates).any(), "an evicted key came back"
        evicted = candidates & ~now
        for b in range(B):
            for h in range(Hkv):
                out = evicted[b, h].nonzero().flatten().tolist()
                assert len(out) <= 1
                if out:
                    acc = acc_before[b, h, t]
                    others = candidates[b, h].clone()
                    others[out[0]] = False
                    assert (acc[out[0]] <= acc[others] + 1e-9).all(), "a key with more attention was evicted"


def test_h2o_keeps_heavy_hitters():
    """Keys every query attends to strongly survive; the rest are evicted. (H2O favours keys that
    have been seen by many queries: a heavy key must out-score the early ones by arrival.)"""
    T, window, D = 40, 4, 16
    k = torch.zeros(1, 1, T, D)
    heavy = [0, 10, 20]  # 0 takes the attention of the first queries, as a sink does
    k[0, 0, heavy, 0] = 10.0
    q = torch.zeros(1, 1, T, D)
    q[..., 0] = 1.0
    vis = bl.h2o_visible(q, k, window, density=0.1)
    kept_last = {s for s in range(T) if vis[0, 0, -1, s] and T - 1 - s >= window}
    assert set(heavy) <= kept_last and len(kept_last) == bl.old_budget(T, window, 0.1)[-1]


def test_budget_extremes():
    T, window = 30, 5
    q, k = torch.randn(1, 2, T, 8), torch.randn(1, 1, T, 8)
    assert torch.equal(bl.h2o_visible(q, k, window, 1.0)[0, 0], bl.causal_visible(T))
    assert torch.equal(bl.h2o_visible(q, k, window, 0.0)[0, 0], bl.window_visible(T, window))
    assert torch.equal(bl.streaming_visible(T, window, 1.0), bl.causal_visible(T))
    assert torch.equal(bl.streaming_visible(T, window, 0.0, n_sink=4), bl.window_visible(T, window))


@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.floats(0.05, 0.95))
def test_harness_matches_the_model_under_hard_gates(seed, T, tau):
    torch.manual_seed(seed)
    model = GPT(tiny_config(tau=tau)).eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.predictor.proj.weight, std=2.0)
    idx = torch.randint(0, 257, (2, T))
    with torch.no_grad():
        for policy in ("spkv", "full"):
            if policy == "full":  # plain attention: every gate kept
                model.retune(tau=0.0)
            expected, _ = model(idx, a=1.0)
            got = bl.forward_with_policy(model, idx, bl.make_policy(policy, model.cfg.window, model.cfg.tau, 0.5))
            assert torch.allclose(got, expected, atol=1e-5), (policy, (got - expected).abs().max())


def test_bad_policy_and_density():
    import pytest

    with pytest.raises(ValueError, match="unknown policy"):
        bl.make_policy("kvzap", 8, 0.5, 0.2)
    with pytest.raises(ValueError, match="density"):
        bl.old_budget(10, 2, 1.5)


@given(st.integers(0, 2**31 - 1), st.integers(2, 40), st.integers(1, 12), st.floats(0.0, 1.0),
       st.integers(1, 2), st.integers(1, 2), st.sampled_from(["sum", "max"]), st.integers(0, 3))
def test_the_hindsight_oracle_keeps_the_old_keys_full_attention_weighs_most(seed, T, window, density, Hkv, G,
                                                                           rank_by, n_sink):
    """A write-time keep set: one decision per (sequence, KV head, key) for every later query, of the
    budgeted size, and no dropped key weighs more than a kept one (sinks aside), the weights
    recomputed here query by query."""
    g = torch.Generator().manual_seed(seed)
    B, D = 2, 8
    q = 2 * torch.randn(B, Hkv * G, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    vis = bl.hindsight_visible(q, k, window, density, rank_by, n_sink)
    assert_window_and_causal(vis, window)
    n_keep = int(density * max(0, T - window) + 0.5)
    assert torch.equal(old_counts(vis, window)[..., -1], torch.full((B, Hkv), n_keep))
    pos = torch.arange(T)
    for b in range(B):
        for h in range(Hkv):
            kept = {s for s in range(T - window) if vis[b, h, T - 1, s]}
            for t in range(T):  # the same decision for every query the key is old to
                assert {s for s in range(t - window + 1) if vis[b, h, t, s]} == {s for s in kept if s <= t - window}
            weight = torch.zeros(T, dtype=torch.float64)
            for j in range(G):
                for t in range(window, T):
                    p = (q[b, h * G + j, t] @ k[b, h, :t + 1].T / math.sqrt(D)).softmax(-1)  # (t + 1,)
                    old = p[:max(0, t - window + 1)]
                    part = weight[:len(old)]
                    weight[:len(old)] = part + old if rank_by == "sum" else torch.maximum(part, old)
            sinks = set(range(min(n_sink, T - window)))
            assert sinks <= kept or len(kept) < len(sinks) and kept <= sinks
            rest = [s for s in range(max(0, T - window)) if s not in sinks]
            free = [s for s in rest if s in kept]
            dropped = [s for s in rest if s not in kept]
            if free and dropped:
                assert weight[free].min() >= weight[dropped].max() - 1e-9
