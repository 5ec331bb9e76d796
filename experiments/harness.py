"""What the experiments share: train.py runs that are idempotent, and results that are never merged.

    run_train(folder, flags, threads)   train.py into folder unless a finished run of these flags is
                                        there; resume an interrupted one; refuse one of other flags
    measure_against_dense(...)          SP-KV under hard gates against its dense twin and the post-hoc
                                        policies (H2O, StreamingLLM, the window alone) at equal density
    new_result_path(out, name)          a dated file stamped with the commit, never an earlier one
    byte_checkpoint(path)               a tiny checkpoint that carries the byte tokenizer

A child's one-line refusal is passed through as one line (cli.BadInput), not a traceback.
"""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn.functional as F

import baselines
import cli
import spkv
import tau as taulib
from checkpoint import load_model, save_checkpoint
from model import GPT, GPTConfig
from tokenizer import byte_spec


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj):
    """Atomic: a kill mid-write leaves no torn file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def byte_checkpoint(path: str):
    """A tiny checkpoint whose only use is its byte-level tokenizer (train.py --init=scratch reads it)."""
    torch.manual_seed(0)
    save_checkpoint(path, GPT(GPTConfig(vocab_size=257, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, n_hidden=64,
                                        block_size=64)), byte_spec(), source="experiments/harness.py")


def commit_stamp() -> str:
    """The repo's commit, with "+dirty" when tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def new_result_path(out: str, name: str, ext: str = "json") -> str:
    """out/name-<date>-<commit>.<ext>, with -2, -3 ... when that exists: results are never replaced."""
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"{name}-{time.strftime('%Y-%m-%d')}-{commit_stamp()}")
    path, n = f"{base}.{ext}", 2
    while os.path.exists(path):
        path, n = f"{base}-{n}.{ext}", n + 1
    return path


def finished(folder: str, flags: dict) -> bool:
    """Whether folder holds a finished run of these flags. A finished run made with other flags is
    refused: it holds someone's results, never trained over or measured as if it were this one."""
    final = os.path.join(folder, "final.json")
    if not os.path.exists(final):
        return False
    saved = read_json(final)["train_config"]
    differ = [f"--{k}={saved.get(k)} (wanted {v})" for k, v in flags.items() if saved.get(k) != v]
    if differ:
        raise cli.BadInput(f"{folder} holds a finished run with other flags: {', '.join(differ)}; "
                           "give a new --out (or move that folder away) to train these")
    return True


def run_train(folder: str, flags: dict, threads: int):
    """train.py for one run, unless it already finished; an interrupted run (ckpt.pt, no final.json)
    is resumed, never started over. train.py's refusal comes back as one line."""
    if finished(folder, flags):
        print(f"{folder}: finished earlier, kept")
        return
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *[f"--{k}={v}" for k, v in flags.items()],
           f"--out_dir={folder}"]
    if os.path.exists(os.path.join(folder, "ckpt.pt")):
        cmd.append("--resume=True")
    print(f"$ OMP_NUM_THREADS={threads} python train.py " + " ".join(cmd[2:]), flush=True)
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise cli.BadInput(f"train.py into {folder} stopped with exit status {res.returncode}: {last}")


N_SINK = 4  # StreamingLLM's attention sinks, and the sink diagnostic's


@torch.no_grad()
def first_token_keep_rate(model, batches, tau: float, n: int, bs: int) -> float:
    """How often the gates keep the first token (the attention sink of most pretrained models), over
    (sequence, SP-KV layer, KV head), on the batches tau.hard_loss_and_density draws."""
    gen = torch.Generator().manual_seed(1)
    kept = []
    for _ in range(n):
        gates = []
        model(batches.sample(bs, gen)[0], a=1.0, gates=gates)
        kept += [spkv.hard_keep(g[..., 0], tau).float().flatten() for g in gates]  # (B * Hkv,) each
    return torch.cat(kept).mean().item()


@torch.no_grad()
def soft_loss(model, batches, n: int, bs: int) -> float:
    gen = torch.Generator().manual_seed(1)
    return sum(F.cross_entropy(model(x, a=0.0)[0].float().flatten(0, 1), y.flatten()).item()
               for x, y in (batches.sample(bs, gen) for _ in range(n))) / n


def with_tau(path: str, tau: float):
    """The checkpoint's model at another threshold (a deployment knob: no retraining)."""
    return load_model(path, tau=tau)[0].eval()


@torch.no_grad()
def measure_against_dense(spkv_path: str, dense_path: str, batches, taus, n: int, bs: int) -> dict:
    """On fixed held-out batches, under hard gates: SP-KV at its trained tau and over a tau sweep
    (loss, density, first-token keep rate); the dense twin under full attention and the window
    alone; and H2O and StreamingLLM on the dense twin at each density SP-KV reached."""
    trained = load_model(spkv_path)[0].eval()
    dense = load_model(dense_path, window=trained.cfg.window)[0].eval()
    ref = baselines.policy_losses(dense, batches, ["full", "window"], 0.0, n, bs)
    points = []
    for tau in sorted({trained.cfg.tau, *taus}):
        model = with_tau(spkv_path, tau)
        loss, density = taulib.hard_loss_and_density(model, batches, tau, n, bs)
        policies = baselines.policy_losses(dense, batches, ["h2o", "streaming"], density, n, bs)
        points.append({"tau": tau, "loss": loss, "density": density, **policies,
                       "first_token_kept": first_token_keep_rate(model, batches, tau, n, bs)})
    return {"dense_full": ref["full"], "window": ref["window"], "spkv_soft": soft_loss(trained, batches, n, bs),
            "trained_tau": trained.cfg.tau, "points": points}


def pct(loss: float, ref: float) -> str:
    return f"{100 * (loss / ref - 1):+.2f}%"
