"""Pretrain the small dense model SP-KV is adapted from: byte-level, on stdlib source, taught to copy.

    python experiments/pretrain.py                   # resumable: run it again to go on where it stopped
    python experiments/pretrain.py --steps=3000      # train further; the run is the same as a straight one

A model that needs its old keys, on 2 CPU cores. The vocabulary is bytes (257 ids), so a step
costs the transformer and not a 49k-way softmax. The shape is Llama's (RoPE, GQA, SwiGLU,
RMSNorm): 4 layers, d=256, 4 query heads over 2 KV heads, context 1024. Plain attention: the
window is an SP-KV knob, chosen when the bar is measured and when SP-KV is adapted.

The data mix, the route this script takes to long-range attention: the training stream is the
stdlib source (split by file, as train.py's default corpus) with a recurring span planted after
every --plant_every bytes: --span_min..--span_max bytes of the text that ended --dist_min..
--dist_max bytes earlier, inserted again. Copying them pays only if the model looks that far back,
so it learns to copy early, and copy heads then serve the real text's own long-range repeats
(a name defined at the top of a file and used below). The validation split is plain held-out
stdlib source, untouched: the bar is measured on plain text only.

Facts (--fact_every > 0), the needle-in-a-haystack route: after every --fact_every bytes a
comment line with a random key and value (harness.fact_line) is planted, and the same line again
--fact_dist_min..--fact_dist_max bytes later. Only looking back predicts the second value, and
only a model that keeps that key can: experiments/needle.py asks for such facts in held-out text.

The learning rate is constant after warmup (--min_lr_frac=1), so a run split into stages is the
straight run. Every --stage_steps steps the driver snapshots the model (snapshots/step_N.pt, model
only) and measures "the bar" on it (bar_N.json): on held-out stdlib and licence prose, the loss
under full attention, the window alone, StreamingLLM (4 sinks + recency) and H2O at densities 0.1
and 0.25 of the old keys, at windows 32, 64 and 128. A model needs its old keys when StreamingLLM at
0.25 costs >= +1.5% and the window alone >= +5%.

The from-scratch flow (--spkv_window=W): the same curriculum with SP-KV attention from step 0, so
that SP-KV and dense are both trained from scratch on the same bytes. Every stage trains soft
gates (the LR is constant: there is no decay to freeze the predictor in); each stage is measured
under hard gates instead of the bar; and the paper's freeze-and-anneal is the last leg, run by
experiments/mainflow.py --spkv_base=<its snapshot>, against the dense pretraining at the same step.

Folders under --out: bytes.pt (the byte tokenizer), data/ (plain memmaps), data_mix/ (the planted
stream and the plain val split), run/ (train.py's out_dir), snapshots/, bar_N.json. A --out made
with other recipe flags is refused. Seeds are fixed (--seed); train.py and the measurements run
with --threads torch threads.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root: python experiments/<name>.py

import numpy as np
import torch
import torch.nn.functional as F

import baselines
import cli
import harness
import data as datalib
import measure
from checkpoint import atomic_save, load_model
from tokenizer import Tokenizer, byte_spec

PROSE = "/usr/share/common-licenses"
BAR_WINDOWS = (32, 64, 128)
BAR_DENSITIES = (0.1, 0.25)
COPY_SPAN = 128  # bytes of held-out text that recur in the copy probe
COPY_GAPS = (32, 256, 768)  # bytes of other text between the two occurrences


@dataclass
class Flags:
    out: str = "out/pretrain"  # everything this run makes
    steps: int = 2000  # optimizer steps in all (rerun with more to go on)
    stage_steps: int = 250  # a snapshot and the bar every this many steps
    threads: int = 2  # torch threads for training and measuring
    seed: int = 1337  # model init, data order, and where spans are planted
    n_layer: int = 4  # transformer blocks
    n_embd: int = 256  # model width
    n_head: int = 4  # query heads
    n_kv_head: int = 2  # key/value heads (GQA)
    seq_len: int = 1024  # context
    batch_size: int = 8  # sequences per step
    lr: float = 2e-3  # constant after warmup
    warmup_steps: int = 100  # linear LR warmup
    weight_decay: float = 0.1  # AdamW's, on matrices
    plant_every: int = 512  # bytes of text between planted spans; 0 = plain stdlib (the "train longer" route)
    span_min: int = 32  # planted span length, bytes
    span_max: int = 128  # (span_min..span_max)
    dist_min: int = 128  # how far back the planted span's original ends, bytes
    dist_max: int = 960  # (dist_min..dist_max)
    fact_every: int = 0  # bytes of text between planted facts (a random key: value line, said again later); 0 = none
    fact_dist_min: int = 64  # bytes of text between a fact and its second saying
    fact_dist_max: int = 960  # (fact_dist_min..fact_dist_max)
    bar_batches: int = 4  # held-out batches of bar_batch_size sequences for the bar
    bar_batch_size: int = 4  # sequences a bar batch
    ship: int = 0  # > 0: copy snapshot step_N.pt to --ship_to with its provenance (command, recipe, bar), train nothing
    ship_to: str = "models/stdlib_bytes.pt"  # where --ship writes, with .json and _heldout.bin beside it (never replaced)
    init_from: str = ""  # a snapshot (or a shipped model) to go on from with a fresh optimizer: a later stage; "" = scratch
    spkv_window: int = 0  # > 0: the from-scratch flow, SP-KV from step 0 at this window (open gates, train.py's predictor recipe, soft gates throughout); 0 = dense
    tiny: bool = False  # tests: a 2-layer d=32 model at 64 bytes on --data, to check the plumbing in seconds
    data: str = ""  # "" = the stdlib source; tests pass a small folder


TINY = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, seq_len=64, batch_size=2, span_min=4, span_max=8,
            dist_min=8, dist_max=48, plant_every=32, bar_batches=1, bar_batch_size=2)  # --tiny's overrides

RECIPE = ("seed", "n_layer", "n_embd", "n_head", "n_kv_head", "seq_len", "batch_size", "lr", "warmup_steps",
          "weight_decay", "plant_every", "span_min", "span_max", "dist_min", "dist_max", "fact_every", "fact_dist_min",
          "fact_dist_max", "init_from", "spkv_window", "tiny",
          "data")


def validate(o: dict):
    problems = [f"--{k}={o[k]} must be >= 1" for k in ("steps", "stage_steps", "threads", "span_min", "dist_min",
                                                          "bar_batches", "bar_batch_size") if o[k] < 1]
    if o["plant_every"] < 0:
        problems.append(f"--plant_every={o['plant_every']} must be >= 0 (0: no planted spans)")
    if o["fact_every"] < 0 or not 0 <= o["fact_dist_min"] <= o["fact_dist_max"]:
        problems.append(f"need --fact_every >= 0 (0: no facts) and 0 <= --fact_dist_min <= --fact_dist_max (got "
                        f"{o['fact_every']}, {o['fact_dist_min']}, {o['fact_dist_max']})")
    if o["fact_every"] and o["fact_dist_max"] + 2 * harness.FACT_LINE > o["seq_len"]:
        problems.append(f"--fact_dist_max={o['fact_dist_max']} leaves no room for a fact and its second saying in "
                        f"--seq_len={o['seq_len']}; keep it at most {o['seq_len'] - 2 * harness.FACT_LINE}")
    if not o["span_min"] <= o["span_max"] <= o["dist_min"] <= o["dist_max"]:
        problems.append(f"need --span_min <= --span_max <= --dist_min <= --dist_max (got {o['span_min']}, "
                        f"{o['span_max']}, {o['dist_min']}, {o['dist_max']}): a span is copied from text that has ended")
    if o["plant_every"] and o["dist_max"] >= o["seq_len"]:
        problems.append(f"--dist_max={o['dist_max']} must be below --seq_len={o['seq_len']}, or no window holds both copies")
    if not 0 <= o["spkv_window"] < o["seq_len"]:
        problems.append(f"--spkv_window={o['spkv_window']} must be in [0, --seq_len={o['seq_len']}) (0: dense)")
    if o["ship"] and o["spkv_window"]:
        problems.append("--ship ships a dense pretraining; this --spkv_window run's snapshots are for mainflow.py --spkv_base")
    if o["steps"] <= o["warmup_steps"]:
        problems.append(f"--steps={o['steps']} must be above --warmup_steps={o['warmup_steps']}")
    if problems:
        raise cli.BadInput("; ".join(problems))


def check_recipe(o: dict):
    """The first call writes --out/recipe.json; a later one with other recipe flags is refused."""
    path = os.path.join(o["out"], "recipe.json")
    recipe = {k: o[k] for k in RECIPE}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        default = dataclasses.asdict(Flags())  # a recipe saved before a flag existed ran at its default
        differ = [f"--{k}={saved.get(k, default[k])} (now {v})" for k, v in recipe.items() if saved.get(k, default[k]) != v]
        if differ:
            raise cli.BadInput(f"{o['out']} holds a pretraining run with other flags: {', '.join(differ)}; "
                               "give a new --out to train these")
        return
    os.makedirs(o["out"], exist_ok=True)
    harness.write_json(path, recipe)


def plant_spans(tokens: np.ndarray, rng: np.random.Generator, o: dict) -> tuple:
    """(stream, planted bytes): tokens (N,) with a copy of earlier text inserted after every
    plant_every tokens. At each cut c the copy is tokens[c - d : c - d + L], with L uniform in
    [span_min, span_max] and d in [dist_min, dist_max], so the original ended d - L >= 0 tokens
    before the cut. Returns the new stream (N + planted,) in tokens' dtype."""
    every = o["plant_every"]
    cuts = np.arange(max(every, o["dist_max"]), len(tokens), every)  # (P,) insertion points
    lengths = rng.integers(o["span_min"], o["span_max"] + 1, len(cuts))  # (P,)
    dists = rng.integers(o["dist_min"], o["dist_max"] + 1, len(cuts))  # (P,)
    pieces, start = [], 0
    for c, L, d in zip(cuts.tolist(), lengths.tolist(), dists.tolist()):
        pieces += [tokens[start:c], tokens[c - d:c - d + L]]
        start = c
    pieces.append(tokens[start:])
    return np.concatenate(pieces), int(lengths.sum())


