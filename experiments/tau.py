"""Choosing tau after training: the sweep (hard-gate loss and density per tau) and a check of
calibration (spkv.calibrate, the tau that hits a requested density, measured on held-out
text). tau is a deployment knob: no retraining needed.

    python experiments/tau.py --ckpt=out/spkv/ckpt.pt                  # sweep tau = 0.1 ... 0.9
    python experiments/tau.py --ckpt=... --target_density=0.2          # calibrate, then check held-out
Options: --data=PATH (as train.py; default stdlib source), --seq_len, --batches, --batch_size.
"""

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python experiments/<name>.py

import torch

import cli
import data as datalib
import spkv
from checkpoint import load_model
from weights import default_checkpoint
from spkv import calibrate


@torch.no_grad()
def hard_loss_and_density(model, batches, tau, n_batches, batch_size, seed=1) -> tuple:
    """Hard-gate val loss and overall density at tau, on fixed batches."""
    model.retune(tau=tau)
    gen = torch.Generator().manual_seed(seed)
    loss, keeps = 0.0, {}
    for _ in range(n_batches):
        x, y = batches.sample(batch_size, gen)
        gates = []
        loss += model(x, y, a=1.0, gates=gates)[1].item() / n_batches
        for layer, g in zip(model.cfg.spkv_layers(), gates):
            keeps.setdefault(layer, []).append(spkv.hard_keep(g, tau))
    stats = spkv.density_stats({k: torch.cat(v) for k, v in keeps.items()}, model.cfg.window)
    return loss, stats["overall"]


def windows(folder: str, split: str, seq_len: int):
    """Batches of one split of a prepared folder. On the synthetic recall task's data (its
    meta.json gives the sequence length) each window starts at a sequence, as synthetic.py trains
    and measures: a window begun mid-sequence would ask for facts it had cut off."""
    with open(os.path.join(folder, "meta.json")) as f:
        if "sequence_tokens" not in json.load(f):
            return datalib.Batches(folder, split, seq_len)
    from synthetic import DocumentWindows  # here, not at the top: synthetic imports harness, which imports tau

    return DocumentWindows(folder, split, seq_len)


@torch.no_grad()
def plain_loss(path: str, batches, n_batches, batch_size, seed=1) -> float:
    """Val loss of the checkpoint at path under plain attention (no gates), on the batches that
    hard_loss_and_density draws with the same seed."""
    dense = load_model(path, dense=True)[0].eval()
    gen = torch.Generator().manual_seed(seed)
    return sum(dense(*batches.sample(batch_size, gen))[1].item() for _ in range(n_batches)) / n_batches


@dataclass
class Flags:
    ckpt: str = ""  # SP-KV checkpoint; "" = the embedded SmolLM2-135M
    data: str = ""  # as train.py's --data; "" = Python stdlib source
    seq_len: int = 512  # tokens per sequence
    batches: int = 4  # batches to calibrate on and to measure on
    batch_size: int = 2  # sequences per batch
    target_density: float = 0.0  # in (0, 1]: calibrate tau to keep this fraction of old pairs; 0 = sweep
    taus: str = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"  # comma list of tau values to sweep


def main(argv):
    o = dataclasses.asdict(Flags())
    o.update(cli.parse(argv, Flags, "tau.py"))
    if o["target_density"] != 0 and not 0 < o["target_density"] <= 1:
        raise cli.BadInput(f"--target_density={o['target_density']} must be in (0, 1], or 0 to sweep")
    if min(o["seq_len"], o["batches"], o["batch_size"]) < 1:
        raise cli.BadInput("--seq_len, --batches and --batch_size must be >= 1")
    taus = parse_taus(o["taus"])

    path = o["ckpt"] or default_checkpoint()
    model, tok, _ = load_model(path)
    model.eval()
    check_model(model, path, o["seq_len"])
    folder = datalib.prepare(o["data"], tok)
    train, val = windows(folder, "train", o["seq_len"]), windows(folder, "val", o["seq_len"])
    n, bs = o["batches"], o["batch_size"]
    dense_loss = plain_loss(path, val, n, bs)
    print(f"plain attention (same weights): val loss {dense_loss:.4f}")
    if o["target_density"] > 0:
        tau = calibrate(model, train, o["target_density"], n, bs)  # calibrate on train, check on val
        loss, density = hard_loss_and_density(model, val, tau, n, bs)
        print(f"target density {o['target_density']:.3f}: tau {tau:.4f} -> held-out density {density:.3f}, "
              f"hard val loss {loss:.4f} ({100 * (loss / dense_loss - 1):+.2f}% vs plain)")
        return
    print(f"{'tau':>5} {'density':>8} {'hard val loss':>14} {'vs plain':>9}")
    for tau in taus:
        loss, density = hard_loss_and_density(model, val, tau, n, bs)
        print(f"{tau:>5.2f} {density:>8.3f} {loss:>14.4f} {100 * (loss / dense_loss - 1):>+8.2f}%")


def check_model(model, path: str, seq_len: int):
    """Refuse, before any data is read, a model tau cannot act on or whose context --seq_len exceeds."""
    if not model.cfg.spkv_layers():
        raise cli.BadInput(f"--ckpt={path} has no SP-KV layers: no gates for tau to act on (every density would be "
                           "nan); give an SP-KV checkpoint (train.py without --dense=True)")
    if seq_len > model.cfg.block_size:
        raise cli.BadInput(f"--seq_len={seq_len} is beyond the model's context of {model.cfg.block_size}; give "
                           f"--seq_len <= {model.cfg.block_size}")


def parse_taus(text: str) -> list:
    taus = cli.number_list("taus", text, float)
    if not all(0 <= t <= 1 for t in taus):
        raise cli.BadInput(f"--taus={text}: every tau must be in [0, 1]")
    return taus


if __name__ == "__main__":
    cli.run(main, "tau.py")
