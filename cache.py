"""The decode-time KV caches: SP-KV's compacting cache (a ring + a paged long-term store), its
static twin for decode steps without host syncs, and the plain dense cache they are measured against. Each cache owns its attention: the model's attention
calls cache.update_and_attend(layer, q, k, v, logit, pos), and the cache keeps the new pairs by
the keep rule (spkv.hard_keep, METHOD.md section 3) and answers with the attention output of the
kernel it owns (kernels.py). The caches report what they hold, so tests can look.

SPKVCache, per layer, per sequence (row), per KV head ("stream" = (row, head)), METHOD.md section 6:
  ring   the last `window` pairs, slot = position % window, always attended;
  store  older pairs with u >= tau, in a pool of fixed-size pages with a page table per stream.
A pair leaving the ring goes to the store if it was kept, and is dropped for good otherwise. Pages
are taken from the pool only for kept pairs, so bytes in use follow the kept pairs (at most one
partly filled page per stream), not the densest head. Keys are stored after RoPE, at their
original positions: nothing is ever re-rotated.
Shapes: B rows, Hkv KV heads, w window, D head dim, P pages, p page size, S = B * Hkv streams,
R rows of one forward pass, T its new tokens.
"""

import copy

import torch

import kernels
import spkv


class PagedStore:
    """One layer's long-term store: pools k, v (P, p, D), pos (P, p), and per stream a row of the
    page table (S, max pages) and a length. The pool grows (doubling) when it runs out of pages."""

    def __init__(self, n_streams, head_dim, page_size, dtype, device, init_pages=8):
        if page_size < 1:
            raise ValueError(f"page_size={page_size}: a page must hold at least one pair (try 16)")
        self.page_size = page_size
        self.k = torch.zeros(init_pages, page_size, head_dim, dtype=dtype, device=device)  # (P, p, D)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((init_pages, page_size), -1, dtype=torch.long, device=device)  # (P, p)
        self.owner = torch.full((init_pages,), -1, dtype=torch.long, device=device)  # (P,) stream, -1 free
        self.free = list(range(init_pages - 1, -1, -1))  # page ids not held by any stream, lowest last
        self.span = 0  # pages [0, span) cover every page ever handed out: what a decode step must read
        self.table = torch.zeros(n_streams, 1, dtype=torch.long, device=device)  # (S, max pages)
        self.length = torch.zeros(n_streams, dtype=torch.long, device=device)  # (S,) pairs held
        self._refresh_view()

    def pages_for(self, n_pairs):
        """Pages needed to hold n_pairs (an int or a tensor of counts): ceil(n / page_size)."""
        return (n_pairs + self.page_size - 1) // self.page_size

    def pages_in_use(self) -> int:
        return self.k.shape[0] - len(self.free)

    def _grow_pool(self, n_needed: int):
        old = self.k.shape[0]
        new = max(2 * old, old + n_needed)

        def pad(t, fill):  # (old, ...) -> (new, ...), the new pages filled with `fill`
            return torch.cat([t, t.new_full((new - old, *t.shape[1:]), fill)])

        self.k, self.v, self.pos, self.owner = pad(self.k, 0), pad(self.v, 0), pad(self.pos, -1), pad(self.owner, -1)
        self.free = list(range(new - 1, old - 1, -1)) + self.free

    def _alloc(self, n: int) -> torch.Tensor:
        if n > len(self.free):
            self._grow_pool(n - len(self.free))
        ids, self.free = self.free[len(self.free) - n:], self.free[:len(self.free) - n]
        self.span = max(self.span, max(ids, default=-1) + 1)
        return torch.tensor(ids[::-1], dtype=torch.long, device=self.k.device)

    def append(self, streams, k, v, pos):
        """Append pairs in order: streams (N,) (repeats allowed), k, v (N, D), pos (N,).

        Worked example, page size p = 2, two streams; stream 0 holds 1 pair (page 5), stream 1
        holds 2 (page 3, full); append streams = [1, 0, 1, 1]:
            counts    = [1, 3]            new pairs per stream
            rank      = [0, 0, 1, 2]      each pair's place among its stream's new pairs
            old_pages = [1, 1], new_pages = ceil([1 + 1, 2 + 3] / 2) = [1, 3], need = [0, 2]
            taker     = [1, 1], col = [1, 2]: stream 1 gets two fresh pages in table[1, 1:3]
            slot      = length[streams] + rank = [2, 1, 3, 4]: the pair's index in its stream
            page      = table[streams, slot // 2] = [table[1, 1], 5, table[1, 1], table[1, 2]]
        and each pair lands at (page, slot % 2) = offsets [0, 1, 1, 0]."""
        if streams.numel() == 0:
            return
        S, p = self.length.shape[0], self.page_size
        counts = torch.bincount(streams, minlength=S)  # (S,) new pairs per stream
        order = torch.argsort(streams, stable=True)
        starts = torch.cumsum(counts, 0) - counts  # (S,) where each stream's run starts in `order`
        rank = torch.empty_like(streams)  # (N,)
        rank[order] = torch.arange(streams.numel(), device=streams.device) - starts[streams[order]]
        old_pages = self.pages_for(self.length)  # (S,)
        new_pages = self.pages_for(self.length + counts)  # (S,)
        if int(new_pages.max()) > self.table.shape[1]:  # widen the page table
            self.table = torch.cat([self.table, self.table.new_zeros(S, int(new_pages.max()) - self.table.shape[1])], 1)
        need = new_pages - old_pages  # (S,) fresh pages per stream
        if int(need.sum()) > 0:
            taker = torch.repeat_interleave(torch.arange(S, device=streams.device), need)  # a stream per new page
            first = (torch.cumsum(need, 0) - need)[taker]  # where the taker's run of new pages starts
            col = old_pages[taker] + torch.arange(taker.numel(), device=taker.device) - first  # its table column
            pages = self._alloc(taker.numel())
            self.table[taker, col], self.owner[pages] = pages, taker
        slot = self.length[streams] + rank  # (N,) index of the pair within its stream
        page = self.table[streams, slot // p]  # (N,)
        self.k[page, slot % p], self.v[page, slot % p], self.pos[page, slot % p] = k, v, pos
        self.length += counts
        self._refresh_view()

    def pool(self):
        """The pool up to the span, as views (k, v, pos, owner) for kernels.paged_decode_attention,
        kept by every change to the store, so that reading it (inside a compiled decode step)
        involves no Python arithmetic on the span."""
        return self.view

    def _refresh_view(self):
        """Pages are handed out lowest id first, so the span stays near the pages in use even
        after the pool doubles: free pages beyond it are never read."""
        n = max(self.span, min(2, self.k.shape[0]))  # >= 2: torch.compile specializes sizes 0 and 1
        self.view = (self.k[:n], self.v[:n], self.pos[:n], self.owner[:n])

    def gather(self, streams):
        """Padded views of the given streams: k, v (N, L, D), pos (N, L) with -1 for padding."""
        n_pages = int(self.pages_for(self.length[streams].max()).clamp(min=1))
        pages = self.table[streams, :n_pages]  # (N, n_pages)
        L = n_pages * self.page_size
        valid = torch.arange(L, device=pages.device)[None] < self.length[streams][:, None]  # (N, L)
        pos = self.pos[pages].flatten(1).masked_fill(~valid, -1)
        return self.k[pages].flatten(1, 2), self.v[pages].flatten(1, 2), pos

    def free_streams(self, streams):
        """Return the pages of finished streams to the pool, emptied (pos -1, no owner)."""
        for s in streams.tolist():
            n = int(self.pages_for(self.length[s]))
            pages = self.table[s, :n]
            self.pos[pages], self.owner[pages] = -1, -1
            self.free += pages.tolist()
            self.length[s] = 0
        self._refresh_view()


class SPKVCache:
    """Ring + paged store for every layer, and the attention over them.

    update_and_attend() attends the new queries to what the cache holds plus the new pairs and
    stages the new pairs with their keep flags; commit() writes them (the ring, and the pairs the
    ring displaces into the store if kept). Splitting the two keeps a decode step free of writes,
    so it can run as one compiled graph. A forward pass covers every row (a decode step) or the
    rows of for_rows(rows) (a prefill chunk of one row). Kernels (METHOD.md section 3 over the cache):
        decode step, paged=True   kernels.paged_decode_attention reads the page pool in place
        otherwise                 the store is gathered and kernels.cached_attention runs
                                  ("sdpa" when paged, the plain-ops "reference" when not)
    """

    def __init__(self, n_layer, B, n_kv_head, head_dim, window, tau, dtype, device, page_size=16, paged=True):
        self.Hkv, self.w, self.D, self.tau, self.paged = n_kv_head, window, head_dim, tau, paged
        shape = (n_layer, B, n_kv_head, window)
        self.ring_k = torch.zeros(*shape, head_dim, dtype=dtype, device=device)  # (L, B, Hkv, w, D)
        self.ring_v = torch.zeros_like(self.ring_k)
        self.ring_keep = torch.zeros(shape, dtype=torch.bool, device=device)  # (L, B, Hkv, w)
        self.ring_pos = torch.full((n_layer, B, window), -1, dtype=torch.long, device=device)  # (L, B, w)
        self.stores = [PagedStore(B * n_kv_head, head_dim, page_size, dtype, device) for _ in range(n_layer)]
        self.rows = None  # (R,) rows of the current forward pass; None = every row (a decode step)
        self.staged = []  # per layer of the current forward pass: (k, v, keep, pos) waiting for commit()

    def for_rows(self, rows):
        """This cache as one forward pass over some rows sees it (a prefill chunk of row r: rows =
        tensor([r])): the same tensors and stores, its own staged pairs."""
        view = copy.copy(self)
        view.rows, view.staged = rows, []
        return view

    def keep_flags(self, logit, k):
        """The keep rule on the new pairs: spkv.hard_keep of their gate logits (R, Hkv, T); a
        dense layer (no gates) keeps every pair."""
        if logit is None:
            return torch.ones(k.shape[:3], dtype=torch.bool, device=k.device)
        return spkv.hard_keep(logit, self.tau)

    def update_and_attend(self, layer, q, k, v, logit, pos):
        """q (R, H, T, D), k, v (R, Hkv, T, D), logit (R, Hkv, T) or None, pos (R, T) -> attention
        output (R, H, T, D) over the held pairs and the new ones; the new pairs wait for commit()."""
        keep = self.keep_flags(logit, k)  # (R, Hkv, T)
        self.staged.append((k, v, keep, pos))
        if self.rows is None and self.paged:  # a decode step: read the page pool in place
            ring = (self.ring_k[layer], self.ring_v[layer], self.ring_pos[layer], self.ring_keep[layer])
            return kernels.paged_decode_attention(q, k, v, pos[:, 0], self.stores[layer].pool(), ring, self.w)
        return self.attend_gathered(layer, q, k, v, keep, pos)

    def attend_gathered(self, layer, q, k, v, keep, pos):
        """The gather path: the rows' store pairs, ring and the new pairs concatenated, then
        kernels.cached_attention with the hard-gate bias (kernels.cache_bias)."""
        R, Hkv = k.shape[:2]
        pieces = self.keys(layer, self.all_rows() if self.rows is None else self.rows)
        pieces.append((k, v, pos[:, None].expand(R, Hkv, -1), keep))
        k_all, v_all, pos_all, keep_all = (torch.cat(t, 2) for t in zip(*pieces))  # (R, Hkv, n, ...)
        bias = kernels.cache_bias(pos, pos_all, keep_all, self.w)  # (R, Hkv, T, n)
        return kernels.cached_attention(q, k_all, v_all, bias, "sdpa" if self.paged else "reference")

    def commit(self):
        """Write the pairs staged by the forward pass that just ran, layer by layer."""
        for layer, (k, v, keep, pos) in enumerate(self.staged):
            if self.rows is None:  # a decode step: one pair per row
                self.write(layer, self.all_rows(), k[:, :, 0], v[:, :, 0], keep[:, :, 0], pos[:, 0])
            else:  # a prefill chunk of one row
                self.write_chunk(layer, int(self.rows[0]), k[0], v[0], keep[0], pos[0])
        self.staged.clear()

    def all_rows(self):
        return torch.arange(self.ring_pos.shape[1], device=self.ring_pos.device)  # (B,)

    def streams(self, rows):
        """Stream ids (R, Hkv) of the given rows."""
        return rows[:, None] * self.Hkv + torch.arange(self.Hkv, device=rows.device)

    def write(self, layer, rows, k, v, keep, pos):
        """Write one new pair per row: k, v (R, Hkv, D), keep (R, Hkv), pos (R,). The pair it
        displaces from the ring (position pos - w) moves to the store if it was kept."""
        slot = pos % self.w  # (R,)
        old_pos = self.ring_pos[layer, rows, slot]  # (R,)
        leaving = (old_pos >= 0)[:, None] & self.ring_keep[layer, rows, :, slot]  # (R, Hkv)
        if leaving.any():
            r, h = leaving.nonzero(as_tuple=True)
            self.stores[layer].append(self.streams(rows)[r, h], self.ring_k[layer, rows[r], h, slot[r]],
                                      self.ring_v[layer, rows[r], h, slot[r]], old_pos[r])
        self.ring_k[layer, rows, :, slot], self.ring_v[layer, rows, :, slot] = k, v
        self.ring_keep[layer, rows, :, slot], self.ring_pos[layer, rows, slot] = keep, pos

    def write_chunk(self, layer, row, k, v, keep, pos):
        """Write C consecutive pairs of one row: k, v (Hkv, C, D), keep (Hkv, C), pos (C,). Pairs
        that leave the window inside the chunk go straight to the store (if kept)."""
        rp = self.ring_pos[layer, row]
        order = torch.argsort(rp)[rp.sort().values >= 0]  # occupied slots, oldest first
        all_k = torch.cat([self.ring_k[layer, row][:, order], k], 1)  # (Hkv, n, D)
        all_v = torch.cat([self.ring_v[layer, row][:, order], v], 1)
        all_keep = torch.cat([self.ring_keep[layer, row][:, order], keep], 1)  # (Hkv, n)
        all_pos = torch.cat([rp[order], pos])  # (n,)
        n_leave = max(0, all_pos.numel() - self.w)
        h, i = all_keep[:, :n_leave].T.nonzero(as_tuple=True)[::-1]  # position-major order
        self.stores[layer].append(row * self.Hkv + h, all_k[h, i], all_v[h, i], all_pos[i])
        stay_pos, slot = all_pos[n_leave:], all_pos[n_leave:] % self.w
        self.ring_pos[layer, row] = -1
        self.ring_pos[layer, row, slot] = stay_pos
        self.ring_k[layer, row][:, slot], self.ring_v[layer, row][:, slot] = all_k[:, n_leave:], all_v[:, n_leave:]
        self.ring_keep[layer, row][:, slot] = all_keep[:, n_leave:]

    def keys(self, layer, rows):
        """What row(s) can attend to, as pieces [store, ring] to concatenate along the sequence:
        k, v (R, Hkv, n, D), pos (R, Hkv, n) with -1 for empty, keep (R, Hkv, n) (store pairs are
        kept by definition; ring pairs carry their own flag)."""
        R = rows.numel()
        sk, sv, spos = self.stores[layer].gather(self.streams(rows).flatten())
        store = (sk.view(R, self.Hkv, -1, self.D), sv.view(R, self.Hkv, -1, self.D), spos.view(R, self.Hkv, -1))
        span = slice(int(rows[0]), int(rows[0]) + R)  # rows are consecutive (one row, or all): views
        ring = (self.ring_k[layer, span], self.ring_v[layer, span],
                self.ring_pos[layer, span][:, None].expand(R, self.Hkv, self.w))
        return [(*store, store[2] >= 0), (*ring, self.ring_keep[layer, span])]

    def kept_per_layer(self) -> list:
        """Pairs in the long-term store, per layer."""
        return [int(s.length.sum()) for s in self.stores]

    def held_positions(self, layer, row, head) -> set:
        """Positions of every pair held for one stream (ring and store), for tests."""
        store = self.stores[layer]
        s = row * self.Hkv + head
        k, v, pos = store.gather(torch.tensor([s], device=store.length.device))
        ring = self.ring_pos[layer, row]
        return set(pos[pos >= 0].tolist()) | set(ring[ring >= 0].tolist())

    def nbytes(self) -> dict:
        """Bytes of the ring, of the kept store pairs, in use (ring + store pages held) and
        allocated (ring + whole pool capacity)."""
        per_pair = 2 * self.D * self.ring_k.element_size() + 8  # k + v + position
        ring = self.ring_k.numel() // self.D * per_pair
        pages = sum(s.pages_in_use() for s in self.stores) * self.stores[0].page_size * per_pair
        pool = sum(s.k.shape[0] for s in self.stores) * self.stores[0].page_size * per_pair
        kept = sum(int(s.length.sum()) for s in self.stores) * per_pair
        return {"ring": ring, "store_kept": kept, "in_use": ring + pages, "allocated": ring + pool}


class DenseKVCache:
    """The plain cache SP-KV is measured against: preallocated (L, B, Hkv, max_len, D), written by
    position (gpt-fast's KVCache). Holds every pair; nothing is evicted. update_and_attend writes
    the new pairs at once (a write by position needs no staging), so commit() has nothing to do.
    A decode step attends over all max_len slots with the unwritten ones masked, as gpt-fast does:
    fixed shapes and no host sync, so it compiles whole, like StaticSPKVCache."""

    def __init__(self, n_layer, B, n_kv_head, head_dim, max_len, dtype, device, impl="sdpa"):
        self.k = torch.zeros(n_layer, B, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.impl = impl  # kernels.cached_attention path: "sdpa", or the plain-ops "reference"
        self.rows = None  # (R,) rows of the current forward pass; None = every row (a decode step)

    def for_rows(self, rows):
        """This cache as one forward pass over some rows sees it (see SPKVCache.for_rows)."""
        view = copy.copy(self)
        view.rows = rows
        return view

    def update_and_attend(self, layer, q, k, v, logit, pos):
        """Write the new pairs k, v (R, Hkv, T, D) at positions pos (R, T), then attend q (R, H, T, D)
        causally to every pair up to the newest position."""
        if self.rows is None:  # a decode step, gpt-fast style: write by position, attend over the whole length
            rows = torch.arange(self.k.shape[1], device=k.device)  # (B,)
            self.k[layer, rows, :, pos[:, 0]], self.v[layer, rows, :, pos[:, 0]] = k[:, :, 0], v[:, :, 0]
            keys, values = self.k[layer], self.v[layer]  # (B, Hkv, max_len, D): fixed shapes, no host sync
        else:  # a prefill chunk of one row, consecutive positions
            r, p0, p1 = int(self.rows[0]), int(pos[0, 0]), int(pos[0, -1]) + 1
            self.k[layer, r, :, p0:p1], self.v[layer, r, :, p0:p1] = k[0], v[0]
            keys, values = self.k[layer, r:r + 1, :, :p1], self.v[layer, r:r + 1, :, :p1]  # (1, Hkv, p1, D)
        n = keys.shape[2]
        k_pos = torch.arange(n, device=q.device).expand(keys.shape[0], k.shape[1], n)  # (R, Hkv, n)
        bias = kernels.cache_bias(pos, k_pos, torch.ones_like(k_pos, dtype=torch.bool), window=n + 1)  # hides s > t
        return kernels.cached_attention(q, keys, values, bias, self.impl)

    def commit(self):
        """Nothing is staged: update_and_attend wrote the pairs by position."""

    def nbytes(self) -> dict:
        b = 2 * self.k.numel() * self.k.element_size()
        return {"in_use": b, "allocated": b}


class StaticSPKVCache:
    """SPKVCache's decode steps with no host sync: every tensor is allocated once and every write
    has a fixed shape, so a whole decode step (the model, this cache's writes, sampling) compiles
    with fullgraph=True and replays as one CUDA graph. Built from a prefilled SPKVCache by
    from_cache(); the prefill, with its variable-length chunks, stays there. The twin it must
    equal is SPKVCache's paged decode step; it runs the same kernel (paged_decode_attention).

    Per layer l, stacked on a leading L axis (S = B * Hkv streams, P pages, p pairs a page):
      k, v (L, P + 1, p, D), pos (L, P + 1, p) (-1: empty slot), owner (L, P + 1) (-1: free). Page P
            is the trash page: a stream with nothing to store writes there, and it is never owned,
            so attention never sees it.
      table (L, S, n_cols) int32 at full width, n_cols = ceil(max_len / p): stream s holds pages
            table[l, s, :ceil(length / p)], in order.
      length (L, S) int32, pairs held per stream.
      free (L, P) int32, a stack of free page ids with the lowest on top, and n_free (L,) int32 its
            height: a stream whose pair starts a page pops one, all streams at once (a cumsum ranks them).
      ring_* as SPKVCache's.
    overflow, a 0-dim bool, is set on the device if a pair found no free page (it went to the trash:
    an error). The host never lets that happen: every N steps it calls ensure_room(N), which reads
    the free counts (one sync) and, if fewer than N steps' worst case remain, grows the pool (new
    shapes: a compiled step compiles, or a CUDA graph is captured, once more).
    """

    def __init__(self, n_layer, B, n_kv_head, head_dim, window, tau, n_pages, page_size, max_len, dtype, device):
        L, S, P, p = n_layer, B * n_kv_head, n_pages, page_size
        self.Hkv, self.w, self.D, self.tau, self.page_size, self.trash = n_kv_head, window, head_dim, tau, p, P
        self.k = torch.zeros(L, P + 1, p, head_dim, dtype=dtype, device=device)  # (L, P + 1, p, D)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((L, P + 1, p), -1, dtype=torch.long, device=device)  # (L, P + 1, p)
        self.owner = torch.full((L, P + 1), -1, dtype=torch.long, device=device)  # (L, P + 1)
        self.table = torch.zeros(L, S, -(-max_len // p), dtype=torch.int32, device=device)  # (L, S, n_cols)
        self.length = torch.zeros(L, S, dtype=torch.int32, device=device)  # (L, S)
        self.free = torch.arange(P - 1, -1, -1, dtype=torch.int32, device=device).repeat(L, 1)  # (L, P), top last
        self.n_free = torch.full((L,), P, dtype=torch.int32, device=device)  # (L,)
        self.overflow = torch.zeros((), dtype=torch.bool, device=device)
        shape = (L, B, n_kv_head, window)
        self.ring_k = torch.zeros(*shape, head_dim, dtype=dtype, device=device)  # (L, B, Hkv, w, D)
        self.ring_v = torch.zeros_like(self.ring_k)
        self.ring_keep = torch.zeros(shape, dtype=torch.bool, device=device)  # (L, B, Hkv, w)
        self.ring_pos = torch.full((L, B, window), -1, dtype=torch.long, device=device)  # (L, B, w)
        self.rows = None  # decode steps only: every row
        self.streams = torch.arange(S, device=device)  # (S,)

    @classmethod
    def from_cache(cls, cache: SPKVCache, max_len: int, room_steps: int = 64):
        """A static copy of a prefilled SPKVCache, for rows of up to max_len tokens, with pages
        for room_steps more decode steps on top of the pages held."""
        L, B, Hkv, w, D = cache.ring_k.shape
        S, p = B * Hkv, cache.stores[0].page_size
        held = max(s.pages_in_use() for s in cache.stores)
        self = cls(L, B, Hkv, D, w, cache.tau, held + S * (room_steps // p + 1), p, max_len,
                   cache.ring_k.dtype, cache.ring_k.device)
        for name in ("ring_k", "ring_v", "ring_keep", "ring_pos"):
            getattr(self, name).copy_(getattr(cache, name))
        for layer, store in enumerate(cache.stores):
            n_pages = store.pages_for(store.length).tolist()  # (S,) pages per stream, in table order
            src = torch.cat([store.table[s, :n] for s, n in enumerate(n_pages)]).long()  # (held_l,)
            n = src.numel()
            self.k[layer, :n], self.v[layer, :n], self.pos[layer, :n] = store.k[src], store.v[src], store.pos[src]
            self.owner[layer, :n] = torch.repeat_interleave(self.streams, torch.tensor(n_pages, device=src.device))
            for s, first in enumerate(torch.tensor([0] + n_pages).cumsum(0)[:-1].tolist()):
                self.table[layer, s, :n_pages[s]] = torch.arange(first, first + n_pages[s], dtype=torch.int32)
            self.length[layer] = store.length.to(torch.int32)
            self.n_free[layer] = self.trash - n  # pages n .. P - 1 are free, n on top
        return self

    def commit(self):
        """Nothing is staged: update_and_attend writes inside the step."""

    def update_and_attend(self, layer, q, k, v, logit, pos):
        """One decode step of one layer: q (B, H, 1, D), k, v (B, Hkv, 1, D), logit (B, Hkv, 1) or
        None, pos (B, 1). Attends over the store, the ring and the new pair (paged_decode_attention,
        as SPKVCache does), then writes: the ring pair this one displaces goes to the store if it
        was kept, and the new pair takes its ring slot. No host sync, fixed shapes."""
        keep = torch.ones(k.shape[:3], dtype=torch.bool, device=k.device) if logit is None \
            else spkv.hard_keep(logit, self.tau)  # (B, Hkv, 1)
        ring = (self.ring_k[layer], self.ring_v[layer], self.ring_pos[layer], self.ring_keep[layer])
        pool = (self.k[layer], self.v[layer], self.pos[layer], self.owner[layer])
        out = kernels.paged_decode_attention(q, k, v, pos[:, 0], pool, ring, self.w)
        self.write(layer, k[:, :, 0], v[:, :, 0], keep[:, :, 0], pos[:, 0])
        return out

    def write(self, layer, k, v, keep, pos):
        """k, v (B, Hkv, D), keep (B, Hkv), pos (B,): the displaced ring pair to the store (or the
        trash page), the new pair into the ring."""
        B, Hkv = keep.shape
        rows, slot = torch.arange(B, device=pos.device), pos % self.w  # (B,)
        old_pos = self.ring_pos[layer, rows, slot]  # (B,)
        leaving = ((old_pos >= 0)[:, None] & self.ring_keep[layer, rows, :, slot]).flatten()  # (S,)
        length = self.length[layer]  # (S,)
        col, offset = length // self.page_size, length % self.page_size
        need = leaving & (offset == 0)  # (S,) starts a page: pops one from the free stack
        top = self.n_free[layer] - torch.cumsum(need.int(), 0)  # (S,) stack index of its page
        got = need & (top >= 0)
        fresh = self.free[layer][top.clamp(0, self.free.shape[1] - 1)]  # (S,) int32; read only where got
        self.overflow |= (need & ~got).any()
        self.n_free[layer] = (self.n_free[layer] - need.sum()).clamp(min=0)
        col = col.clamp(max=self.table.shape[2] - 1).long()
        held = torch.where(got, fresh, self.table[layer, self.streams, col])  # (S,) the page the pair goes to
        self.table[layer, self.streams, col] = held
        stored = leaving & (got | ~need)  # (S,) has a page to go to
        page = torch.where(stored, held.long(), self.trash)  # (S,)
        offset = torch.where(stored, offset, 0).long()
        self.owner[layer].index_put_((torch.where(got, fresh.long(), self.trash),), torch.where(got, self.streams, -1))
        self.k[layer].index_put_((page, offset), self.ring_k[layer, rows, :, slot].flatten(0, 1))
        self.v[layer].index_put_((page, offset), self.ring_v[layer, rows, :, slot].flatten(0, 1))
        self.pos[layer].index_put_((page, offset), torch.where(stored, old_pos.repeat_interleave(Hkv, 0,
                                                                                                  output_size=B * Hkv), -1))
        self.length[layer] += stored.int()
        self.ring_k[layer, rows, :, slot], self.ring_v[layer, rows, :, slot] = k, v
        self.ring_keep[layer, rows, :, slot], self.ring_pos[layer, rows, slot] = keep, pos

    def pages_left(self) -> int:
        """Free pages of the fullest layer (reads the device: a sync, for the host's checks)."""
        return int(self.n_free.min())

    def ensure_room(self, n_steps: int) -> bool:
        """Before n_steps more decode steps (a host check, one sync): grow the pool if it could run
        out, doubling its pages. True when it grew (a compiled step sees new shapes)."""
        if bool(self.overflow):
            raise RuntimeError("the static KV cache overflowed: a kept pair was lost (ensure_room was not called)")
        need = self.table.shape[1] * (n_steps // self.page_size + 1)  # one page per stream per p steps, worst case
        if self.pages_left() >= need:
            return False
        self.grow(max(self.trash, need))
        return True

    def grow(self, extra: int):
        """extra more pages in every layer; the trash page moves to the new end."""
        L, P = self.owner.shape[0], self.trash
        pad = lambda t, fill: torch.cat([t[:, :P], t.new_full((L, extra, *t.shape[2:]), fill), t[:, P:]], 1)
        self.k, self.v, self.pos, self.owner = pad(self.k, 0), pad(self.v, 0), pad(self.pos, -1), pad(self.owner, -1)
        new_ids = torch.arange(P + extra - 1, P - 1, -1, dtype=torch.int32, device=self.free.device)  # highest first
        stacks = []
        for layer in range(L):  # the new pages go under the old free ones, so the lowest stay on top
            n = int(self.n_free[layer])
            stacks.append(torch.cat([new_ids, self.free[layer, :n], new_ids.new_zeros(P - n)]))
        self.free, self.n_free, self.trash = torch.stack(stacks), self.n_free + extra, P + extra

    def pages_in_use(self) -> int:
        return int((self.owner >= 0).sum())

    def kept_per_layer(self) -> list:
        """Pairs in the long-term store, per layer."""
        return self.length.sum(1).tolist()

    def held_positions(self, layer, row, head) -> set:
        """Positions of every pair held for one stream (ring and store), for tests."""
        s = row * self.Hkv + head
        pages = self.table[layer, s, :-(-int(self.length[layer, s]) // self.page_size)].long()
        pos = self.pos[layer, pages].flatten()[:int(self.length[layer, s])]
        ring = self.ring_pos[layer, row]
        return set(pos.tolist()) | set(ring[ring >= 0].tolist())

    def nbytes(self) -> dict:
        """As SPKVCache.nbytes: ring, kept store pairs, in use (ring + pages held), allocated."""
        per_pair = 2 * self.D * self.k.element_size() + 8
        ring = self.ring_k.numel() // self.D * per_pair
        pages = self.pages_in_use() * self.page_size * per_pair
        return {"ring": ring, "store_kept": int(self.length.sum()) * per_pair, "in_use": ring + pages,
                "allocated": ring + self.owner.numel() * self.page_size * per_pair}