def plant_facts(tokens: np.ndarray, rng: np.random.Generator, o: dict) -> tuple:
    """(stream, planted bytes): tokens (N,) with a fact line (harness.fact_line) inserted at every
    fact_every-th position c, and the same line again at c + d, d uniform in [fact_dist_min,
    fact_dist_max] positions of tokens (so about d bytes of text lie between the two sayings, more
    where another fact falls between). Returns the new stream in tokens' dtype."""
    cuts = np.arange(o["fact_every"], len(tokens) - o["fact_dist_max"], o["fact_every"])  # (P,) first sayings
    dists = rng.integers(o["fact_dist_min"], o["fact_dist_max"] + 1, len(cuts))  # (P,)
    lines = [harness.fact_line(rng)[0].astype(tokens.dtype) for _ in cuts]
    inserts = sorted([(c, 0, i) for i, c in enumerate(cuts.tolist())] +
                     [(c + d, 1, i) for i, (c, d) in enumerate(zip(cuts.tolist(), dists.tolist()))])
    pieces, start = [], 0
    for at, _, i in inserts:
        pieces += [tokens[start:at], lines[i]]
        start = at
    pieces.append(tokens[start:])
    return np.concatenate(pieces), 2 * sum(len(line) for line in lines)


def prepare_mix(o: dict, tok: Tokenizer) -> str:
    """data_mix/: the planted training stream and the plain val split, as a prepared data folder
    (train.py --data reads it). Deterministic in --seed; meta.json is written last."""
    plain = datalib.prepare(o["data"], tok, os.path.join(o["out"], "data"))
    folder = os.path.join(o["out"], "data_mix")
    if os.path.exists(os.path.join(folder, "meta.json")):
        return folder
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(plain, "meta.json")) as f:
        meta = json.load(f)
    train = np.fromfile(os.path.join(plain, "train.bin"), dtype=meta["dtype"])
    rng = np.random.default_rng(o["seed"])
    mixed, planted = plant_spans(train, rng, o) if o["plant_every"] else (train, 0)
    if o["fact_every"]:
        mixed, facts = plant_facts(mixed, rng, o)
        planted += facts
    with open(os.path.join(folder, "train.bin.tmp"), "wb") as f:
        f.write(mixed.data)
    os.replace(os.path.join(folder, "train.bin.tmp"), os.path.join(folder, "train.bin"))
    shutil.copyfile(os.path.join(plain, "val.bin"), os.path.join(folder, "val.bin.tmp"))
    os.replace(os.path.join(folder, "val.bin.tmp"), os.path.join(folder, "val.bin"))
    harness.write_json(os.path.join(folder, "meta.json"), {**meta, "train_tokens": len(mixed), "planted_tokens": planted,
                                                   "source": f"{meta['source']} with planted spans"})
    print(f"data: {len(train):,} train bytes + {planted:,} planted ({100 * planted / len(mixed):.1f}% of the stream); "
          f"val: plain ({meta['val_tokens']:,} bytes) -> {folder}")
    return folder


