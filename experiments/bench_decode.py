"""Decode speed: the dense KV cache and the SP-KV cache side by side, in one process.

    python experiments/bench_decode.py                                   # SmolLM2-135M shape, batch 16, 2k and 8k
    python experiments/bench_decode.py --contexts=2048 --ckpt=out/spkv/ckpt.pt   # adds a row with real gates
    python experiments/bench_decode.py --contexts=2048 --densities=0.1 --profile=1  # where a step's time goes
    python experiments/bench_decode.py --page_size=64                    # bigger pages: fewer, larger page matmuls
    python experiments/bench_decode.py --contexts=2048,8192,32768 --dtype=bfloat16 --impl=paged_compiled,paged_flex  # on a GPU

For each context length the dense cache is filled to that length and, for each forced density d,
an SP-KV cache holds a full window plus d of the older pairs per (layer, row, head) at random
positions (decode speed does not depend on the values). With --ckpt, one real text is prefilled
with the checkpoint's own gates and its cache copied to every row (density marked "r"). Each case
decodes --steps tokens for the whole batch after one warm-up step, --repeats times, each time
the dense cache and then the SP-KV cache back to back (so drift of a noisy machine hits both);
the speedup printed is the median of the per-repeat ratios, the tok/s the medians. --impl picks
the SP-KV decode paths of decode_paths.py (a comma list runs each on a fresh cache): "paged"
(kernels.paged_decode_attention reads the page pool in place), "paged_compiled" (the same step
under torch.compile), "static" / "static_compiled" (cache.StaticSPKVCache: no host sync, eager or
compiled whole, a CUDA graph on CUDA), "paged_flex" (FlexAttention over the page table; fused on
CUDA only), or the gather path "split". The dense cache runs "sdpa" eager through
generate.decode_one_token, except beside a static path, where its step gets the same treatment
(generate.static_step, compiled whole for "static_compiled"): the ratio then compares
compression with its absence and nothing else. Printed per case: decode tokens/s of
both and their ratio, KV bytes of both (SP-KV: the pages held), the ideal ratio from bytes moved
per token, (weights + dense KV) / (weights + kept KV) with kept KV the pairs held (k, v,
position), and the fraction of it reached; and "ideal(t)", the same ideal with time in place of
bytes (time_ideal: a step without KV traffic, timed once per run, plus the dense step's KV time
scaled by the kept fraction), the fair target where the weights do not stream at memory speed.
Runs on CUDA when there is one (--device=auto), else on CPU; weights and both caches in --dtype.
"""

import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python experiments/<name>.py

import torch

import cli
import decode_paths as DP
import generate as G
from cache import DenseKVCache, StaticSPKVCache
from checkpoint import load_model
from model import GPT, GPTConfig


def fill_dense(model, B, ctx, room):
    """ctx random pairs per (layer, row, head), and room for `room` more."""
    c, p = model.cfg, next(model.parameters())
    cache = DenseKVCache(c.n_layer, B, c.n_kv_head, c.head_dim, ctx + room, p.dtype, p.device)
    cache.k[:, :, :, :ctx].normal_()
    cache.v[:, :, :, :ctx].normal_()
    return cache


def fill_spkv(model, B, ctx, density, gen, page_size, path):
    """Window full, and round(density * (ctx - w)) random older positions kept per stream; the
    cache's decode steps take `path` (decode_paths.PATHS)."""
    c, p = model.cfg, next(model.parameters())
    dtype, dev = p.dtype, p.device
    cache = DP.new_cache(path, model, B, page_size)
    w, S = c.window, B * c.n_kv_head
    n_keep = round(density * max(0, ctx - w))
    pos = torch.arange(ctx - w, ctx, device=dev)
    cache.ring_pos[:, :, pos % w] = pos
    cache.ring_keep[:] = True
    cache.ring_k.normal_()
    cache.ring_v.normal_()
    for store in cache.stores:
        kept = torch.stack([torch.randperm(ctx - w, generator=gen)[:n_keep].sort().values for _ in range(S)]).to(dev)
        streams = torch.arange(S, device=dev).repeat_interleave(n_keep)
        store.append(streams, torch.randn(S * n_keep, c.head_dim, dtype=dtype, device=dev),
                     torch.randn(S * n_keep, c.head_dim, dtype=dtype, device=dev), kept.flatten())
    return cache


def fill_real(model, B, ids, page_size, path):
    """Prefill one real text with the model's own gates, then copy its cache to all B rows."""
    one = G.new_cache(model, 1, len(ids) + 64, dense=False)
    G.prefill(model, one, [ids], chunk=512)
    c, p = model.cfg, next(model.parameters())
    cache = DP.new_cache(path, model, B, page_size)
    for name in ("ring_k", "ring_v", "ring_keep", "ring_pos"):
        getattr(cache, name).copy_(getattr(one, name).expand_as(getattr(cache, name)))
    for src, dst in zip(one.stores, cache.stores):
        for h in range(c.n_kv_head):
            k, v, pos = src.gather(torch.tensor([h], device=p.device))
            n = int(src.length[h])
            streams = torch.arange(h, B * c.n_kv_head, c.n_kv_head, device=p.device).repeat_interleave(n)
            dst.append(streams, k[0, :n].repeat(B, 1), v[0, :n].repeat(B, 1), pos[0, :n].repeat(B))
    return cache


