"""Decode with SP-KV's compacting KV cache (or a plain dense one) and report what the cache did.

    python generate.py --prompt="def fibonacci(n):" --max_new_tokens=64 --tau=0.5
    python generate.py --prompt="..." --dense=True          # plain KV cache, same model
    python generate.py --prompt="..." --impl=paged_compiled # the decode step under torch.compile
Defaults to the embedded SmolLM2-135M, so it runs offline. The steps, as in gpt-fast: prefill
(chunks that evict as they go, so a long prompt never needs a dense cache), decode_one_token,
decode_n_tokens. Decode paths (--impl): "paged" (default) reads the page pool in place
(kernels.paged_decode_attention, one step for all layers, decode_step_paged), "paged_compiled"
the same step compiled once, "paged_flex" the step with FlexAttention over the page table
(compiled on CUDA; eager elsewhere, a checking path), "split" / "sdpa" / "reference" gather the
store first. The oracle every path is tested against is generate_uncached: one full forward under
hard gates per token.
"""

import dataclasses
import functools
import math
import time
from dataclasses import dataclass

import torch

import cli
import kernels
import spkv
from cache import DenseKVCache, SPKVCache

PAGED = ("paged", "paged_compiled", "paged_flex")  # decode paths that read the page pool in place
PREFILL_PATH = {impl: "split" for impl in PAGED}  # their prefill chunks go through "split"


def is_compiled(impl: str, cuda: bool) -> bool:
    """Whether the decode step runs under torch.compile: "paged_compiled" always, "paged_flex" on
    CUDA only (torch 2.13 compiles flex_attention with its log-sum-exp there only)."""
    return impl == "paged_compiled" or (impl == "paged_flex" and cuda)


# ---------------------------------------------------------------------------------------------
# One forward pass over new tokens, reading and writing a cache.


def attend_spkv(cache: SPKVCache, layer, q, k, v, keep, pos, rows, impl):
    """Attend new queries (R, H, T, D) to the cache plus themselves, then store the new pairs."""
    R, Hkv = k.shape[:2]
    pieces = cache.keys(layer, rows) + [(k, v, pos[:, None].expand(R, Hkv, -1), keep)]
    if impl == "split":  # no concatenation: one softmax across the pieces
        y = kernels.split_cached_attention(q, [(pk, pv, kernels.cache_bias(pos, pp, pkeep, cache.w))
                                               for pk, pv, pp, pkeep in pieces])
    else:
        k_all, v_all, pos_all, keep_all = (torch.cat(t, 2) for t in zip(*pieces))  # one copy each
        y = kernels.cached_attention(q, k_all, v_all, kernels.cache_bias(pos, pos_all, keep_all, cache.w), impl)
    if q.shape[2] == 1:  # decode: one pair per row, vectorized over rows
        cache.write(layer, rows, k[:, :, 0], v[:, :, 0], keep[:, :, 0], pos[:, 0])
    else:  # prefill chunk of one row
        cache.write_chunk(layer, int(rows[0]), k[0], v[0], keep[0], pos[0])
    return y


def attend_dense(cache: DenseKVCache, layer, q, k, v, pos, rows, impl):
    """Plain KV cache: write the new pairs at their positions, attend causally to all of them."""
    if q.shape[2] == 1:  # decode: one pair per row
        cache.k[layer, rows, :, pos[:, 0]], cache.v[layer, rows, :, pos[:, 0]] = k[:, :, 0], v[:, :, 0]
    else:  # prefill chunk of one row, consecutive positions
        p0, p1 = int(pos[0, 0]), int(pos[0, -1]) + 1
        cache.k[layer, int(rows[0]), :, p0:p1], cache.v[layer, int(rows[0]), :, p0:p1] = k[0], v[0]
    n = int(pos.max()) + 1
    k_pos = torch.arange(n, device=q.device).expand(len(rows), k.shape[1], n)  # (R, Hkv, n)
    bias = kernels.cache_bias(pos, k_pos, torch.ones_like(k_pos, dtype=torch.bool), window=n + 1)
    span = slice(int(rows[0]), int(rows[-1]) + 1)  # rows are one row (prefill) or all rows: a view, no copy
    return kernels.cached_attention(q, cache.k[layer, span, :, :n], cache.v[layer, span, :, :n], bias, impl)


