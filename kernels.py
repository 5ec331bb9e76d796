"""The attention kernels: fast paths for training and prefill, each the twin of
spkv.reference_attention, and the attention over a decode cache.

Over a whole sequence (training, evaluation), kernels.attention(..., impl):
    "reference"      spkv.reference_attention: materialized scores, plain tensor ops (the oracle)
    "sdpa"           scaled_dot_product_attention with the SP-KV bias as an additive float mask;
                     forward and backward on any device (the CPU training path)
    "flex"           FlexAttention, eager: a score_mod adds log u to keys older than the window and
                     a causal block_mask lets the kernel skip blocks above the diagonal
    "flex_compiled"  the same under torch.compile: the fused kernel (the CUDA training path)
    "flex_gategrad"  flex_compiled's kernel (compiled on CUDA, eager elsewhere) for the output and
                     dq, dk, dv, with the log-gates' gradient computed outside it, by a pass of its
                     own instead of the kernel's atomic scatter (gategrad_attention); flex_compiled
                     is its twin
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

try:  # the log-sum-exp request of torch >= 2.9; older torch has only return_lse
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:
    AuxRequest = None

import cli
import spkv

ATTN_IMPLS = ("reference", "sdpa", "flex", "flex_compiled", "flex_gategrad")


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


# ---------------------------------------------------------------------------------------------
# FlexAttention with the gate's gradient outside the kernel ("flex_gategrad").
#
# flex_compiled's backward scatters dlg from every (t, s) tile with atomics. Here the forward's
# score_mod reads a detached lg, so FlexAttention's backward computes dq, dk, dv only, and a
# custom op on the output path (spkv::gate_tap: identity forward) adds dlg in its backward with
# one more FlexAttention pass over the old pairs (spkv::gate_grad). The pass is a custom op because
# Dynamo refuses flex_attention inside a traced backward; torch.compile sees both ops as opaque
# (their fake implementations give the shapes), and the pass compiles its own kernel when run.


def flex_with_lse(fn, q, k, v, score_mod, block_mask, scale=None, enable_gqa=False):
    """fn(q, k, v, ...) -> (out (B, Hq, Tq, Dv), lse (B, Hq, Tq), natural log): FlexAttention
    (eager or compiled) with its log-sum-exp; return_aux where torch has it, else return_lse."""
    kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    if AuxRequest is None:
        return fn(q, k, v, return_lse=True, **kw)
    out, aux = fn(q, k, v, return_aux=AuxRequest(lse=True), **kw)
    return out, aux.lse


def old_pair_mask(T: int, window: int):
    """mask_mod of the gate pass, whose queries are keys s and whose keys are the G * T query rows
    g * T + t of a group: the pair (t, s) is old when t - s >= window (so also causal)."""

    def mask_mod(b, h, s_idx, gt_idx):
        return gt_idx % T - s_idx >= window

    return mask_mod


@functools.lru_cache(maxsize=16)
def old_pair_block_mask(T: int, G: int, window: int, device: str):
    """Block mask of old_pair_mask over (T keys, G * T query rows); cached, built at run time."""
    return create_block_mask(old_pair_mask(T, window), None, None, T, G * T, device=device)


def gate_grad_pass(dout, q, k, v, lg, out, lse, window: int, compiled: bool):
    """The gradient of the loss w.r.t. the log-gates, dlg (B, Hkv, T) in lg's dtype, by one FlexAttention
    pass over the old pairs (the formula of spkv.reference_gate_grad):

        dlg_s = sum_{h in group} sum_{t >= s + window} P_h[t, s] (dO_ht . v_s - Delta_ht)
              = v_s . R_s - C_s,    [R_s, C_s] = sum_{h, t old} P_h[t, s] [dO_ht, Delta_ht],
        Delta_ht = dO_ht . O_ht,    P_h[t, s] = exp(q_ht . k_s / sqrt(D) + lg_s - lse_ht).

    Keys play the queries: query s of KV head j is k_s; its keys are the G * T query rows of j's
    group, q viewed as (B, Hkv, G * T, D) (row g * T + t is query t of head j * G + g), so the sum
    over the group happens inside the pass; its values are [dO_ht, Delta_ht] (D + 1). The score_mod
    adds lg_s - lse_ht, which turns the score into log P_h[t, s] (every pair of the pass is old).
    FlexAttention returns the softmax over the pass's keys and its log-sum-exp lse'_s =
    log sum P_h[t, s]; out' * exp(lse') is the unnormalized sum [R_s, C_s]. A key with no old
    query (s > T - 1 - window) or a shut gate (lg_s = -inf) has an empty sum: dlg_s = 0.
    Shapes: dout, q, out (B, H, T, D); k, v (B, Hkv, T, D); lg (B, Hkv, T) and lse (B, H, T) fp32
    (fp64 for fp64 inputs), the precision of the sums outside the pass.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    acc = lg.dtype
    delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)  # (B, H, T, 1)
    values = torch.cat([dout, delta.to(dout.dtype)], -1).to(q.dtype).reshape(B, Hkv, G * T, D + 1)
    rows = q.reshape(B, Hkv, G * T, D)  # the pass's keys: a group's query rows
    lse_rows = lse.reshape(B, Hkv, G * T)

    def score_mod(score, b, h, s_idx, gt_idx):
        return score + lg[b, h, s_idx] - lse_rows[b, h, gt_idx]

    mask = old_pair_block_mask(T, G, window, str(q.device))
    fn = compiled_flex() if compiled else flex_attention
    avg, lse_pass = flex_with_lse(fn, k.to(q.dtype), rows, values, score_mod, mask, scale=1 / math.sqrt(D))
    weight = torch.exp(lse_pass).nan_to_num(0.0)  # (B, Hkv, T): sum of P over the old pairs, 0 if none
    total = torch.where(weight[..., None] > 0, avg.to(acc) * weight[..., None], 0.0)  # (B, Hkv, T, D + 1)
    return (v.to(acc) * total[..., :D]).sum(-1) - total[..., D]


