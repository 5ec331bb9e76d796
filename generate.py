"""Decode with SP-KV's compacting KV cache (or a plain dense one) and report what the cache did.

    python generate.py --prompt="def fibonacci(n):" --max_new_tokens=64 --tau=0.5
    python generate.py --prompt="..." --dense=True          # plain KV cache, same model
    python generate.py --prompt="..." --compile=True        # the decode step under torch.compile
    python generate.py --prompt="..." --target_density=0.2  # tau calibrated to keep 20% of old pairs
    python generate.py --prompt_file=some.py                # a prompt longer than the window, from a file
Defaults to the embedded SmolLM2-135M, so it runs offline. The steps, as in gpt-fast: prefill
(chunks that evict as they go, so a long prompt never needs a dense cache), decode_one_token,
decode_n_tokens, sample. Attention is the cache's business (cache.py): the model hands each
layer's new pairs to cache.update_and_attend. Decode paths (--impl): "paged" (default) reads the
page pool in place, eager or compiled (--compile=True); "static" decodes from a copy of the
prefilled cache whose tensors never change shape (cache.StaticSPKVCache), so that the whole step,
its cache writes and the sampling included, runs without a host sync: with --compile=True it is
compiled with fullgraph=True (and replayed as a CUDA graph on a GPU), and the host looks at the
tokens only every --check_every steps; "reference" gathers the store and attends with plain tensor
ops, the twin the tests hold the others to. The oracle all are tested against is
generate_uncached: one full forward under hard gates per token.
"""

import dataclasses
import functools
import math
import time
from dataclasses import dataclass

import torch

import cli
import data as datalib
from cache import DenseKVCache, SPKVCache, StaticSPKVCache
from checkpoint import load_model
from spkv import calibrate
from weights import default_checkpoint

IMPLS = ("paged", "static", "reference")  # SP-KV decode paths, see cache.SPKVCache and StaticSPKVCache


# ---------------------------------------------------------------------------------------------
# Prefill, decode, sampling


def new_cache(model, B, max_len, dense, page_size=16, impl="paged"):
    """An empty cache for B rows of up to max_len tokens: dense, or SP-KV at the model's tau."""
    c, p = model.cfg, next(model.parameters())
    if dense:
        return DenseKVCache(c.n_layer, B, c.n_kv_head, c.head_dim, max_len, p.dtype, p.device,
                            impl="reference" if impl == "reference" else "sdpa")
    return SPKVCache(c.n_layer, B, c.n_kv_head, c.head_dim, c.window, c.tau, p.dtype, p.device, page_size,
                     paged=impl == "paged")


@torch.no_grad()
def prefill(model, cache, prompts, chunk):
    """Each row's prompt in chunks of `chunk` tokens; returns every row's last logits (B, V)."""
    last = []
    device = next(model.parameters()).device
    for r, ids in enumerate(prompts):
        view = cache.for_rows(torch.tensor([r], device=device))
        for s in range(0, len(ids), chunk):
            piece = torch.tensor(ids[s:s + chunk], device=device)[None]  # (1, C)
            pos = torch.arange(s, s + piece.shape[1], device=device)[None]  # (1, C)
            logits, _ = model(piece, cache=view, pos=pos, last_only=True)  # (1, 1, V)
            view.commit()
        last.append(logits[0, -1])
    return torch.stack(last)  # (B, V)


def decode_step(model, cache, tokens, pos):
    """One token for every row: tokens, pos (B,) -> logits (B, V). Writes nothing: the cache
    stages the new pairs, and decode_one_token commits them after the step."""
    return model(tokens[:, None], cache=cache, pos=pos[:, None])[0][:, 0]


@functools.lru_cache(maxsize=1)
def compiled_decode_step():
    """torch.compile(decode_step), built on first use (gpt-fast compiles decode_one_token)."""
    return torch.compile(decode_step)


