"""How far back does a dense model look? What hiding its old keys costs, by where the query stands.

    python experiments/reach.py                                   # the shipped model
    python experiments/reach.py --ckpt=out/pretrain/snapshots/step_N.pt --windows=128,512

On the held-out sequences of a shipped model's bar (models/stdlib_bytes_heldout.bin: 16 x 1024
bytes of plain stdlib source; a pretrain.py snapshot, which has no .json, is measured on the shipped
model's rows; --heldout gives other rows of the same shape), the loss when every query sees
only its last W keys (the window alone, for each W of --windows), and under StreamingLLM (4 sinks
and the most recent old keys) at --streaming_window and each of --densities; each as % over full
attention, over all queries and over --buckets equal spans of query positions. Beside it, what
the text itself offers: the share of query positions whose last --ngram bytes occurred before, by
how far back their latest occurrence lies (bands cut at --windows), a copy that only keys that far
back can serve.

What it tells: where the window alone at W costs nothing, the model draws nothing from keys more
than W back, so no pruning policy that keeps the last W keys can cost much either, and no gate can
show that it picks the right old keys. A model that "needs its old keys" must lose where recency's
share ends. Deterministic (fp32, fixed sequences); the result is a new dated JSON in --out/results,
never merged into an earlier one.
"""

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python experiments/<name>.py

import torch

import cli
import harness
import measure
from checkpoint import load_model

MODEL = os.path.join(harness.ROOT, "models", "stdlib_bytes.pt")


@dataclass
class Flags:
    ckpt: str = ""  # the dense model; "" = models/stdlib_bytes.pt
    heldout: str = ""  # a .bin of uint16 rows shaped as the shipped model's .json says; "" = the shipped bar's rows
    windows: str = "128,256,384,512,640"  # comma list: the window alone at each
    streaming_window: int = 128  # StreamingLLM's window
    densities: str = "0.25"  # comma list: StreamingLLM's kept fraction of old keys
    buckets: int = 4  # equal spans of query positions
    ngram: int = 16  # bytes that must recur for a position to count as a repeat
    batch_size: int = 4  # sequences a forward
    threads: int = 2  # torch threads
    out: str = "out/reach"  # results/reach-<date>-<commit>.json


def repeat_distances(rows: torch.Tensor, n: int, edges: list) -> dict:
    """{band: share of query positions whose last n tokens occurred earlier in the row, and last did
    so this many positions back}; bands are cut at edges, "none" for positions with no earlier copy."""
    bands = [(a, b) for a, b in zip([1] + edges, edges) if a < b]  # [a, b) distances
    counts = dict.fromkeys([f"{a}-{b}" for a, b in bands] + [f">={edges[-1]}", "none"], 0)
    total = 0
    for row in rows[:, :-1].tolist():
        last = {}
        for t in range(n - 1, len(row)):
            gram, total = tuple(row[t - n + 1:t + 1]), total + 1
            d = t - last[gram] if gram in last else 0
            last[gram] = t
            band = "none" if d == 0 else next((f"{a}-{b}" for a, b in bands if d < b), f">={edges[-1]}")
            counts[band] += 1
    return {band: c / total for band, c in counts.items()}


def over_full(loss: torch.Tensor, full: torch.Tensor, buckets: int) -> dict:
    """% over full attention, over all positions and per bucket ("a-b": query positions a..b-1)."""
    T = loss.shape[0]
    edges = [T * i // buckets for i in range(buckets + 1)]
    row = {"all": 100 * (loss.mean() / full.mean() - 1).item()}
    for a, b in zip(edges, edges[1:]):
        row[f"{a}-{b}"] = 100 * (loss[a:b].mean() / full[a:b].mean() - 1).item()
    return row


def main(argv):
    o = {**dataclasses.asdict(Flags()), **cli.parse(argv, Flags, "reach.py")}
    ckpt = o["ckpt"] or MODEL
    if not os.path.isfile(ckpt):
        raise cli.BadInput(f"--ckpt={ckpt} does not exist; give a dense checkpoint")
    windows = cli.number_list("windows", o["windows"], int)
    densities = cli.number_list("densities", o["densities"], float)
    if min(o["buckets"], o["ngram"], o["batch_size"], o["threads"], o["streaming_window"], *windows) < 1:
        raise cli.BadInput("--windows, --streaming_window, --buckets, --ngram, --batch_size and --threads must be >= 1")
    if not all(0 <= d <= 1 for d in densities):
        raise cli.BadInput(f"--densities={o['densities']}: each must be in [0, 1]")
    torch.set_num_threads(o["threads"])
    shipped_with = ckpt if os.path.isfile(ckpt[:-len(".pt")] + ".json") else MODEL  # a snapshot has no .json of its own
    rows = harness.heldout_rows(shipped_with, o["heldout"])  # (N, T + 1)
    print(f"held-out rows: {o['heldout'] or 'those shipped with ' + shipped_with}")
    T = rows.shape[1] - 1
    if max(windows) > T or o["streaming_window"] >= T or o["buckets"] > T:
        raise cli.BadInput(f"--windows must be at most the sequence length {T} (a window of {T} is full attention), "
                           f"--streaming_window below it, --buckets at most it")
    model = load_model(ckpt, dense=True)[0].eval()
    t0 = time.time()
    full = harness.position_losses(model, rows, lambda layer, q, k, logit: measure.causal_visible(T), o["batch_size"])  # (T,)
    masks = {f"window {w}": measure.window_visible(T, w) for w in windows}
    masks.update({f"streaming@{d:g} w{o['streaming_window']}": measure.streaming_visible(T, o["streaming_window"], d, n_sink=harness.N_SINK)
                  for d in densities})
    results = {"full": full.mean().item()}
    print(f"{ckpt}: full attention {results['full']:.4f} on {rows.shape[0]} x {T} held-out tokens; % over full:")
    for name, visible in masks.items():
        loss = harness.position_losses(model, rows, lambda layer, q, k, logit: visible, o["batch_size"])  # (T,)
        results[name] = over_full(loss, full, o["buckets"])
        print(f"  {name:<22} " + "  ".join(f"{k} {v:+.2f}%" for k, v in results[name].items()), flush=True)
    results["repeats"] = repeat_distances(rows, o["ngram"], sorted(windows))
    print(f"  positions whose last {o['ngram']} bytes occurred before, by how far back: "
          + "  ".join(f"{k} {v:.3f}" for k, v in results["repeats"].items()))
    path = harness.save_result(o["out"], "reach", {**o, "ckpt": ckpt}, results, t0)
    print(f"results: {path}")


if __name__ == "__main__":
    cli.run(main, "reach.py")
