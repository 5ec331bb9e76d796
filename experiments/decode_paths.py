"""The SP-KV decode paths experiments/bench_decode.py times, by name: generate.py's two, and two
measured alternatives that generate.py does not carry.

    "paged"           generate.py's default: kernels.paged_decode_attention reads the page pool in place
    "paged_compiled"  the same decode step under torch.compile (generate.py --compile=True)
    "static"          generate.py --impl=static: a fixed-shape copy of the cache (cache.StaticSPKVCache)
                      whose step writes inside itself and never syncs with the host, eager
    "static_compiled" the same step compiled whole (fullgraph=True; a CUDA graph on CUDA), and the
                      dense cache's step likewise, so the two compare with the same treatment
    "static_graph"    the eager static step recorded as a CUDA graph and replayed (generate.GraphedStep),
                      the dense step likewise: no compile time (CUDA only)
    "split"           the store gathered into a padded buffer, then one softmax across the pieces
                      (store, ring, new pair) without concatenating them: split_cached_attention
    "paged_flex"      FlexAttention over the page pool with the page table as block mask; fused only
                      compiled on CUDA (torch 2.13 compiles flex_attention with its log-sum-exp there
                      only), so it runs compiled on CUDA and eager, a checking path, elsewhere
Each alternative is an SPKVCache whose decode attention uses another kernel; everything else
(prefill, writes, the keep rule) is the cache's own. tests/test_decode_paths.py holds every path
equal to generate.py's "reference" twin. Run alone, it lists the paths: `python experiments/decode_paths.py`.
"""

import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python experiments/<name>.py

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

import cli
import generate as G
import kernels
from cache import SPKVCache

PATHS = ("paged", "paged_compiled", "static", "static_compiled", "static_graph", "split", "paged_flex")


# ---------------------------------------------------------------------------------------------
# "split": gather, then one softmax across the pieces


def split_cached_attention(q, pieces):
    """Attention over keys held in separate pieces [(k, v, bias)] (the gathered store, the ring,
    the new tokens) without concatenating them: scores per piece, one softmax across all through
    a shared max and summed normalizers. Saves the copy of the whole key set that the gather
    path's concatenation makes. q (R, H, T, D); each k, v (R, Hkv, S_i, D), bias (R, Hkv, T, S_i)."""
    R, H, T, D = q.shape
    Hkv = pieces[0][0].shape[1]
    G_ = H // Hkv
    qg = q.reshape(R, Hkv, G_ * T, D) / math.sqrt(D)  # (R, Hkv, G*T, D): G heads folded into rows
    scores = [qg @ k.transpose(-1, -2) + kernels.fold_bias(b.to(q.dtype), G_) for k, _, b in pieces]  # (R, Hkv, G*T, S_i)
    top = torch.stack([s.amax(-1) for s in scores]).amax(0)[..., None]  # (R, Hkv, G*T, 1)
    weights = [torch.exp(s - top) for s in scores]
    out = sum(w @ v for w, (_, v, _) in zip(weights, pieces)) / sum(w.sum(-1, keepdim=True) for w in weights)
    return out.reshape(R, H, T, D)


class SplitCache(SPKVCache):
    """SPKVCache whose decode steps attend through split_cached_attention over the gathered store."""

    def update_and_attend(self, layer, q, k, v, logit, pos):
        if self.rows is not None:  # prefill chunks: the cache's own gather path
            return super().update_and_attend(layer, q, k, v, logit, pos)
        keep = self.keep_flags(logit, k)  # (B, Hkv, 1)
        self.staged.append((k, v, keep, pos))
        R, Hkv = k.shape[:2]
        pieces = self.keys(layer, self.all_rows()) + [(k, v, pos[:, None].expand(R, Hkv, -1), keep)]
        return split_cached_attention(q, [(pk, pv, kernels.cache_bias(pos, pp, pkeep, self.w))
                                          for pk, pv, pp, pkeep in pieces])


# ---------------------------------------------------------------------------------------------
# "paged_flex": the page table becomes FlexAttention's block mask