@torch.no_grad()
def decode_one_token(model, cache, tokens, pos, compiled=False):
    """tokens, pos (B,) -> next-token logits (B, V), then the cache writes the new pairs. Compiled,
    the step is one graph for every length: only the page pools' sizes are dynamic."""
    step = decode_step
    if compiled:
        step = compiled_decode_step()
        for t in [t for store in cache.stores for t in store.pool()]:
            torch._dynamo.mark_dynamic(t, 0)  # the pool grows: never a recompile
    logits = step(model, cache, tokens, pos)
    cache.commit()
    return logits


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, gen=None):
    """Greedy when temperature == 0, else softmax sampling with optional top-k / nucleus top-p."""
    if temperature == 0.0:
        return logits.argmax(-1)
    return torch.multinomial(filtered(logits, temperature, top_k, top_p).softmax(-1), 1, generator=gen)[:, 0]


def sample_on_device(logits, temperature=0.0, top_k=0, top_p=1.0):
    """sample() with no host sync and no generator: the same distribution, drawn by the Gumbel-max
    trick (the argmax of the filtered logits plus Gumbel noise) from the global RNG, so that it
    compiles into the decode step and is captured with it."""
    if temperature == 0.0:
        return logits.argmax(-1)
    gumbel = -torch.empty_like(logits, dtype=torch.float32).exponential_().log()  # (B, V)
    return (filtered(logits, temperature, top_k, top_p) + gumbel).argmax(-1)


def filtered(logits, temperature, top_k, top_p):
    """fp32 logits / temperature with everything outside top-k and the nucleus top-p at -inf."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def decode_n_tokens(model, cache, first_logits, lengths, n, sampling, compiled=False, eos_id=None):
    """Sample up to n tokens per row after the prompts, stopping early once every row has sampled
    eos_id; returns (new tokens (B, n'), logits (B, n', V)) with n' <= n."""
    tokens, all_logits, logits = [], [], first_logits
    pos = torch.tensor(lengths, device=first_logits.device)  # (B,)
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
            logits = decode_one_token(model, cache, tok, pos, compiled)
            pos = pos + 1
    if not tokens:
        return first_logits.new_zeros(len(lengths), 0, dtype=torch.long), first_logits[:, None, :0]
    return torch.stack(tokens, 1), torch.stack(all_logits, 1)


def static_step(model, cache, tokens, pos, sampling: dict):
    """One decode step with no host sync: tokens, pos (B,) -> (next tokens (B,), logits (B, V)).
    The cache (StaticSPKVCache, or the dense cache) writes inside the step."""
    logits = decode_step(model, cache, tokens, pos)
    return sample_on_device(logits, **sampling), logits


@functools.lru_cache(maxsize=2)
def compiled_static_step(cuda: bool):
    """static_step compiled whole (fullgraph=True, static shapes); on CUDA, replayed as a CUDA graph."""
    return torch.compile(static_step, fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else None)