def sync(device):
    """Wait for queued GPU work, so a timer reads the work done (CPU work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_for(impl: str, cuda: bool, dense: bool = False):
    """step(model, cache, tokens, pos): one decode step of every row on `impl`'s path; the dense
    cache beside a static path takes the same static step."""
    if impl == "static_graph":
        return G.GraphedStep({})  # one recording per cache (each side, each case)
    if DP.is_static(impl):
        run = G.compiled_static_step(cuda) if DP.is_compiled(impl, cuda) else G.static_step
        return lambda model, cache, tok, pos: run(model, cache, tok, pos, {})
    compiled = DP.is_compiled(impl, cuda) and not dense
    return lambda model, cache, tok, pos: G.decode_one_token(model, cache, tok, pos, compiled)


@torch.no_grad()
def time_decode(model, cache, B, ctx, steps, step=None, profile=False) -> float:
    """Decode tokens per second over `steps` steps for the whole batch, after one warm-up step, the
    first new token at position ctx. With profile, one more step runs under torch.profiler and its
    busiest ops are printed. step: step_for(...); default the eager paged step."""
    step = step or step_for("paged", False)
    dev = next(model.parameters()).device
    tok = torch.zeros(B, dtype=torch.long, device=dev)
    step(model, cache, tok, torch.full((B,), ctx, device=dev))
    sync(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        step(model, cache, tok, torch.full((B,), ctx + 1 + i, device=dev))
    sync(dev)
    tps = B * steps / (time.perf_counter() - t0)
    if profile:
        with torch.profiler.profile() as prof:
            step(model, cache, tok, torch.full((B,), ctx + 1 + steps, device=dev))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return tps


def time_without_kv(model, B, steps, repeats, span) -> float:
    """Decode tok/s with a dense cache of one pair per stream: the weights and the fixed per-step
    work, almost no KV traffic (median of `repeats` timings)."""
    cache = fill_dense(model, B, 1, repeats * span)
    return statistics.median(time_decode(model, cache, B, 1 + r * span, steps) for r in range(repeats))


def time_ideal(t_dense, t_base, kv_fraction) -> float:
    """The speedup if SP-KV's step were the KV-free step plus the dense step's KV time scaled by
    the fraction of KV bytes it holds: the bytes ideal with each byte priced at what this machine
    measured, so weights that run compute-bound (CPU) are not priced as if they streamed."""
    return t_dense / (t_base + (t_dense - t_base) * kv_fraction)


@dataclass
class Flags:
    contexts: str = "2048,8192"  # comma list of context lengths to fill the caches to
    batch: int = 16  # rows decoded together
    densities: str = "0.1,0.25,0.5"  # comma list of forced SP-KV densities
    steps: int = 8  # timed decode steps per case
    ckpt: str = ""  # a checkpoint whose real gates add a row; "" = the SmolLM2-135M shape, random weights
    threads: int = 0  # torch CPU threads; 0 = torch's default
    impl: str = "paged"  # comma list of SP-KV decode paths (decode_paths.PATHS)
    profile: int = 0  # 1: profile one timing and print where its time goes
    page_size: int = 16  # KV pairs per page
    device: str = "auto"  # auto, cpu or cuda
    dtype: str = "float32"  # float32 or bfloat16
    repeats: int = 3  # timings per case; the median is reported


def main(argv):
    o = {**dataclasses.asdict(Flags()), **cli.parse(argv, Flags, "bench_decode.py")}
    contexts, densities = cli.number_list("contexts", o["contexts"], int), cli.number_list("densities", o["densities"], float)
    if not all(0 <= d <= 1 for d in densities):
        raise cli.BadInput(f"--densities={o['densities']}: every density must be in [0, 1] (the kept fraction of "
                           "the pairs older than the window)")
    if not all(c >= 1 for c in contexts):
        raise cli.BadInput(f"--contexts={o['contexts']}: every context must be >= 1 (tokens in the cache)")
    B, steps, page, repeats = o["batch"], o["steps"], o["page_size"], o["repeats"]
    if min(B, steps, page, repeats) < 1:
        raise cli.BadInput(f"--batch, --steps, --page_size and --repeats must be >= 1; got {B}, {steps}, {page}, "
                           f"{repeats}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if o["device"] == "auto" else o["device"]
    if o["dtype"] not in ("float32", "bfloat16") or device not in ("cpu", "cuda"):
        raise cli.BadInput(f"--device takes auto, cpu or cuda and --dtype float32 or bfloat16; got "
                           f"{o['device']!r}, {o['dtype']!r}")
    impls = o["impl"].split(",")
    bad = [i for i in impls if i not in DP.PATHS]
    if bad:
        raise cli.BadInput(f"unknown --impl {bad}; use a comma list of {DP.PATHS}")
    if "static_graph" in impls and device != "cuda":
        raise cli.BadInput("--impl=static_graph records CUDA graphs: run it on a CUDA device (static_compiled runs here)")
    if o["threads"]:
        torch.set_num_threads(o["threads"])
    if o["ckpt"]:
        model, tok, _ = load_model(o["ckpt"])
    else:  # the SmolLM2-135M shape with random weights: speed does not depend on the values
        model, tok = GPT(GPTConfig()), None
    if min(contexts) <= model.cfg.window:
        raise cli.BadInput(f"--contexts={o['contexts']}: every context must be above the model's window of "
                           f"{model.cfg.window}: SP-KV prunes only the pairs older than the window")
    model = model.to(device, getattr(torch, o["dtype"])).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {where}; {o['dtype']}; model {weights / 1e6:.0f} MB of weights; batch {B}; "
          f"window {model.cfg.window}; {steps} timed decode steps, {repeats} times per case, each time dense "
          f"then SP-KV, median ratio; dense cache: 'sdpa' (eager, or beside a static path its static step); SP-KV: "
          + "; ".join(f"{i!r} = {DP.describe(i, device == 'cuda')}" for i in impls) + f"; {page} pairs per page")
    profile = bool(o["profile"])
    span = steps + 1 + profile  # positions one timing decodes
    base_tps = time_without_kv(model, B, steps, repeats, span)
    print(f"a step without KV traffic (dense cache of 1 pair): {base_tps:.1f} tok/s")
    print(f"{'context':>8} {'density':>8} {'path':>15} {'dense tok/s':>12} {'spkv tok/s':>11} {'speedup':>8} "
          f"{'ideal':>6} {'of ideal':>9} {'ideal(t)':>9} {'of it':>6} {'dense KV MB':>12} {'spkv KV MB':>11} {'compress':>9}")
    for ctx in contexts:
        dense = fill_dense(model, B, ctx, repeats * span)
        dense_bytes = dense.nbytes()["in_use"] * ctx // dense.k.shape[3]  # the ctx pairs it holds
        cases = [(f"{d:.2f}", lambda path, d=d: fill_spkv(model, B, ctx, d, gen, page, path))
                 for d in densities]
        if tok is not None:
            ids = (tok.encode(open(G.__file__).read()) * 64)[:ctx]
            cases.append(("real", lambda path: fill_real(model, B, ids, page, path)))
        old = model.cfg.n_layer * B * model.cfg.n_kv_head * max(1, ctx - model.cfg.window)  # pairs past the window
        for name, make in cases:
            for impl in impls:  # a fresh cache per path: each timing starts from the same state
                cache = make(impl)
                if DP.is_static(impl):  # a fixed-shape copy with room for every timed step
                    cache = StaticSPKVCache.from_cache(cache, ctx + repeats * span, room_steps=repeats * span)
                cuda = device == "cuda"
                spkv_step, dense_step = step_for(impl, cuda), step_for(impl, cuda, dense=True)
                nb = cache.nbytes()
                kv, kept = nb["in_use"], nb["ring"] + nb["store_kept"]  # pages held; pairs held
                label = f"{sum(cache.kept_per_layer()) / old:.3f}" + ("r" if name == "real" else "")
                runs = []  # (dense tok/s, SP-KV tok/s), timed back to back: machine drift hits both
                for r in range(repeats):
                    at = ctx + r * span  # each repeat decodes the next positions
                    runs.append((time_decode(model, dense, B, at, steps, dense_step),
                                 time_decode(model, cache, B, at, steps, spkv_step, profile=profile and r == 0)))
                dense_tps, spkv_tps = (statistics.median(x) for x in zip(*runs))
                speedup = statistics.median(s / d for d, s in runs)
                ideal = (weights + dense_bytes) / (weights + kept)  # a partly filled page moves no more bytes
                ideal_t = time_ideal(B / dense_tps, B / base_tps, kept / dense_bytes)
                print(f"{ctx:>8} {label:>8} {impl:>15} {dense_tps:>12.1f} {spkv_tps:>11.1f} {speedup:>7.2f}x "
                      f"{ideal:>5.2f}x {speedup / ideal:>8.0%} {ideal_t:>8.2f}x {speedup / ideal_t:>5.0%} "
                      f"{dense_bytes / 1e6:>12.1f} {kv / 1e6:>11.1f} "
                      f"{dense_bytes / kv:>8.2f}x", flush=True)
                del cache
        del dense


if __name__ == "__main__":
    cli.run(main, "bench_decode.py")
