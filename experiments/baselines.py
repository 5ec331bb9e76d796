"""Post-hoc KV eviction baselines beside SP-KV in one harness, at a matched budget.

    StreamingLLM  attention sinks (the first n_sink tokens) + the most recent tokens
    H2O           heavy hitters: old keys with the largest attention accumulated so far; each step
                  the one with the least is evicted for good once the budget is exceeded

Every policy answers one question per layer: which keys may query t see? It returns a boolean
`visible` (B, Hkv, T, S) mask (or one that broadcasts to it), and forward_with_policy() runs the
model with those masks instead of its own attention bias: a MaskedAttention stands where a KV
cache would in GPT.forward, so the blocks are the model's own. The local window of `window` tokens is
always visible, as in SP-KV; the budget is on keys older than the window (n_old(t) = t - window + 1
at query t): a fixed cache of round(d * n_old(T - 1)) old keys, so that at the end of the sequence
the kept fraction of old pairs is d, the quantity SP-KV's density measures (spkv.density_stats).

    python experiments/baselines.py --ckpt=out/synthetic/spkv/ckpt.pt --dense_ckpt=out/synthetic/dense/ckpt.pt \\
        --data=out/synthetic/data --seq_len=256
    python experiments/baselines.py --density=0.25            # the embedded SmolLM2 (no gates), stdlib source

Options: --density (default: the SP-KV checkpoint's measured density), --n_sink, --batches,
--batch_size. Prints val loss of every policy on each checkpoint and its change vs full attention.
"""

import dataclasses
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python experiments/<name>.py

import torch
import torch.nn.functional as F

import cli
import data as datalib
import spkv
import tau as taulib
from checkpoint import load_model
from measure import (MaskedAttention, causal_visible, forward_with_masks, masked_attention, old_budget,  # noqa: F401
                     spkv_visible, streaming_visible, window_visible)
from weights import default_checkpoint

POLICIES = ("full", "spkv", "window", "streaming", "h2o")


@torch.no_grad()
def h2o_visible(q: torch.Tensor, k: torch.Tensor, window: int, density: float) -> torch.Tensor:
    """(B, Hkv, T, T) H2O, run step by step as a decoder would. q (B, H, T, D), k (B, Hkv, T, D).

    Each KV head accumulates, per key, the attention it received from all queries so far (summed
    over the G query heads of its group, window keys included). At step t key t - window leaves the
    window and joins the held old keys; once the cache is full, the held key with the least
    accumulated attention is evicted for good (one in, at most one out per step). Query t then
    attends to window + held keys.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    budget = old_budget(T, window, density, q.device).tolist()
    scores = q.view(B, Hkv, H // Hkv, T, D).float() @ k.float()[:, :, None].transpose(-1, -2) / math.sqrt(D)
    # scores: (B, Hkv, G, T, S)
    held = torch.zeros(B, Hkv, T, dtype=torch.bool, device=q.device)  # old keys still cached
    acc = torch.zeros(B, Hkv, T, device=q.device)  # accumulated attention per key
    visible = torch.zeros(B, Hkv, T, T, dtype=torch.bool, device=q.device)
    for t in range(T):
        if t >= window:
            held[:, :, t - window] = True
            over = held.sum(-1) > budget[t]  # (B, Hkv)
            if over.any():
                victim = acc.masked_fill(~held, float("inf")).argmin(-1)  # (B, Hkv)
                held.scatter_(-1, victim[..., None], ~over[..., None] & held.gather(-1, victim[..., None]))
        row = held.clone()
        row[:, :, max(0, t - window + 1):t + 1] = True
        visible[:, :, t] = row
        p = scores[:, :, :, t].masked_fill(~row[:, :, None], float("-inf")).softmax(-1)  # (B, Hkv, G, S)
        acc += p.sum(2)
    return visible


@torch.no_grad()
def hindsight_weight(q: torch.Tensor, k: torch.Tensor, window: int, rank_by: str = "sum") -> torch.Tensor:
    """(B, Hkv, S) how much full attention weighs each key from the queries it is old to
    (t - s >= window), summed over those queries and the G query heads of its group
    (rank_by="sum") or at their largest (rank_by="max"). q (B, H, T, D), k (B, Hkv, T, D).
    A key that is never old (s > T - 1 - window) weighs 0."""
    if rank_by not in ("sum", "max"):
        raise ValueError(f"rank_by={rank_by!r}; use 'sum' or 'max'")
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    rel = torch.arange(T, device=q.device)[:, None] - torch.arange(T, device=q.device)[None, :]  # (T, S) t - s
    scores = q.view(B, Hkv, H // Hkv, T, D).float() @ k.float()[:, :, None].transpose(-1, -2) / math.sqrt(D)
    p = scores.masked_fill(rel < 0, float("-inf")).softmax(-1) * (rel >= window)  # (B, Hkv, G, T, S) old pairs only
    return p.sum((2, 3)) if rank_by == "sum" else p.amax((2, 3))


@torch.no_grad()
def hindsight_visible(q: torch.Tensor, k: torch.Tensor, window: int, density: float, rank_by: str = "sum",
                      n_sink: int = 0) -> torch.Tensor:
    """(B, Hkv, T, T) a write-time keep set chosen with hindsight: the ceiling of SP-KV's class.
    q (B, H, T, D), k (B, Hkv, T, D).

    SP-KV decides once per (key, KV head) whether an old key stays, for every later query. This
    oracle makes the same kind of decision, but from the future: per sequence and KV head, it keeps
    the round(density * (T - window)) keys of the largest hindsight_weight (the first n_sink keys
    first). Not a policy a decoder could run (it reads queries that come later): it bounds what a
    gate that reads one token at write time could pick, at the same final density.
    """
    B, Hkv, T = k.shape[:3]
    pos = torch.arange(T, device=q.device)
    weight = hindsight_weight(q, k, window, rank_by)  # (B, Hkv, S)
    weight[..., :n_sink] = float("inf")
    weight = weight.masked_fill(pos > T - 1 - window, float("-inf"))  # never old: nothing to decide
    n_keep = int(density * max(0, T - window) + 0.5)
    keep = torch.zeros(B, Hkv, T, dtype=torch.bool, device=q.device)
    keep.scatter_(-1, weight.topk(n_keep, dim=-1).indices, True)
    return window_visible(T, window, q.device) | (causal_visible(T, q.device) & keep[:, :, None, :])


def make_policy(name: str, window: int, tau: float, density: float, n_sink: int = 4):
    """policy(q, k, logit) -> visible mask, for one of POLICIES."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; use one of {POLICIES}")

    def policy(q, k, logit):
        T = q.shape[2]
        if name == "full":
            return causal_visible(T, q.device)
        if name == "spkv":
            if logit is None:  # a dense layer of a hybrid, or a checkpoint without gates
                return causal_visible(T, q.device)
            return spkv_visible(logit, window, tau)
        if name == "window":
            return window_visible(T, window, q.device)
        if name == "streaming":
            return streaming_visible(T, window, density, n_sink, q.device)
        return h2o_visible(q, k, window, density)

    return policy