class GraphedStep:
    """static_step recorded once as a CUDA graph and replayed (CUDA only; no compile needed).
    The step has no host sync, so the eager kernels can be captured as they are: the first call
    runs eagerly (it warms up the kernels and decodes a real token), the second records the graph
    and every call replays it, with the tokens and positions copied into the graph's inputs. A
    cache whose tensors were reallocated (a grown pool) is recorded again."""

    def __init__(self, sampling: dict):
        self.sampling, self.graph, self.key, self.warm = sampling, None, None, False

    def __call__(self, model, cache, tokens, pos):
        key = tuple(id(t) for t in vars(cache).values() if isinstance(t, torch.Tensor))
        if key != self.key:  # a new cache, or new tensors in it: warm up again, then record
            self.graph, self.key, self.warm = None, key, False
        if not self.warm:  # on a side stream, as CUDA graph capture asks of a warm-up
            self.warm, side = True, torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = static_step(model, cache, tokens, pos, self.sampling)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.tokens, self.pos, self.graph = tokens.clone(), pos.clone(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records only: nothing runs until replay
                self.out = static_step(model, cache, self.tokens, self.pos, self.sampling)
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        self.graph.replay()
        return tuple(t.clone() for t in self.out)  # the graph's outputs are overwritten by the next replay


@torch.no_grad()
def decode_static(model, cache, first_logits, lengths, n, sampling, compiled=False, eos_id=None, check_every=16):
    """decode_n_tokens over a cache whose decode steps never sync: the tokens stay on the device,
    and only every check_every steps does the host look (end-of-text in every row; room in the
    page pool, grown before it can run out). Returns what decode_n_tokens returns."""
    dev = first_logits.device
    step = compiled_static_step(dev.type == "cuda") if compiled else static_step
    if compiled and dev.type == "cuda":  # the graph reads and writes the cache in place: fixed addresses
        for t in vars(cache).values():
            torch._dynamo.mark_static_address(t) if isinstance(t, torch.Tensor) else None
    pos = torch.tensor(lengths, device=dev)  # (B,)
    tok = sample_on_device(first_logits, **sampling)
    tokens, all_logits = [tok], [first_logits]
    ended = tok == eos_id if eos_id is not None else None  # (B,)
    for i in range(1, n):
        if (i - 1) % check_every == 0:  # the host's look: one sync per check_every tokens
            if ended is not None and bool(ended.all()):
                break
            if isinstance(cache, StaticSPKVCache) and cache.ensure_room(check_every) and compiled:
                print(f"decode: the page pool grew to {cache.trash} pages a layer; the step compiles for the new size")
        tok, logits = step(model, cache, tok, pos, sampling)
        pos = pos + 1
        tokens.append(tok)
        all_logits.append(logits)
        if ended is not None:
            ended = ended | (tok == eos_id)
    tokens, all_logits = torch.stack(tokens, 1), torch.stack(all_logits, 1)  # (B, n'), (B, n', V)
    if eos_id is not None:  # the steps after every row had ended, as decode_n_tokens stops
        done = (torch.cumsum(tokens == eos_id, 1) > 0).all(0)  # (n',) every row has ended by then
        n_keep = int(done.float().argmax()) + 1 if bool(done.any()) else tokens.shape[1]
        tokens, all_logits = tokens[:, :n_keep], all_logits[:, :n_keep]
    return tokens, all_logits


def generate(model, prompts, max_new_tokens, dense=False, chunk=256, sampling=None, impl="paged", page_size=16,
             eos_id=None, compiled=False, check_every=16):
    """Cached generation for a batch of prompts (lists of ids, any lengths), stopping early once
    every row has produced eos_id (None: never). Returns (new tokens (B, n), their logits
    (B, n, V), the cache); the cache holds each prompt and the first n - 1 new tokens. impl
    "static" decodes through decode_static (a dense cache too, with dense=True)."""
    check_request(model, prompts, max_new_tokens, impl, dense, compiled)
    max_len = max(map(len, prompts)) + max_new_tokens
    cache = new_cache(model, len(prompts), max_len, dense, page_size, "paged" if impl == "static" else impl)
    first = prefill(model, cache, prompts, chunk)
    lengths = [len(p) for p in prompts]
    if impl != "static":
        tokens, logits = decode_n_tokens(model, cache, first, lengths, max_new_tokens, sampling or {}, compiled, eos_id)
        return tokens, logits, cache
    if max_new_tokens == 0:
        return first.new_zeros(len(prompts), 0, dtype=torch.long), first[:, None, :0], cache
    if not dense:
        cache = StaticSPKVCache.from_cache(cache, max_len, room_steps=check_every)
    tokens, logits = decode_static(model, cache, first, lengths, max_new_tokens, sampling or {}, compiled, eos_id,
                                   check_every)
    return tokens, logits, cache


@torch.no_grad()
def generate_uncached(model, prompts, max_new_tokens, a=1.0):
    """The oracle: greedy decoding by one full forward per new token (no cache at all), under
    gates of anneal weight a (1: hard, as decoding uses)."""
    out_tokens, out_logits = [], []
    for ids in prompts:
        seq, row_logits = list(ids), []
        for _ in range(max_new_tokens):
            logits = model(torch.tensor(seq)[None], a=a)[0][0, -1]
            row_logits.append(logits)
            seq.append(int(logits.argmax()))
        out_tokens.append(seq[len(ids):])
        out_logits.append(torch.stack(row_logits) if row_logits else torch.zeros(0))
    return out_tokens, out_logits


def check_request(model, prompts, max_new_tokens, impl="paged", dense=False, compiled=False):
    if impl not in IMPLS:
        raise cli.BadInput(f"unknown decode path {impl!r}; use one of {IMPLS}")
    if compiled and (impl == "reference" or (dense and impl != "static")):
        raise cli.BadInput("--compile=True compiles the paged or static decode step (a dense cache: static only); "
                           "drop --impl=reference, or give --impl=static with --dense=True")
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
    kept = cache.kept_per_layer()
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
    prompt_file: str = ""  # read the prompt from this text file instead (e.g. source longer than the window)
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
    impl: str = "paged"  # decode path: paged (reads the page pool in place), static (no host sync) or reference (plain ops)
    compile: bool = False  # torch.compile the decode step (compiled once, about a minute on CPU)
    check_every: int = 16  # --impl=static: decode steps between the host's looks (end-of-text, pool room)
    device: str = "auto"  # auto (CUDA when present), cpu or cuda


DEFAULTS = dataclasses.asdict(Flags())


def describe_path(impl: str, dense: bool, compiled: bool) -> str:
    """Which cached attention path runs, in one line (printed, so no path is chosen silently)."""
    how = "torch.compile fullgraph" + (" + CUDA graph" if torch.cuda.is_available() else "") if compiled else "eager"
    if dense:
        return (f"dense cache, kernels.cached_attention ({'reference' if impl == 'reference' else 'sdpa'})"
                + (f", static decode step ({how})" if impl == "static" else ""))
    if impl == "static":
        return (f"SP-KV static: a fixed-shape copy of the cache, decode steps without a host sync "
                f"(kernels.paged_decode_attention, {how}); prefill gathers (sdpa)")
    if impl == "reference":
        return "SP-KV reference: store gathered, plain-ops kernels.cached_attention (the tests' twin)"
    return (f"SP-KV paged: decode reads the page pool in place (kernels.paged_decode_attention, "
            f"{'torch.compile' if compiled else 'eager'}); prefill gathers (sdpa)")


def parse_flags(argv) -> dict:
    o = {**DEFAULTS, **cli.parse(argv, Flags, "generate.py")}
    problems = [f"--{k}={o[k]} must be >= {low}" for k, low in (("chunk", 1), ("page_size", 1), ("max_new_tokens", 0),
                                                                  ("top_k", 0)) if o[k] < low]
    if not (math.isfinite(o["temperature"]) and (o["temperature"] == 0 or o["temperature"] >= 1e-3)):
        problems.append(f"--temperature={o['temperature']} must be 0 (greedy) or a finite number >= 0.001 "
                        "(below that, logits / temperature overflow)")
    if not 0 < o["top_p"] <= 1:
        problems.append(f"--top_p={o['top_p']} must be in (0, 1]")
    if o["tau"] != -1.0 and not 0 <= o["tau"] <= 1:
        problems.append(f"--tau={o['tau']} is outside [0, 1] (-1 = the checkpoint's own)")
    if o["target_density"] != 0 and not 0 < o["target_density"] <= 1:
        problems.append(f"--target_density={o['target_density']} must be in (0, 1], or 0 for off")
    if o["target_density"] and o["dense"]:
        problems.append(f"--target_density={o['target_density']} calibrates SP-KV's tau; --dense=True has no gates, drop one")
    if o["impl"] not in IMPLS:
        problems.append(f"--impl={o['impl']!r} is not one of {IMPLS}")
    if o["compile"] and (o["impl"] == "reference" or (o["dense"] and o["impl"] != "static")):
        problems.append("--compile=True compiles the paged or static decode step (a dense cache: static only); "
                        "drop --impl=reference, or give --impl=static with --dense=True")
    if o["check_every"] < 1:
        problems.append(f"--check_every={o['check_every']} must be >= 1")
    if problems:
        raise cli.BadInput("; ".join(problems))
    if o["prompt_file"]:
        o["prompt"] = read_prompt(o["prompt_file"])
    return o


def read_prompt(path: str) -> str:
    """--prompt_file's text (UTF-8), refused in one line if it cannot be read as such or is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise cli.BadInput(f"--prompt_file={path}: cannot read it as UTF-8 text ({type(e).__name__}: "
                           f"{getattr(e, 'strerror', None) or e.reason}); give a text file") from None
    if not text:
        raise cli.BadInput(f"--prompt_file={path} is empty; give a file with the prompt in it")
    return text


def check_model(model, o: dict):
    """Refuse a checkpoint that cannot decode as asked: non-finite weights (garbage out), SP-KV
    flags on a model without SP-KV layers, or a page larger than the model's whole context."""
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad:
        raise cli.BadInput(f"{o['ckpt'] or 'the checkpoint'} holds non-finite weights ({bad}); it cannot decode, "
                           "use an earlier checkpoint")
    if not o["dense"] and not model.cfg.spkv_layers():
        raise cli.BadInput(f"{o['ckpt'] or 'the checkpoint'} has no SP-KV layers (a dense run's checkpoint); decode it with --dense=True")
    if o["page_size"] > model.cfg.block_size:
        raise cli.BadInput(f"--page_size={o['page_size']} is larger than the model's context of {model.cfg.block_size}")


def chat_prompt(tok, text: str) -> list:
    """ChatML (<|im_start|>role ... <|im_end|>) when the checkpoint's template uses it; else plain."""
    template = tok.spec.get("chat_template") or ""
    if "<|im_start|>" not in template:
        return tok.encode(text)
    start, end = tok.special_id("<|im_start|>"), tok.special_id("<|im_end|>")
    return [start, *tok.encode("user\n" + text), end, *tok.encode("\n"), start, *tok.encode("assistant\n")]


def main(argv):
    o = parse_flags(argv)
    overrides = {} if o["tau"] == -1.0 else {"tau": o["tau"]}  # -1: the checkpoint's own tau
    device = o["device"] if o["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise cli.BadInput(f"--device={o['device']}: use auto, cpu, or cuda on a machine with a CUDA GPU")
    model, tok, _ = load_model(o["ckpt"] or default_checkpoint(), device, dense=o["dense"], **overrides)
    if tok is None:
        raise cli.BadInput(f"{o['ckpt'] or 'the checkpoint'} has no tokenizer; convert it from a folder with tokenizer.json")
    model.eval()
    check_model(model, o)
    if o["target_density"] > 0:  # pick tau on calibration text (stdlib source, train split)
        folder = datalib.prepare("", tok)
        T = min(512, model.cfg.block_size)  # calibration windows: at most the model's context
        model.retune(tau=calibrate(model, datalib.Batches(folder, "train", T), o["target_density"]))
        print(f"tau calibrated to {model.cfg.tau:.4f} for target density {o['target_density']}")
    torch.manual_seed(o["seed"])
    ids = chat_prompt(tok, o["prompt"]) if o["chat"] else tok.encode(o["prompt"])
    dropped = tok.dropped(o["prompt"])
    if dropped:
        print(f"prompt: dropped {dropped} character(s) with bytes this vocabulary lacks; {len(ids)} tokens remain")
    if o["prompt"] and not ids:
        raise cli.BadInput("--prompt has only characters this vocabulary cannot encode; give text it can")
    print(f"cache: {'dense KV cache' if o['dense'] else f'SP-KV ring of {model.cfg.window} + paged store, tau={model.cfg.tau}'}"
          f"; attention: {describe_path(o['impl'], o['dense'], o['compile'])}; device: {device}"
          + ("" if device == "cuda" else " (no CUDA device)"))
    t0 = time.time()
    sampling = dict(temperature=o["temperature"], top_k=o["top_k"], top_p=o["top_p"])
    tokens, _, cache = generate(model, [ids], o["max_new_tokens"], o["dense"], o["chunk"], sampling,
                                impl=o["impl"], page_size=o["page_size"], eos_id=tok.eos_id, compiled=o["compile"],
                                check_every=o["check_every"])
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
          + (", and the one-time compile" if o["compile"] else "") + ")")
    if rep["density_per_layer"] and rep["density"] != rep["density"]:  # nan: nothing has left the window
        print(f"density: no pair is older than the window yet ({held} tokens <= window "
              f"{c.window}); the ring is allocated whole, so a dense cache is smaller at this length")
    elif rep["density_per_layer"]:
        print(f"density of pairs older than the window: {rep['density']:.3f}; per layer: "
              + " ".join(f"{d:.2f}" for d in rep["density_per_layer"].values()))
    ratio = rep["dense_bytes"] / rep["bytes"]
    print(f"KV pairs held {rep['pairs']:,} vs dense {rep['dense_pairs']:,}; KV bytes in use {rep['bytes']:,} vs "
          f"dense {rep['dense_bytes']:,}: " + (f"compression {ratio:.2f}x" if ratio >= 1 else
          f"no compression: this cache holds {1 / ratio:.2f}x the bytes of a dense one"))


if __name__ == "__main__":
    cli.run(main, "generate.py")