def train_flags(o: dict, data: str, tok_ckpt: str, max_steps: int) -> list:
    shape = {k: o[k] for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "seq_len", "batch_size")}
    start = dict(init="pretrained", ckpt=o["init_from"]) if o["init_from"] else dict(init="scratch", ckpt=tok_ckpt)
    spkv = o["spkv_window"] > 0  # the LR never decays here, so there is nothing to freeze in: soft gates throughout
    flags = dict(**shape, **start, dense=not spkv, data=data, seed=o["seed"], lr=o["lr"],
                 min_lr_frac=1.0, warmup_steps=o["warmup_steps"], weight_decay=o["weight_decay"], max_steps=max_steps,
                 window=o["spkv_window"] if spkv else min(64, shape["seq_len"] // 2), eval_every=o["stage_steps"],
                 eval_batches=4, ckpt_every=min(50, o["stage_steps"]), device="cpu", preset="cpu", gates="",
                 out_dir=os.path.join(o["out"], "run"), **({"freeze_frac": 0.0} if spkv else {}))
    return [f"--{k}={v}" for k, v in flags.items()]


def train_to(o: dict, step: int, data: str, tok_ckpt: str):
    """train.py until its checkpoint holds `step` (a fresh run, or a resume of run/)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *train_flags(o, data, tok_ckpt, step)]
    if os.path.exists(os.path.join(o["out"], "run", "ckpt.pt")):
        cmd.append("--resume=True")
    print(f"$ OMP_NUM_THREADS={o['threads']} python train.py " + " ".join(cmd[2:]), flush=True)
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(o["threads"])})
    if res.returncode != 0:
        raise cli.BadInput(f"train.py stopped with exit status {res.returncode} before step {step} (its last line is "
                           f"above); run this command again to resume from {os.path.join(o['out'], 'run')}")


def snapshot(o: dict, step: int) -> str:
    """snapshots/step_N.pt: the model of run/ckpt.pt (which must hold `step`), without optimizer."""
    path = os.path.join(o["out"], "snapshots", f"step_{step:06d}.pt")
    ckpt = torch.load(os.path.join(o["out"], "run", "ckpt.pt"), map_location="cpu", weights_only=False)
    if ckpt["step"] != step:
        raise cli.BadInput(f"{o['out']}/run/ckpt.pt holds step {ckpt['step']}, not {step}; was it trained further "
                           f"by hand? Give a new --out")
    keep = {k: ckpt[k] for k in ("format", "config", "model", "tokenizer", "source", "step", "train_config")}
    atomic_save({**keep, "source": f"experiments/pretrain.py, step {step}"}, path)
    return path


@torch.no_grad()
def measure_bar(path: str, folders: dict, o: dict) -> dict:
    """{domain: {"full": loss, "w<window>": {policy@density: % over full}}} on fixed val batches."""
    out = {}
    n, bs = o["bar_batches"], o["bar_batch_size"]
    for domain, folder in folders.items():
        val = datalib.Batches(folder, "val", o["seq_len"])
        rows = {}
        for window in (BAR_WINDOWS if not o["tiny"] else (8,)):
            model = load_model(path, dense=True, window=window)[0].eval()
            if "full" not in rows:  # full attention does not depend on the window: once per domain
                rows["full"] = baselines.policy_losses(model, val, ["full"], 1.0, n, bs)["full"]
            full, row = rows["full"], {}
            for density in BAR_DENSITIES:
                names = ["window", "streaming", "h2o"] if density == BAR_DENSITIES[0] else ["streaming", "h2o"]
                losses = baselines.policy_losses(model, val, names, density, n, bs)
                row.update({(k if k == "window" else f"{k}@{density:g}"): 100 * (v / full - 1) for k, v in losses.items()})
            rows[f"w{window}"] = row
        tokens = np.asarray(val.tokens)
        rows["copy"] = {str(g): copy_probe(model, tokens, g, 2 if o["tiny"] else 8) for g in COPY_GAPS
                        if 2 * COPY_SPAN + g <= o["seq_len"] and len(tokens) > 2 * COPY_SPAN + g}
        out[domain] = rows
    return out


@torch.no_grad()
def measure_spkv(path: str, folders: dict, o: dict) -> dict:
    """An SP-KV run's stage (--spkv_window): {domain: its loss under soft and hard gates and the
    density the hard gates keep} on the bar's fixed val batches."""
    model = load_model(path)[0]
    off = torch.autocast("cpu", enabled=False)
    return {domain: measure.evaluate(model, datalib.Batches(folder, "val", o["seq_len"]), o["bar_batches"],
                                     o["bar_batch_size"], 1, "cpu", off) for domain, folder in folders.items()}