def keep_flags(model, logit, k):
    """Which new pairs are kept: spkv.hard_keep of the gate logits (R, Hkv, T); a dense layer
    (no gates) keeps all."""
    if logit is None:
        return torch.ones(k.shape[:3], dtype=torch.bool, device=k.device)
    return spkv.hard_keep(logit, model.cfg.tau)


def forward_cached(model, cache, idx, pos, rows, impl="sdpa", last_only=False):
    """idx, pos (R, T) new tokens of rows (R,) -> logits (R, T, V), updating the cache; with
    last_only, logits (R, 1, V) of the last token (prefill needs no others).
    Mirrors GPT.forward under hard gates (GPT.forward_with); keep_flags decides what is stored."""

    def attend(layer, q, k, v, logit):
        if isinstance(cache, DenseKVCache):
            return attend_dense(cache, layer, q, k, v, pos, rows, impl)
        return attend_spkv(cache, layer, q, k, v, keep_flags(model, logit, k), pos, rows, impl)

    return model.forward_with(idx, pos, attend, last_only)


# ---------------------------------------------------------------------------------------------
# Prefill, decode, sampling


def new_cache(model, B, max_len, dense, page_size=16):
    c, p = model.cfg, next(model.parameters())
    if dense:
        return DenseKVCache(c.n_layer, B, c.n_kv_head, c.head_dim, max_len, p.dtype, p.device)
    return SPKVCache(c.n_layer, B, c.n_kv_head, c.head_dim, c.window, p.dtype, p.device, page_size)


@torch.no_grad()
def prefill(model, cache, prompts, chunk, impl="sdpa"):
    """Each row's prompt in chunks of `chunk` tokens; returns every row's last logits (B, V)."""
    last = []
    device = next(model.parameters()).device
    for r, ids in enumerate(prompts):
        for s in range(0, len(ids), chunk):
            piece = torch.tensor(ids[s:s + chunk], device=device)[None]  # (1, C)
            pos = torch.arange(s, s + piece.shape[1], device=device)[None]  # (1, C)
            logits = forward_cached(model, cache, piece, pos, torch.tensor([r], device=device),
                                    PREFILL_PATH.get(impl, impl), last_only=True)
        last.append(logits[0, -1])
    return torch.stack(last)


@torch.no_grad()
def decode_one_token(model, cache, tokens, pos, impl="sdpa"):
    """tokens, pos (B,) -> next-token logits (B, V). Under the PAGED paths an SP-KV cache is read
    in place (one step for all layers, then the writes): "paged" and "paged_compiled" by
    kernels.paged_decode_attention, eager or compiled; "paged_flex" by
    kernels.paged_flex_decode_attention, compiled on CUDA and eager elsewhere (describe_path
    says so). Every other path gathers the store (forward_cached)."""
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    if impl in PAGED and isinstance(cache, SPKVCache):
        pools = [s.pool() for s in cache.stores]
        rings = [(cache.ring_k[i], cache.ring_v[i], cache.ring_pos[i], cache.ring_keep[i]) for i in range(len(pools))]
        tables = [s.page_table() for s in cache.stores] if impl == "paged_flex" else None
        step = decode_step_paged
        if is_compiled(impl, tokens.is_cuda):
            step = compiled_decode_step()
            for t in [t for pool in pools for t in pool]:
                torch._dynamo.mark_dynamic(t, 0)  # the pool grows (so do tables): never a recompile
            for table, _ in tables or []:
                torch._dynamo.mark_dynamic(table, 1)
        logits, new = step(model, tokens, pos, pools, rings, cache.w, tables)
        for layer, (k, v, keep) in enumerate(new):
            cache.write(layer, rows, k, v, keep, pos)
        return logits
    return forward_cached(model, cache, tokens[:, None], pos[:, None], rows, PREFILL_PATH.get(impl, impl))[:, 0]


def decode_step_paged(model, tokens, pos, pools, rings, window, tables=None):
    """One decode step of every row over SP-KV caches handed in as tensors; mutates nothing.
    tokens, pos (B,); pools[layer] = (k, v, pos, owner) of its PagedStore; rings[layer] = (k, v,
    pos, keep) of its ring; tables[layer] = PagedStore.page_table() to attend with FlexAttention
    (None: kernels.paged_decode_attention). Returns logits (B, V) and per layer the new pair k, v
    (B, Hkv, D) and keep (B, Hkv) for SPKVCache.write. Shapes are fixed but for the pool and
    table sizes, so it compiles once."""
    new = []

    def attend(layer, q, k, v, logit):  # q (B, H, 1, D), k, v (B, Hkv, 1, D)
        new.append((k[:, :, 0], v[:, :, 0], keep_flags(model, logit, k)[:, :, 0]))
        if tables is None:
            return kernels.paged_decode_attention(q, k, v, pos, pools[layer], rings[layer], window)
        return kernels.paged_flex_decode_attention(q, k, v, pos, pools[layer], tables[layer], rings[layer], window)

    return model.forward_with(tokens[:, None], pos[:, None], attend)[:, 0], new