@torch.library.custom_op("spkv::gate_grad", mutates_args=())
def gate_grad_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lg: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, window: int, compiled: bool) -> torch.Tensor:
    """gate_grad_pass as an op torch.compile does not look into: dlg (B, Hkv, T), lg's dtype."""
    return gate_grad_pass(dout, q, k, v, lg, out, lse, window, compiled)


@gate_grad_op.register_fake
def _gate_grad_fake(dout, q, k, v, lg, out, lse, window, compiled):
    return torch.empty_like(lg)


@torch.library.custom_op("spkv::gate_tap", mutates_args=())
def gate_tap(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lg: torch.Tensor,
             lse: torch.Tensor, window: int, compiled: bool) -> torch.Tensor:
    """Identity on the attention output out (B, H, T, D) (a copy: an op's output may not alias its
    input). Its backward passes dout through to out and gives lg the gradient of gate_grad_pass;
    q, k, v, lse get none from here (out's own graph carries q, k, v's)."""
    return out.clone()


@gate_tap.register_fake
def _gate_tap_fake(out, q, k, v, lg, lse, window, compiled):
    return torch.empty_like(out)


def _gate_tap_setup(ctx, inputs, output):
    out, q, k, v, lg, lse, window, compiled = inputs
    ctx.save_for_backward(out, q, k, v, lg, lse)
    ctx.window, ctx.compiled = window, compiled


def _gate_tap_backward(ctx, dout):
    out, q, k, v, lg, lse = ctx.saved_tensors
    dlg = torch.ops.spkv.gate_grad(dout, q, k, v, lg, out, lse, ctx.window, ctx.compiled)
    return dout, None, None, None, dlg, None, None, None


gate_tap.register_autograd(_gate_tap_backward, setup_context=_gate_tap_setup)

FLEX_NO_BACKWARD = ("cpu", "mps")  # devices where torch refuses FlexAttention's backward


def gate_free_attention(q, k, v, lg, window, compiled: bool, block_mask=None):
    """(out (B, H, T, D), lse (B, H, T)) of SP-KV attention with lg (B, Hkv, T) detached:
    autograd reaches q, k, v, not lg. FlexAttention; where torch has no FlexAttention backward
    (CPU, MPS) and q, k or v needs a gradient, out comes from sdpa_attention and lse from a
    gradient-free FlexAttention pass, so the path trains (slowly) there too."""
    G = q.shape[1] // k.shape[1]
    mask = causal_block_mask(q.shape[2], str(q.device)) if block_mask is None else block_mask
    mod = spkv_score_mod(lg.detach(), window, G)
    fn = compiled_flex() if compiled else flex_attention
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not (needs_grad and q.device.type in FLEX_NO_BACKWARD):
        return flex_with_lse(fn, q, k, v, mod, mask, enable_gqa=G > 1)
    with torch.no_grad():
        _, lse = flex_with_lse(fn, q.detach(), k.detach(), v.detach(), mod, mask, enable_gqa=G > 1)
    return sdpa_attention(q, k, v, lg.detach(), window), lse


def gategrad_attention(q, k, v, lg, window, compiled: bool, block_mask=None):
    """SP-KV attention, the twin of flex_spkv_attention, whose gate gradient is not FlexAttention's:
    dq, dk, dv come from FlexAttention's backward (gate_free_attention), dlg from spkv::gate_tap's
    backward, the pass gate_grad_pass. lg None: plain causal attention (flex_spkv_attention)."""
    if lg is None:
        return flex_spkv_attention(q, k, v, None, window, compiled=compiled, block_mask=block_mask)
    lg = lg.to(torch.promote_types(q.dtype, torch.float32))  # fp32 gates (fp64 for fp64 inputs)
    out, lse = gate_free_attention(q, k, v, lg, window, compiled, block_mask)
    if not (torch.is_grad_enabled() and lg.requires_grad):
        return out
    return torch.ops.spkv.gate_tap(out, q.detach(), k.detach(), v.detach(), lg, lse.detach(), window, compiled)


def attention(q, k, v, lg, window, impl: str, block_mask=None):
    """Run SP-KV attention (or plain causal attention when lg is None) on the chosen path;
    block_mask: the flex paths' causal BlockMask when the caller built it (GPT.forward does)."""
    if impl == "sdpa":
        return sdpa_attention(q, k, v, lg, window)
    if impl == "flex":
        return flex_spkv_attention(q, k, v, lg, window, compiled=False, block_mask=block_mask)
    if impl == "flex_compiled":
        return flex_spkv_attention(q, k, v, lg, window, compiled=True, block_mask=block_mask)
    if impl == "flex_gategrad":
        return gategrad_attention(q, k, v, lg, window, compiled=q.device.type == "cuda", block_mask=block_mask)
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
