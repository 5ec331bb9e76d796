"""The attention kernels: fast paths for training and prefill, each the twin of
spkv.reference_attention, and the attention over a decode cache.

Over a whole sequence (training, evaluation), kernels.attention(..., impl):
    "reference"      spkv.reference_attention: materialized scores, plain tensor ops (the oracle)
    "sdpa"           scaled_dot_product_attention with the SP-KV bias as an additive float mask;
                     forward and backward on any device (the CPU training path)
    "flex"           FlexAttention, eager: a score_mod adds log u to keys older than the window and
                     a causal block_mask lets the kernel skip blocks above the diagonal
    "flex_compiled"  the same under torch.compile: the fused kernel (the CUDA training path)
choose_attention() decides once per program and returns the reason, which the caller prints.

Over a decode cache (cache.py calls these): cached_attention attends to gathered keys with the
hard-gate bias of cache_bias ("sdpa", or the plain-ops "reference" twin), and
paged_decode_attention reads the page pool in place (its twin: the gather path;
tests/test_generate.py holds them equal).
Shapes: q (B, H, T, D); k, v (B, Hkv, T, D); lg (B, Hkv, T) log-gates or None (plain causal layer).
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import cli
import spkv

ATTN_IMPLS = ("reference", "sdpa", "flex", "flex_compiled")


def choose_attention(device: torch.device, requested: str = "auto"):
    """Pick the attention path for `device`; returns (impl, reason). `requested` overrides."""
    if requested != "auto":
        if requested not in ATTN_IMPLS:
            raise ValueError(f"unknown attention path {requested!r}; use 'auto' or one of {ATTN_IMPLS}")
        return requested, "requested by the caller"
    if device.type == "cuda":
        return "flex_compiled", "CUDA: fused FlexAttention kernel, masked blocks skipped, has a backward"
    return "sdpa", ("not CUDA: FlexAttention has no CPU backward in torch 2.13, and SDPA with an "
                    "additive bias is about 2x faster than compiled flex forward on CPU")


# ---------------------------------------------------------------------------------------------
# SDPA with an additive bias.


BIAS_LIMIT_BYTES = 2e9  # the largest (B, Hkv, T, T) bias the "sdpa" path may build per layer


def check_bias_size(B: int, Hkv: int, T: int, dtype_bytes: int):
    """The "sdpa" path materializes SP-KV's bias, B * Hkv * T * T values per layer: refuse a shape
    where that alone would take gigabytes (0.8 GB per layer at train.py's gpu preset) instead of
    failing out of memory later; FlexAttention builds no bias."""
    size = B * Hkv * T ** 2 * dtype_bytes
    if size > BIAS_LIMIT_BYTES:
        raise cli.BadInput(f"attention path sdpa would build a {size / 1e9:.1f} GB attention bias per layer at "
                           f"batch {B} x sequence {T}; use flex_compiled (CUDA), or a smaller batch or sequence")


def sdpa_attention(q, k, v, lg, window):
    """SP-KV attention through scaled_dot_product_attention with a materialized float bias.
    GQA without copying k/v per query head: queries are viewed as (B, Hkv, G, T, D) and the
    (B, Hkv, 1, T, T) bias broadcasts over the G heads of each group."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    if lg is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1)
    pos = torch.arange(T, device=q.device)
    bias = spkv.gate_bias(lg, pos, pos, window).to(q.dtype).unsqueeze(2)  # (B, Hkv, 1, T, T)
    qg = q.view(B, Hkv, G, T, D)
    kg = k.unsqueeze(2).expand(B, Hkv, G, T, D)  # a view, no copy
    vg = v.unsqueeze(2).expand(B, Hkv, G, T, D)
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=bias)  # (B, Hkv, G, T, D)
    return out.reshape(B, H, T, D)


