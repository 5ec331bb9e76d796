"""How well could any write-time gate do on a model? SP-KV's ceiling beside StreamingLLM and H2O.

    python experiments/ceiling.py                          # the shipped model, windows 32..256, densities 0.1, 0.25
    python experiments/ceiling.py --windows=32 --densities=0.05,0.1,0.25,0.5

SP-KV's hard gate decides once, when a pair is written, whether the pair stays for every later
query. StreamingLLM keeps what is recent to each query, which no write-time decision can express
beyond the window. So before asking whether training finds good gates, this asks whether good
gates exist: on the shipped model's held-out sequences (models/stdlib_bytes_heldout.bin, the 16 x
1024 bytes of its bar), at each window and density, the loss under
    full        plain causal attention
    window      the window alone
    streaming   StreamingLLM: 4 sinks + the most recent old keys, at the density
    h2o         H2O: heavy hitters by attention accumulated so far, at the density
    oracle_sum  the keep set of SP-KV's class chosen with hindsight (baselines.hindsight_visible):
                per sequence and KV head, the old keys full attention weighs most over the
                queries they are old to
    oracle_max  the same, ranked by the largest weight one query gives the key
    oracle_sink oracle_sum with the first 4 tokens kept first
all at the same final density of old pairs. No gate that reads one token can beat the oracle's
choice by much; where the oracle loses to StreamingLLM, so will SP-KV on this model at that window.
Each figure is a deterministic eval (fp32, fixed sequences); the result is a new dated JSON in
--out, never merged into an earlier one.
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python experiments/<name>.py

import numpy as np
import torch
import torch.nn.functional as F

import baselines
import cli
import harness
from checkpoint import load_model

MODEL = os.path.join(harness.ROOT, "models", "stdlib_bytes.pt")
ORACLES = {"oracle_sum": dict(rank_by="sum"), "oracle_max": dict(rank_by="max"),
           "oracle_sink": dict(rank_by="sum", n_sink=harness.N_SINK)}


@dataclass
class Flags:
    ckpt: str = ""  # the dense model; "" = models/stdlib_bytes.pt
    heldout: str = ""  # its held-out sequences (a .bin of uint16 rows, shape in the model's .json); "" = the shipped ones
    windows: str = "32,64,128,256"  # comma list
    densities: str = "0.1,0.25"  # comma list of kept fractions of old pairs
    batch_size: int = 4  # sequences a forward
    h2o: bool = True  # also H2O (a step-by-step loop: the slowest policy)
    threads: int = 2
    out: str = "out/ceiling"  # results/ceiling-<date>-<commit>.json


def heldout_rows(ckpt: str, given: str) -> torch.Tensor:
    """(N, T + 1) token rows: the shipped model's bar sequences, or a .bin given with --heldout."""
    meta_path = ckpt[:-len(".pt")] + ".json"
    if not os.path.isfile(meta_path):
        raise cli.BadInput(f"{meta_path} is missing: ceiling.py reads the held-out shape from a shipped model's .json")
    held = json.load(open(meta_path))["heldout"]
    path = given or os.path.join(os.path.dirname(ckpt), held["file"])
    rows = np.fromfile(path, dtype=np.uint16).astype(np.int64)
    if rows.size != np.prod(held["shape"]):
        raise cli.BadInput(f"{path} holds {rows.size} tokens, not {held['shape']}; give the rows shipped with {ckpt}")
    return torch.from_numpy(rows).view(*held["shape"])


def policy(name: str, window: int, density: float):
    """visible(layer, q, k, logit) for one policy name at this window and density."""
    if name in ORACLES:
        return lambda layer, q, k, logit: baselines.hindsight_visible(q, k, window, density, **ORACLES[name])
    p = baselines.make_policy(name, window, tau=0.5, density=density)
    return lambda layer, q, k, logit: p(q, k, None)


@torch.no_grad()
def loss_of(model, rows: torch.Tensor, visible, batch_size: int) -> float:
    """Mean next-token loss over rows (N, T + 1), every layer attending through visible."""
    total, n = 0.0, rows.shape[0]
    for i in range(0, n, batch_size):
        x, y = rows[i:i + batch_size, :-1], rows[i:i + batch_size, 1:]
        logits = baselines.forward_with_masks(model, x, visible)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
    return total / (n * (rows.shape[1] - 1))


def measure(model, rows, windows, densities, batch_size, with_h2o) -> list:
    """[{window, full, window_alone, points: [{density, policy: loss}]}], printed as it goes."""
    full = loss_of(model, rows, policy("full", 1, 1.0), batch_size)
    names = ["streaming", *(["h2o"] if with_h2o else []), *ORACLES]
    pct = lambda v: f"{100 * (v / full - 1):+.2f}%"  # noqa: E731
    print(f"full attention {full:.4f} nats a token on {rows.shape[0]} x {rows.shape[1] - 1} held-out tokens")
    print(f"{'window':>6} {'density':>7} {'alone':>8} " + " ".join(f"{n:>11}" for n in names), flush=True)
    out = []
    for w in windows:
        alone = loss_of(model, rows, policy("window", w, 0.0), batch_size)
        points = []
        for d in densities:
            losses = {n: loss_of(model, rows, policy(n, w, d), batch_size) for n in names}
            points.append({"density": d, **losses})
            print(f"{w:>6} {d:>7g} {pct(alone):>8} " + " ".join(f"{pct(losses[n]):>11}" for n in names), flush=True)
        out.append({"window": w, "window_alone": alone, "points": points})
    print("(every % is over full attention on the same sequences)")
    return [{"full": full}, *out]


def main(argv):
    given = cli.parse(argv, Flags, "ceiling.py")
    o = {**dataclasses.asdict(Flags()), **given}
    ckpt = o["ckpt"] or MODEL
    if not os.path.isfile(ckpt):
        raise cli.BadInput(f"--ckpt={ckpt} does not exist; give a dense checkpoint shipped with its held-out .bin")
    windows = cli.number_list("windows", o["windows"], int)
    densities = cli.number_list("densities", o["densities"], float)
    if min(o["batch_size"], o["threads"]) < 1 or min(windows) < 1 or not all(0 <= d <= 1 for d in densities):
        raise cli.BadInput("--batch_size and --threads must be >= 1, --windows >= 1, --densities in [0, 1]")
    torch.set_num_threads(o["threads"])
    rows = heldout_rows(ckpt, o["heldout"])
    if max(windows) >= rows.shape[1] - 1:
        raise cli.BadInput(f"--windows: {max(windows)} is not below the sequence length {rows.shape[1] - 1}")
    model = load_model(ckpt, dense=True)[0].eval()
    t0 = time.time()
    results = measure(model, rows, windows, densities, o["batch_size"], o["h2o"])
    path = harness.save_result(o["out"], "ceiling", {**o, "ckpt": ckpt}, results, t0)
    print(f"results: {path}")


if __name__ == "__main__":
    cli.run(main, "ceiling.py")