def print_spkv(step: int, tokens: int, bar: dict):
    for domain, m in bar.items():
        print(f"stage step {step} ({tokens / 1e6:.1f}M bytes) {domain}: SP-KV soft {m['val_soft']:.4f} hard "
              f"{m['val_hard']:.4f} density {m['density']:.3f} (tau {m['tau']})", flush=True)


@torch.no_grad()
def copy_probe(model, tokens: np.ndarray, gap: int, n: int = 8) -> dict:
    """In-context copying, full attention: n sequences [span, gap bytes of other text, the span
    again], all held out; the loss on the span's second occurrence against its first. A model
    that copies predicts the repeat far better; one that does not, about as well."""
    rng = np.random.default_rng(0)
    L, rows = COPY_SPAN, []
    for _ in range(n):
        a, b = rng.integers(0, len(tokens) - 2 * L - gap, 2)
        rows.append(np.concatenate([tokens[a:a + L], tokens[b:b + gap], tokens[a:a + L]]))
    x = torch.from_numpy(np.stack(rows).astype(np.int64))  # (n, 2L + gap)
    logits = model(x[:, :-1])[0]
    loss = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")  # (n, 2L + gap - 1)
    skip = 8  # the span's first bytes cannot be copied before the model knows which span recurs
    first, repeat = loss[:, skip:L - 1].mean().item(), loss[:, L + gap + skip - 1:2 * L + gap - 1].mean().item()
    return {"first": first, "repeat": repeat}