# ---------------------------------------------------------------------------------------------
# FlexAttention: a score_mod for the gate, a block mask for causality.


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def spkv_score_mod(lg: torch.Tensor, window: int, group: int):
    """score_mod adding log u_s to keys older than the window; query head h reads gate h // group."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + torch.where(q_idx - kv_idx >= window, lg[b, h // group, kv_idx], 0.0)

    return score_mod


@functools.lru_cache(maxsize=16)
def causal_block_mask(T: int, device: str):
    """Block mask of the causal pattern (cached: it depends only on T and the device)."""
    return create_block_mask(causal_mask, None, None, T, T, device=device)


@functools.lru_cache(maxsize=1)
def compiled_flex():
    """torch.compile(flex_attention), built on first use rather than at import."""
    return torch.compile(flex_attention, dynamic=False)


def flex_spkv_attention(q, k, v, lg, window, compiled: bool = False, block_mask=None):
    """SP-KV attention with FlexAttention; the causal block mask skips blocks above the diagonal.
    block_mask: causal_block_mask(T, device), which GPT.forward builds once per forward, outside
    the compiled blocks (built inside, it would be traced into every block's graph and rebuilt
    each call, as an lru_cache does not hold under torch.compile); None = built here."""
    G = q.shape[1] // k.shape[1]
    mask = causal_block_mask(q.shape[2], str(q.device)) if block_mask is None else block_mask
    mod = None if lg is None else spkv_score_mod(lg.to(torch.float32), window, G)
    fn = compiled_flex() if compiled else flex_attention
    return fn(q, k, v, score_mod=mod, block_mask=mask, enable_gqa=G > 1)


def attention(q, k, v, lg, window, impl: str, block_mask=None):
    """Run SP-KV attention (or plain causal attention when lg is None) on the chosen path;
    block_mask: the flex paths' causal BlockMask when the caller built it (GPT.forward does)."""
    if impl == "sdpa":
        return sdpa_attention(q, k, v, lg, window)
    if impl == "flex":
        return flex_spkv_attention(q, k, v, lg, window, compiled=False, block_mask=block_mask)
    if impl == "flex_compiled":
        return flex_spkv_attention(q, k, v, lg, window, compiled=True, block_mask=block_mask)
    if impl == "reference":
        return spkv.reference_attention(q, k, v, lg, window)
    raise ValueError(f"unknown attention path {impl!r}; use one of {ATTN_IMPLS}")


# ---------------------------------------------------------------------------------------------
# Attention over a cache (prefill chunks and decode steps), after gathering the ragged store.


def cache_bias(q_pos, k_pos, keep, window):
    """The hard-gate bias of METHOD.md section 3 over cached keys, from spkv.gate_bias.

    q_pos (R, T); k_pos (R, Hkv, S) with -1 for an empty slot; keep (R, Hkv, S).
    Key s is visible to query t iff it exists, s <= t, and (t - s < window or keep_s). An empty
    slot is placed in the far future, so the causal rule hides it. Returns (R, Hkv, T, S).
    """
    lg = torch.zeros(keep.shape, device=keep.device).masked_fill(~keep, float("-inf"))  # hard log-gate
    k_pos = k_pos.masked_fill(k_pos < 0, torch.iinfo(torch.long).max // 2)
    return spkv.gate_bias(lg, q_pos[:, None, :], k_pos, window)


def fold_bias(bias, G):
    """(R, Hkv, T, S) bias -> (R, Hkv, G * T, S): the rows of G query heads folded into one axis."""
    R, Hkv, T, S = bias.shape
    return bias[:, :, None].expand(R, Hkv, G, T, S).reshape(R, Hkv, G * T, S)


def cached_attention(q, k, v, bias, impl: str):
    """q (R, H, T, D) over cached k, v (R, Hkv, S, D) with bias (R, Hkv, T, S).
    "sdpa": scaled_dot_product_attention with GQA folded into the query axis: the G query heads
    of a KV head become G * T query rows of one 4-D call, so k and v are read once, never copied
    per head (10x faster than broadcasting a 5-D k on CPU at decode time); "reference": plain ops."""
    R, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    bias = fold_bias(bias.to(q.dtype), G)  # (R, Hkv, G*T, S)
    qg = q.reshape(R, Hkv, G * T, D)
    if impl == "reference":
        out = (qg @ k.transpose(-1, -2) / math.sqrt(D) + bias).softmax(-1) @ v
    else:
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=bias)  # (R, Hkv, G*T, D)
    return out.reshape(R, H, T, D)


# ---------------------------------------------------------------------------------------------
# Decode attention straight over the page pool: no gather, each kept byte read once.