def page_table(store):
    """(table (S, n), pages per stream (S,)) of a cache.PagedStore, with n the pool size of
    store.pool(): stream s holds pages table[s, :n_pages[s]], in order; the rest is padding. As
    wide as the pool, so a compiled step sees one growing size, never the width."""
    n = store.pool()[0].shape[0]
    table = store.table.new_zeros(store.table.shape[0], n)  # every page id is < n, so width <= n
    table[:, :store.table.shape[1]] = store.table
    return table, store.pages_for(store.length)


def page_block_mask(pos_pool, owner, table, n_pages):
    """A BlockMask over the flattened pool (P * p keys) for S "batches", one per stream, with one
    KV block per page: stream s lists the pages of its page-table row, table[s, :n_pages[s]], so a
    fused kernel reads only those. mask_mod is the exact rule (the slot is filled and its page
    belongs to stream b); eager flex_attention applies only mask_mod, the fused kernel both."""
    P, p = pos_pool.shape
    S = table.shape[0]  # table (S, P): page_table(store), as wide as the pool
    filled = pos_pool.reshape(-1) >= 0  # (P * p,)

    def mask_mod(b, h, q_idx, kv_idx):
        return filled[kv_idx] & (owner[kv_idx // p] == b)

    kv_indices = table.to(torch.int32).view(S, 1, 1, P)  # (S, 1 head, 1 q block, P)
    return BlockMask.from_kv_blocks(n_pages.to(torch.int32).view(S, 1, 1), kv_indices, BLOCK_SIZE=(128, p),
                                    mask_mod=mask_mod, seq_lengths=(1, P * p), compute_q_blocks=False)


def paged_flex_decode_attention(q, k, v, pos, pool, pages, ring, window):
    """kernels.paged_decode_attention with FlexAttention over the store: each stream is one batch
    entry of a flex_attention call whose keys are the whole pool (a stride-0 view, no copy) and
    whose block mask is built from the page table (page_block_mask); flex returns the store's
    log-sum-exp, and the ring and the new pair are merged in through it. pages = page_table(store):
    table (S, P), n_pages (S,). Eager (any device) it materializes the scores of every stream
    against the whole pool: a correctness twin, not a fast path."""
    k_pool, v_pool, pos_pool, owner = pool
    B, H, _, D = q.shape
    Hkv = ring[0].shape[1]
    G_, S = H // Hkv, B * Hkv
    P, p = pos_pool.shape
    keys = k_pool.reshape(1, 1, P * p, D).expand(S, 1, P * p, D)  # every stream sees the pool; the mask picks
    values = v_pool.reshape(1, 1, P * p, D).expand(S, 1, P * p, D)
    # the fused decoding kernel takes a power-of-two query group only (SmolLM2 has G = 3): pad the
    # group with zero queries, whose rows are dropped after
    Gp = 1 << (G_ - 1).bit_length()
    qf = q.reshape(S, G_, 1, D)
    qf = torch.cat([qf, qf.new_zeros(S, Gp - G_, 1, D)], 1) if Gp != G_ else qf  # (S, Gp, 1, D)
    out, aux = flex_attention(qf, keys, values, block_mask=page_block_mask(pos_pool, owner, *pages),
                              scale=1 / math.sqrt(D), enable_gqa=Gp > 1, return_aux=AuxRequest(lse=True))
    out, lse = out[:, :G_], aux.lse[:, :G_]  # (S, G, 1, D), (S, G, 1)
    out_store, lse_store = out.reshape(B, Hkv, G_, D).float(), lse.reshape(B, Hkv, G_).float()  # lse -inf: empty
    s_ring, s_new = kernels.local_scores(q.reshape(B, Hkv, G_, D) / math.sqrt(D), k, pos, ring, window)
    s_local = torch.cat([s_ring, s_new], -1)  # (B, Hkv, G, w + 1)
    lse_local = torch.logsumexp(s_local, -1)  # finite: the new pair is always there
    out_local = (torch.softmax(s_local, -1).to(v.dtype) @ torch.cat([ring[1], v], 2)).float()  # (B, Hkv, G, D)
    top = torch.maximum(lse_store, lse_local)
    w_store, w_local = torch.exp(lse_store - top)[..., None], torch.exp(lse_local - top)[..., None]
    out = (out_store * w_store + out_local * w_local) / (w_store + w_local)
    return out.to(q.dtype).reshape(B, H, 1, D)


class FlexPagedCache(SPKVCache):
    """SPKVCache whose decode steps attend through paged_flex_decode_attention."""

    def update_and_attend(self, layer, q, k, v, logit, pos):
        if self.rows is not None:  # prefill chunks: the cache's own gather path
            return super().update_and_attend(layer, q, k, v, logit, pos)
        keep = self.keep_flags(logit, k)
        self.staged.append((k, v, keep, pos))
        ring = (self.ring_k[layer], self.ring_v[layer], self.ring_pos[layer], self.ring_keep[layer])
        store = self.stores[layer]
        return paged_flex_decode_attention(q, k, v, pos[:, 0], store.pool(), page_table(store), ring, self.w)


# ---------------------------------------------------------------------------------------------
# By name


def cache_class(path: str):
    return {"split": SplitCache, "paged_flex": FlexPagedCache}.get(path, SPKVCache)


def is_compiled(path: str, cuda: bool) -> bool:
    """Whether the decode step runs under torch.compile: "*_compiled" always, "paged_flex" on CUDA."""
    return path.endswith("_compiled") or (path == "paged_flex" and cuda)


def is_static(path: str) -> bool:
    """Whether the path decodes through cache.StaticSPKVCache and generate.static_step."""
    return path.startswith("static")


def describe(path: str, cuda: bool) -> str:
    """The path in words, for the bench's one header line."""
    how = "torch.compile" if is_compiled(path, cuda) else "eager"
    if path == "split":
        return "store gathered, one softmax across store, ring and new pair (eager)"
    if path == "static_graph":
        return "static cache, no host sync, the eager step recorded as a CUDA graph (the dense step likewise)"
    if is_static(path):
        graph = "torch.compile fullgraph" + (" + CUDA graph" if cuda else "") if is_compiled(path, cuda) else "eager"
        return f"static cache, no host sync, writes inside the step ({graph}; the dense step likewise)"
    if path == "paged_flex":
        return f"FlexAttention over the page pool, page table as block mask ({how}{'' if cuda else ', unfused: a checking path'})"
    return f"page pool read in place, kernels.paged_decode_attention ({how})"


def new_cache(path, model, B, page_size=16):
    """An empty SP-KV cache for B rows whose decode steps take `path`."""
    if path not in PATHS:
        raise ValueError(f"unknown decode path {path!r}; use one of {PATHS}")
    c, p = model.cfg, next(model.parameters())
    return cache_class(path)(c.n_layer, B, c.n_kv_head, c.head_dim, c.window, c.tau, p.dtype, p.device, page_size)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, path, chunk=256, page_size=16):
    """generate.generate (greedy) with the decode steps on `path`: (tokens (B, n), logits (B, n, V))."""
    G.check_request(model, prompts, max_new_tokens)
    cache = new_cache(path, model, len(prompts), page_size)
    first = G.prefill(model, cache, prompts, chunk)
    compiled = is_compiled(path, first.is_cuda)
    return G.decode_n_tokens(model, cache, first, [len(p) for p in prompts], max_new_tokens, {}, compiled)


@dataclass
class Flags:
    cuda: bool = False  # describe each path as it runs on CUDA (compiled flex) instead of this machine's CPU


def main(argv):
    o = {"cuda": False, **cli.parse(argv, Flags, "decode_paths.py")}
    print("SP-KV decode paths (experiments/bench_decode.py times them; tests/test_decode_paths.py checks them):")
    for path in PATHS:
        print(f"  {path:<15} {describe(path, o['cuda'])}")


if __name__ == "__main__":
    cli.run(main, "decode_paths.py")