def print_bar(step: int, tokens: int, bar: dict):
    for domain, rows in bar.items():
        cells = "  ".join(f"w{w[1:]}: window {r['window']:+.2f}% SL@.25 {r['streaming@0.25']:+.2f}% "
                          f"SL@.1 {r['streaming@0.1']:+.2f}% H2O@.25 {r['h2o@0.25']:+.2f}%"
                          for w, r in rows.items() if w.startswith("w"))
        cells += "  copy " + " ".join(f"gap {g}: {c['first']:.2f}->{c['repeat']:.2f}" for g, c in rows["copy"].items())
        print(f"bar step {step} ({tokens / 1e6:.1f}M bytes) {domain}: full {rows['full']:.4f}  {cells}", flush=True)


def provenance(out: str, step: int) -> dict:
    """What made --out's snapshot at `step`: its recipe and bar, and the same for the run its
    --init_from snapshot came from (a curriculum's earlier stages), earliest first."""
    recipe = harness.read_json(os.path.join(out, "recipe.json"))
    defaults = dataclasses.asdict(Flags())
    command = " ".join(["python experiments/pretrain.py", f"--out={out}"] +
                       [f"--{k}={v}" for k, v in recipe.items() if v != defaults[k]])  # run to at least `step`
    stage = {"out": out, "step": step, "command": command, "recipe": recipe,
             "bar": harness.read_json(os.path.join(out, f"bar_{step:06d}.json"))}
    if not recipe.get("init_from"):
        return {"stages": [stage]}
    shipped = recipe["init_from"][:-len(".pt")] + ".json"
    if os.path.isfile(shipped):  # a shipped model (--ship): its provenance lies beside it
        return {"stages": harness.read_json(shipped)["stages"] + [stage]}
    parent = os.path.dirname(os.path.dirname(recipe["init_from"]))  # <out>/snapshots/step_N.pt
    parent_step = int(os.path.basename(recipe["init_from"])[len("step_"):-len(".pt")])
    return {"stages": provenance(parent, parent_step)["stages"] + [stage]}