@functools.lru_cache(maxsize=1)
def compiled_decode_step():
    """torch.compile(decode_step_paged), built on first use (gpt-fast compiles decode_one_token)."""
    return torch.compile(decode_step_paged)


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, gen=None):
    """Greedy when temperature == 0, else softmax sampling with optional top-k / nucleus top-p."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


def decode_n_tokens(model, cache, first_logits, lengths, n, sampling, impl="sdpa", eos_id=None):
    """Sample up to n tokens per row after the prompts, stopping early once every row has sampled
    eos_id; returns (new tokens (B, n'), logits (B, n', V)) with n' <= n."""
    tokens, all_logits, logits = [], [], first_logits
    pos = torch.tensor(lengths, device=first_logits.device)
    ended = torch.zeros(len(lengths), dtype=torch.bool, device=first_logits.device)  # (B,)
    for i in range(n):
        tok = sample(logits, **sampling)
        tokens.append(tok)
        all_logits.append(logits)
        if eos_id is not None:
            ended |= tok == eos_id
            if bool(ended.all()):  # no row needs another forward pass
                break
        if i < n - 1:  # the last sample needs no forward pass
            logits = decode_one_token(model, cache, tok, pos, impl)
            pos = pos + 1
    if not tokens:
        return first_logits.new_zeros(len(lengths), 0, dtype=torch.long), first_logits[:, None, :0]
    return torch.stack(tokens, 1), torch.stack(all_logits, 1)


def generate(model, prompts, max_new_tokens, dense=False, chunk=256, sampling=None, impl="sdpa", page_size=16,
             eos_id=None):
    """Cached generation for a batch of prompts (lists of ids, any lengths), stopping early once
    every row has produced eos_id (None: never). Returns (new tokens (B, n), their logits
    (B, n, V), the cache); the cache holds each prompt and the first n - 1 new tokens."""
    check_request(model, prompts, max_new_tokens, impl)
    cache = new_cache(model, len(prompts), max(map(len, prompts)) + max_new_tokens, dense, page_size)
    first = prefill(model, cache, prompts, chunk, impl)
    tokens, logits = decode_n_tokens(model, cache, first, [len(p) for p in prompts], max_new_tokens,
                                     sampling or {}, impl, eos_id)
    return tokens, logits, cache


@torch.no_grad()
def generate_uncached(model, prompts, max_new_tokens, view="hard"):
    """The oracle: greedy decoding by one full forward per new token (no cache at all)."""
    out_tokens, out_logits = [], []
    for ids in prompts:
        seq, row_logits = list(ids), []
        for _ in range(max_new_tokens):
            logits = model(torch.tensor(seq)[None], view=view)[0][0, -1]
            row_logits.append(logits)
            seq.append(int(logits.argmax()))
        out_tokens.append(seq[len(ids):])
        out_logits.append(torch.stack(row_logits) if row_logits else torch.zeros(0))
    return out_tokens, out_logits


IMPLS = ("reference", "sdpa", "split", *PAGED)  # cached attention paths, see kernels.py