def local_scores(qs, k, pos, ring, window):
    """fp32 scores of the scaled queries qs (B, Hkv, G, D) against the ring, with its hard-gate
    bias (B, Hkv, G, w), and against the new pair, which a query always sees (B, Hkv, G, 1)."""
    ring_k, _, ring_pos, ring_keep = ring
    B, Hkv, w = ring_k.shape[:3]
    bias = cache_bias(pos[:, None], ring_pos[:, None].expand(B, Hkv, w), ring_keep, window)  # (B, Hkv, 1, w)
    s_ring = (qs @ ring_k.transpose(-1, -2)).to(torch.float32) + bias
    return s_ring, (qs @ k.transpose(-1, -2)).to(torch.float32)


def paged_decode_attention(q, k, v, pos, pool, ring, window):
    """One decode step of attention over the SP-KV cache without copying the store.

    q (B, H, 1, D) new queries; k, v (B, Hkv, 1, D) the new pairs; pos (B,) their positions.
    pool: the store of one layer, k_pool, v_pool (P, p, D), pos_pool (P, p) with -1 for an empty
    slot, owner (P,) the stream (row * Hkv + head) holding each page, -1 for a free page.
    ring: ring_k, ring_v (B, Hkv, w, D), ring_pos (B, w), ring_keep (B, Hkv, w).
    Every page is scored against its owner's queries in one batched matmul over the pool, so the
    kernel reads each held page once and never builds a padded (S, longest, D) copy as the gather
    path (PagedStore.gather + cached_attention) does. One softmax spans store, ring and the new
    pair through a shared max and summed normalizers, reduced per stream with scatter/index_add.
    Shapes depend on the pool size only, not on lengths. Its plain twin: the gather path."""
    k_pool, v_pool, pos_pool, owner = pool
    ring_k, ring_v = ring[:2]
    B, H, _, D = q.shape
    Hkv = ring_k.shape[1]
    G, S = H // Hkv, B * Hkv
    qs = q.reshape(B, Hkv, G, D) / math.sqrt(D)  # (B, Hkv, G, D): a stream's G query heads
    owner = torch.where(owner >= 0, owner, S)  # free pages feed a dummy stream S, dropped below

    def per_page(x):  # (S, ...) per stream -> (P, ...) per page, the dummy stream's rows zero
        return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[owner]

    q_page = per_page(qs.reshape(S, G, D))  # (P, G, D)
    # scores, maxima and normalizers in fp32 (pages may be bf16); the matmuls read the stored dtype
    f32 = torch.float32
    # every stored pair left the window when it was kept, so the only rule left is "slot is filled"
    s_store = (q_page @ k_pool.transpose(1, 2)).to(f32).masked_fill((pos_pool < 0)[:, None], float("-inf"))  # (P, G, p)
    s_ring, s_new = local_scores(qs, k, pos, ring, window)  # (B, Hkv, G, w), (B, Hkv, G, 1)
    idx = owner[:, None].expand(-1, G)  # (P, G)
    top = torch.full((S + 1, G), float("-inf"), dtype=f32, device=q.device)
    top = top.scatter_reduce(0, idx, s_store.amax(-1), "amax")[:S].view(B, Hkv, G)
    top = torch.maximum(top, torch.maximum(s_ring.amax(-1), s_new[..., 0]))  # (B, Hkv, G), finite
    top_page = per_page(top.reshape(S, G))  # (P, G)
    w_store = torch.exp(s_store - top_page[..., None])  # (P, G, p); empty slots give 0
    pv = (w_store.to(v_pool.dtype) @ v_pool).to(f32)  # (P, G, D)
    num = pv.new_zeros(S + 1, G, D).index_add_(0, owner, pv)[:S].view(B, Hkv, G, D)
    den = w_store.new_zeros(S + 1, G).index_add_(0, owner, w_store.sum(-1))[:S].view(B, Hkv, G)
    w_ring, w_new = torch.exp(s_ring - top[..., None]), torch.exp(s_new - top[..., None])
    num = num + (w_ring.to(v.dtype) @ ring_v).to(f32) + (w_new.to(v.dtype) @ v).to(f32)  # (B, Hkv, G, D)
    den = den + w_ring.sum(-1) + w_new[..., 0]
    return (num / den[..., None]).to(q.dtype).reshape(B, H, 1, D)