def ship(o: dict):
    """--ship=N: the model of snapshots/step_N.pt at --ship_to, and what made it beside it (.json)."""
    snap = os.path.join(o["out"], "snapshots", f"step_{o['ship']:06d}.pt")
    if not os.path.isfile(snap):
        raise cli.BadInput(f"--ship={o['ship']}: {snap} does not exist; ship a step this run has snapshotted")
    stem = o["ship_to"][:-len(".pt")] if o["ship_to"].endswith(".pt") else ""
    if not stem:
        raise cli.BadInput(f"--ship_to={o['ship_to']} must end in .pt (its provenance goes beside it as .json)")
    there = [p for p in (o["ship_to"], stem + ".json", stem + "_heldout.bin") if os.path.exists(p)]
    if there:
        raise cli.BadInput(f"--ship_to: {there[0]} exists; move it away first (it is someone's model), or give another path")
    ckpt = torch.load(snap, map_location="cpu", weights_only=False)
    os.makedirs(os.path.dirname(os.path.abspath(o["ship_to"])), exist_ok=True)
    atomic_save({k: ckpt[k] for k in ("format", "config", "model", "tokenizer", "source", "step")}, o["ship_to"])
    made = provenance(o["out"], o["ship"])
    met = bar_met(made["stages"][-1]["bar"]["bar"]["stdlib"])
    held = ship_heldout(o, stem + "_heldout.bin")
    harness.write_json(o["ship_to"][:-len(".pt")] + ".json", {"shipped": time.strftime("%Y-%m-%d"), "from": snap,
                       "needs_old_keys": met, "heldout": held, **made})
    print(f"shipped {snap} -> {o['ship_to']} ({os.path.getsize(o['ship_to']) / 1e6:.1f} MB) with its provenance (.json); "
          f"the bar on held-out stdlib, per window: {met}")


def ship_heldout(o: dict, path: str) -> dict:
    """path (<ship_to stem>_heldout.bin): the bar's plain held-out stdlib sequences, seq_len + 1
    bytes each (uint16; the bar_batches x bar_batch_size windows baselines.policy_losses draws), so
    that a test can check the shipped model against its bar without this machine's stdlib. Its
    figures on them are the bar's, in the provenance beside it."""
    val = datalib.Batches(os.path.join(o["out"], "data_mix"), "val", o["seq_len"])
    rows = harness.val_rows(val, o["bar_batches"], o["bar_batch_size"])  # (n * bs, T + 1): the bar's batches
    rows.numpy().astype(np.uint16).tofile(path + ".tmp")
    os.replace(path + ".tmp", path)
    return {"file": os.path.basename(path), "shape": list(rows.shape), "dtype": "uint16"}


def bar_met(rows: dict) -> dict:
    """{window: whether StreamingLLM at 0.25 costs >= +1.5% and the window alone >= +5%} from a bar's domain rows."""
    return {w: r["streaming@0.25"] >= 1.5 and r["window"] >= 5.0 for w, r in rows.items() if w.startswith("w")}


def main(argv):
    o = dataclasses.asdict(Flags())
    o.update(cli.parse(argv, Flags, "pretrain.py"))
    if o["tiny"]:
        o.update(TINY)
    validate(o)
    if o["ship"]:
        return ship(o)
    check_recipe(o)
    torch.set_num_threads(o["threads"])
    tok_ckpt = os.path.join(o["out"], "bytes.pt")
    if not os.path.exists(tok_ckpt):
        harness.byte_checkpoint(tok_ckpt)
    tok = Tokenizer(byte_spec())
    data = prepare_mix(o, tok)
    folders = {"stdlib": data}
    if not o["tiny"]:
        folders["prose"] = datalib.prepare(PROSE, tok, os.path.join(o["out"], "data"))
    tokens_per_step = o["batch_size"] * o["seq_len"]
    for step in range(o["stage_steps"], o["steps"] + 1, o["stage_steps"]):
        bar_path = os.path.join(o["out"], f"bar_{step:06d}.json")
        if os.path.exists(bar_path):
            continue
        t0 = time.time()
        train_to(o, step, data, tok_ckpt)
        snap = snapshot(o, step)
        bar = measure_spkv(snap, folders, o) if o["spkv_window"] else measure_bar(snap, folders, o)
        harness.write_json(bar_path, {"step": step, "tokens": step * tokens_per_step, "snapshot": snap, "bar": bar,
                              "stage_s": round(time.time() - t0, 1), "threads": o["threads"],
                              "date": time.strftime("%Y-%m-%d"), "commit": harness.commit_stamp()})
        (print_spkv if o["spkv_window"] else print_bar)(step, step * tokens_per_step, bar)
    print(f"done: {o['steps']} steps; snapshots in {os.path.join(o['out'], 'snapshots')}, the bar in bar_*.json")


if __name__ == "__main__":
    cli.run(main, "pretrain.py")