@torch.no_grad()
def forward_with_policy(model, idx, policy) -> torch.Tensor:
    """Logits (B, T, V) of `model` on idx (B, T), every layer attending through policy's mask.
    The same blocks as GPT.forward; only the attention pattern differs."""
    return forward_with_masks(model, idx, lambda layer, q, k, logit: policy(q, k, logit))


@torch.no_grad()
def policy_losses(model, batches, names, density, n_batches, batch_size, n_sink=4, seed=1) -> dict:
    """Mean val loss per policy on the same fixed batches."""
    out = {}
    for name in names:
        policy = make_policy(name, model.cfg.window, model.cfg.tau, density, n_sink)
        gen = torch.Generator().manual_seed(seed)
        total = 0.0
        for _ in range(n_batches):
            x, y = batches.sample(batch_size, gen)
            logits = forward_with_policy(model, x, policy)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item() / n_batches
        out[name] = total
    return out


@dataclass
class Flags:
    ckpt: str = ""  # SP-KV checkpoint; "" = the embedded SmolLM2-135M
    dense_ckpt: str = ""  # a dense baseline checkpoint to run the policies on too; "" = none
    data: str = ""  # as train.py's --data; "" = Python stdlib source
    seq_len: int = 512  # tokens per sequence
    density: float = -1.0  # the baselines' budget: kept fraction of old pairs; -1 = what SP-KV keeps
    n_sink: int = 4  # StreamingLLM's attention sinks
    batches: int = 4  # val batches
    batch_size: int = 2  # sequences per batch


def main(argv):
    o = dataclasses.asdict(Flags())
    o.update(cli.parse(argv, Flags, "baselines.py"))
    if o["density"] != -1.0 and not 0 <= o["density"] <= 1:
        raise cli.BadInput(f"--density={o['density']} must be in [0, 1], or -1 for SP-KV's own")
    if min(o["seq_len"], o["batches"], o["batch_size"]) < 1 or o["n_sink"] < 0:
        raise cli.BadInput("--seq_len, --batches and --batch_size must be >= 1, --n_sink >= 0")
    model, tok, _ = load_model(o["ckpt"] or default_checkpoint())
    model.eval()
    if o["seq_len"] > model.cfg.block_size:
        raise cli.BadInput(f"--seq_len={o['seq_len']} is beyond the model's context of {model.cfg.block_size}; give "
                           f"--seq_len <= {model.cfg.block_size}")
    val = taulib.windows(datalib.prepare(o["data"], tok), "val", o["seq_len"])  # the synthetic task: windows start at a sequence
    n, bs = o["batches"], o["batch_size"]
    _, spkv_density = taulib.hard_loss_and_density(model, val, model.cfg.tau, n, bs)  # kept fraction of old pairs
    density = spkv_density if o["density"] < 0 else o["density"]
    if not 0.0 <= density <= 1.0:
        raise cli.BadInput(f"{o['ckpt']} has no SP-KV gates to match: give the baselines' budget with --density=D")
    print(f"window {model.cfg.window}, tau {model.cfg.tau}: SP-KV keeps {spkv_density:.3f} of old pairs; "
          f"budget of the baselines {density:.3f}; {n} x {bs} val sequences of {o['seq_len']} tokens")
    runs = {o["ckpt"] or "SmolLM2 (embedded)": model}
    if o["dense_ckpt"]:
        runs[o["dense_ckpt"]] = load_model(o["dense_ckpt"])[0].eval()
    results = {}
    for label, m in runs.items():
        names = [p for p in POLICIES if p != "spkv" or any(b.attn.is_spkv for b in m.blocks)]
        results[label] = policy_losses(m, val, names, density, n, bs, o["n_sink"])
    reference = results[o["dense_ckpt"]]["full"] if o["dense_ckpt"] else results[next(iter(runs))]["full"]
    for label, losses in results.items():
        print(f"\n{label}")
        for name, loss in losses.items():
            print(f"  {name:<10} val loss {loss:.4f}  {100 * (loss / reference - 1):+7.2f}%")
    print(f"(% vs full attention of {o['dense_ckpt'] or 'the same checkpoint'})")
    return density, results


if __name__ == "__main__":
    cli.run(main, "baselines.py")