def check_request(model, prompts, max_new_tokens, impl="sdpa"):
    if impl not in IMPLS:
        raise cli.BadInput(f"unknown cached attention path {impl!r}; use one of {IMPLS}")
    if max_new_tokens < 0:
        raise cli.BadInput(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise cli.BadInput("empty prompt: give at least one token of text")
    longest = max(map(len, prompts)) + max_new_tokens
    if longest > model.cfg.block_size:
        raise cli.BadInput(f"prompt + max_new_tokens = {longest} tokens is longer than the model's context "
                         f"of {model.cfg.block_size}; shorten the prompt or lower max_new_tokens")


# ---------------------------------------------------------------------------------------------
# What the cache did


def cache_report(cache, lengths, dense_bytes_per_pair, n_layer, Hkv) -> dict:
    """Kept pairs and density per layer, KV bytes in use vs a dense cache of the same length.
    lengths: tokens each row's cache holds (its prompt and all new tokens but the last)."""
    if isinstance(cache, DenseKVCache):
        total = sum(lengths) * n_layer * Hkv
        return {"pairs": total, "dense_pairs": total, "bytes": total * dense_bytes_per_pair,
                "dense_bytes": total * dense_bytes_per_pair, "density_per_layer": {}}
    old = sum(max(0, n - cache.w) for n in lengths) * Hkv  # per layer: pairs that left the window
    kept = [int(s.length.sum()) for s in cache.stores]
    ring = sum(min(n, cache.w) for n in lengths) * Hkv
    nb = cache.nbytes()
    return {"pairs": ring * n_layer + sum(kept), "dense_pairs": sum(lengths) * n_layer * Hkv,
            "bytes": nb["in_use"], "allocated": nb["allocated"],
            "dense_bytes": sum(lengths) * n_layer * Hkv * dense_bytes_per_pair,
            "density_per_layer": {i: (k / old if old else float("nan")) for i, k in enumerate(kept)},
            "density": sum(kept) / (old * n_layer) if old else float("nan")}


# ---------------------------------------------------------------------------------------------
# Command line


@dataclass
class Flags:
    ckpt: str = ""  # checkpoint to decode with; "" = the embedded SmolLM2-135M
    prompt: str = "Write a Python function that checks whether a number is prime."  # the text to continue
    max_new_tokens: int = 64  # tokens to generate at most (decoding stops at end-of-text)
    tau: float = -1.0  # hard-gate threshold in [0, 1]; -1 = the checkpoint's own
    dense: bool = False  # plain KV cache instead of SP-KV, same model
    temperature: float = 0.0  # 0 = greedy; > 0 samples from softmax(logits / temperature)
    top_k: int = 0  # sample among the k most likely tokens; 0 = all
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens holding this probability, in (0, 1]
    chunk: int = 256  # prefill chunk length in tokens
    chat: bool = True  # wrap the prompt in the checkpoint's chat template, if it has one
    seed: int = 0  # sampling seed
    page_size: int = 16  # KV pairs per page of the SP-KV store
    target_density: float = 0.0  # in (0, 1]: calibrate tau to keep this fraction of old pairs; 0 = off
    impl: str = "paged"  # cached attention path, one of IMPLS
    device: str = "auto"  # auto (CUDA when present), cpu or cuda


DEFAULTS = dataclasses.asdict(Flags())


def describe_path(impl: str, dense: bool, cuda: bool = False) -> str:
    """Which cached attention path runs, in words (printed, so no path is chosen silently)."""
    if dense:
        return f"dense cache, kernels.cached_attention ({'reference' if impl == 'reference' else 'sdpa'})"
    how = "torch.compile" if is_compiled(impl, cuda) else "eager"
    if impl == "paged_flex":
        if not cuda:
            how += (", because torch 2.13 compiles flex_attention with its log-sum-exp on CUDA only: unfused, "
                    "every stream scored against the whole pool, for checking, not speed")
        return (f"decode steps: FlexAttention over the page pool with the page table as block mask ({how}); "
                f"prefill chunks gather ('split')")
    if impl in PAGED:
        return f"decode steps read the page pool in place (kernels.paged_decode_attention, {how}); prefill chunks gather ('split')"
    return f"store gathered per step, then {impl!r} (kernels.py)"


def parse_flags(argv) -> dict:
    o = {**DEFAULTS, **cli.parse(argv, Flags, "generate.py")}
    problems = [f"--{k}={o[k]} must be >= {low}" for k, low in (("chunk", 1), ("page_size", 1), ("max_new_tokens", 0),
                                                                  ("top_k", 0)) if o[k] < low]
    if not (math.isfinite(o["temperature"]) and o["temperature"] >= 0):
        problems.append(f"--temperature={o['temperature']} must be a finite number >= 0 (0 = greedy)")
    if not 0 < o["top_p"] <= 1:
        problems.append(f"--top_p={o['top_p']} must be in (0, 1]")
    if o["tau"] != -1.0 and not 0 <= o["tau"] <= 1:
        problems.append(f"--tau={o['tau']} is outside [0, 1] (-1 = the checkpoint's own)")
    if o["target_density"] != 0 and not 0 < o["target_density"] <= 1:
        problems.append(f"--target_density={o['target_density']} must be in (0, 1], or 0 for off")
    if o["impl"] not in IMPLS:
        problems.append(f"--impl={o['impl']!r} is not one of {IMPLS}")
    if problems:
        raise cli.BadInput("; ".join(problems))
    return o


def chat_prompt(tok, text: str) -> list:
    """ChatML (<|im_start|>role ... <|im_end|>) when the checkpoint's template uses it; else plain."""
    template = tok.spec.get("chat_template") or ""
    if "<|im_start|>" not in template:
        return tok.encode(text)
    start, end = tok.special_id("<|im_start|>"), tok.special_id("<|im_end|>")
    return [start, *tok.encode("user\n" + text), end, *tok.encode("\n"), start, *tok.encode("assistant\n")]


def main(argv):
    from checkpoint import load_model
    from convert import default_checkpoint

    o = parse_flags(argv)
    overrides = {} if o["tau"] == -1.0 else {"tau": o["tau"]}  # -1: the checkpoint's own tau
    device = o["device"] if o["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise cli.BadInput(f"--device={o['device']}: use auto, cpu, or cuda on a machine with a CUDA GPU")
    model, tok, _ = load_model(o["ckpt"] or default_checkpoint(), device, dense=o["dense"], **overrides)
    if tok is None:
        raise cli.BadInput(f"{o['ckpt'] or 'the checkpoint'} has no tokenizer; convert it from a folder with tokenizer.json")
    model.eval()
    if o["target_density"] > 0:  # pick tau on calibration text (stdlib source, train split)
        import data as datalib
        import tau as taulib

        folder = datalib.prepare("", tok)
        model.cfg.tau = taulib.calibrate(model, datalib.Batches(folder, "train", 512), o["target_density"])
        print(f"tau calibrated to {model.cfg.tau:.4f} for target density {o['target_density']}")
    torch.manual_seed(o["seed"])
    ids = chat_prompt(tok, o["prompt"]) if o["chat"] else tok.encode(o["prompt"])
    dropped = tok.dropped(o["prompt"])
    if dropped:
        print(f"prompt: dropped {dropped} character(s) with bytes this vocabulary lacks; {len(ids)} tokens remain")
    if o["prompt"] and not ids:
        raise cli.BadInput("--prompt has only characters this vocabulary cannot encode; give text it can")
    print(f"cache: {'dense KV cache' if o['dense'] else f'SP-KV ring of {model.cfg.window} + paged store, tau={model.cfg.tau}'}"
          f"; attention: {describe_path(o['impl'], o['dense'], device == 'cuda')}; device: {device}"
          + ("" if device == "cuda" else " (no CUDA device)"))
    t0 = time.time()
    sampling = dict(temperature=o["temperature"], top_k=o["top_k"], top_p=o["top_p"])
    tokens, _, cache = generate(model, [ids], o["max_new_tokens"], o["dense"], o["chunk"], sampling,
                                impl=o["impl"], page_size=o["page_size"], eos_id=tok.eos_id)
    dt = time.time() - t0
    out = tokens[0].tolist()
    n_new = len(out)
    if tok.eos_id in out:
        out = out[:out.index(tok.eos_id)]
    print(tok.decode(out))
    c = model.cfg
    held = len(ids) + max(0, n_new - 1)  # the last new token is sampled, never run through the model
    rep = cache_report(cache, [held], 2 * c.head_dim * 4, c.n_layer, c.n_kv_head)
    print(f"\n--- {len(ids)} prompt + {n_new} new tokens"
          + (" (stopped at end-of-text)" if n_new < o["max_new_tokens"] else "") + f" in {dt:.2f}s "
          f"({(len(ids) + n_new) / dt:.1f} tokens/s, prefill included"
          + (", and the one-time compile" if is_compiled(o["impl"], device == "cuda") else "") + ")")
    if rep["density_per_layer"] and rep["density"] != rep["density"]:  # nan: nothing has left the window
        print(f"density: no pair is older than the window yet ({held} tokens <= window "
              f"{c.window}); the ring is allocated whole, so a dense cache is smaller at this length")
    elif rep["density_per_layer"]:
        print(f"density of pairs older than the window: {rep['density']:.3f}; per layer: "
              + " ".join(f"{d:.2f}" for d in rep["density_per_layer"].values()))
    print(f"KV pairs held {rep['pairs']:,} vs dense {rep['dense_pairs']:,}; KV bytes in use {rep['bytes']:,} vs "
          f"dense {rep['dense_bytes']:,}: compression {rep['dense_bytes'] / rep['bytes']:.2f}x")


if __name__ == "__main__":
    cli.run(main, "generate.py")
