"""The predictor ablation on the small real-text model: what makes gates close, and how far, and
the all-gates-shut control that says how much of SP-KV's lead over dense a local window alone gives.

    python experiments/ablate.py                      # every row, 20-40 min a row at 1 thread
    python experiments/ablate.py --rows=lr20,wd10     # some rows only
    python experiments/ablate.py --eval_only=True     # measure the finished rows again

Each row is a from-scratch run of realtext.py's small model (harness.SHAPES, harness.scratch_flags:
150 steps of 4 x 1024 stdlib tokens) that changes one knob (ROWS: named train.py overrides, each
with its reason), against a dense run of the same context and seed (DENSE). The first block
changes one knob of the paper's recipe (predictor LR x5, weight decay 0.1, output bias 5); the
second one knob of the flows' recipe (predictor LR x20; window 64, context 1024); then the control
(every gate shut) and the x20 recipe at two more seeds. The runs share realtext.py's folder of
named runs (its scratch_dense is every row's dense run at the default context and seed).
Per row: train.py's final eval (2 fixed held-out batches, hard gates) against its dense run, the
density per layer and at each eval; then, on --eval_batches held-out batches
(harness.measure_against_dense), SP-KV at its trained tau and at the tau that keeps
--target_density of old pairs on training text, with H2O and StreamingLLM on the dense run at the
density reached, the window alone, the first token's keep rate and the loss with 4 sinks forced in.
The result is a new dated JSON in --out/results, stamped with the commit, never merged.
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


@dataclass
class Flags:
    out: str = ""  # a folder per run, and results/; "" = out/realtext (out/realtext_tiny with --tiny=True)
    rows: str = ""  # comma list of ROWS, e.g. lr20,wd10; "" = all
    scratch_steps: int = 150  # steps of each run
    target_density: float = 0.25  # also measured at the tau that keeps this fraction of old pairs on training text
    eval_batches: int = 4  # held-out batches (of the run's batch_size sequences) for the calibrated figures
    eval_only: bool = False  # skip training; measure the runs already in --out
    threads: int = 2  # torch threads
    tiny: bool = False  # tests: a 2-layer d=32 model at 64 tokens, to check the plumbing in seconds
    data: str = ""  # training text, as train.py's --data; "" = the Python standard library source
    ckpt: str = ""  # where the tokenizer comes from, as train.py's --ckpt; "" = the embedded SmolLM2


def half_context(shape: dict) -> dict:
    return {"seq_len": shape["seq_len"] // 2, "batch_size": shape["batch_size"] * 2}  # the same tokens a step


def dense_runs(shape: dict) -> dict:
    """dense run -> (train.py flags on top of the from-scratch ones, why). Only context and seed
    change the dense run."""
    return {
        "scratch_dense": ({}, "the dense baseline at the default context and seed (realtext.py's own)"),
        "dense_ctx_half": (half_context(shape), "the baseline of ctx_half: losses at another context differ"),
        "dense_seed2": ({"seed": 1338}, "the baseline of seed2: a seed of its own"),
        "dense_seed3": ({"seed": 1339}, "the baseline of seed3: a seed of its own"),
    }


def rows(shape: dict) -> dict:
    """key -> (what the row changes, train.py flags on top of the from-scratch ones, its dense run, why)."""
    x20 = {"predictor_lr_mult": 20}
    w, half = shape["window"], half_context(shape)
    return {
        "paper": ("paper's recipe", {}, "scratch_dense",
                  "the reference: predictor LR x5, weight decay 0.1, open init (bias 5)"),
        "lr20": ("predictor LR x20", x20, "scratch_dense",
                 "can a faster predictor move open gates to tau in a CPU's steps?"),
        "lr50": ("predictor LR x50", {"predictor_lr_mult": 50}, "scratch_dense",
                 "faster still: does the rate or the step count set how far gates close?"),
        "wd10": ("predictor weight decay 10", {"predictor_weight_decay": 10}, "scratch_dense",
                 "decoupled decay pulls the output bias toward 0 (u = 0.5), onto tau"),
        "bias2": ("init bias 2 (u = 0.88)", {"predictor_init_bias": 2}, "scratch_dense",
                  "start nearer tau, where the sigmoid is less saturated"),
        "window2x": (f"x20, window {2 * w}", {**x20, "window": 2 * w}, "scratch_dense",
                     "the flows' recipe with twice the window: are old keys beyond it still worth cutting?"),
        "ctx_half": (f"x20, context {half['seq_len']}, batch x2", {**x20, **half}, "dense_ctx_half",
                     "half the context at the same tokens a step: fewer old keys per query"),
        "window_quarter": (f"x20, window {w // 4}", {**x20, "window": w // 4}, "scratch_dense",
                           "a quarter of the window: more of what the model needs lies outside it"),
        "shut": ("init bias -30: gates shut", {"predictor_init_bias": -30}, "scratch_dense",
                 "the control: u = 1e-13 masks every old key in training too, a sliding-window model"),
        "seed2": ("x20, seed 1338", {**x20, "seed": 1338}, "dense_seed2",
                  "the x20 recipe at another seed, against its own dense run: the spread"),
        "seed3": ("x20, seed 1339", {**x20, "seed": 1339}, "dense_seed3",
                  "the x20 recipe at a third seed, against its own dense run: the spread"),
    }


def plan(o: dict) -> dict:
    """{run name: train.py flags} of the chosen rows and the dense runs they need, each dense run
    before its first row."""
    shape = harness.SHAPES[o["tiny"]]
    scratch = harness.scratch_flags(o["tiny"], o["scratch_steps"], o["data"], o["ckpt"])
    table, dense = rows(shape), dense_runs(shape)
    runs = {}
    for key in harness.chosen("rows", o["rows"], table):
        _, over, dense_name, _ = table[key]
        runs[dense_name] = {**scratch, **dense[dense_name][0], "dense": True}
        runs["ablate_" + key] = {**scratch, **over}
    return runs


def measure_row(o: dict, key: str, flags: dict) -> dict:
    """A row's train.py final eval against its dense run's, and measure_against_dense on held-out
    text at the row's own context and batch size, with tau calibrated on training text."""
    what, _, dense_name, why = rows(harness.SHAPES[o["tiny"]])[key]
    folder = lambda name: os.path.join(o["out"], name)  # noqa: E731
    run, dense = "ablate_" + key, dense_name
    spkv_eval, dense_eval = harness.final_eval(folder(run)), harness.final_eval(folder(dense))
    train, val = harness.train_and_val(os.path.join(folder(run), "ckpt.pt"), o["data"], flags["seq_len"])
    measured = harness.measure_against_dense(os.path.join(folder(run), "ckpt.pt"), os.path.join(folder(dense), "ckpt.pt"),
                                             val, (), o["eval_batches"], flags["batch_size"],
                                             target_density=o["target_density"], calibrate_on=train, with_sinks=True)
    return {"row": key, "what": what, "why": why, "run": run, "dense": dense, "train_flags": flags,
            "final_eval": spkv_eval, "dense_final_eval": dense_eval,
            "vs_dense": spkv_eval["val_hard"] / dense_eval["val_hard"] - 1,
            "density_by_eval": harness.density_by_eval(folder(run)), "measured": measured}


def print_final_evals(results: list):
    print(f"\n{'ablation row':<32} {'density':>8} {'per layer':<24} {'SP-KV hard':>10} {'dense':>8} {'vs dense':>9}"
          "  density at each eval")
    for r in results:
        e, layers = r["final_eval"], r["final_eval"]["density_per_layer"]
        per_layer = " ".join(f"{layers[k]:.2f}" for k in sorted(layers, key=int))
        print(f"{r['what']:<32} {e['density']:>8.3f} {per_layer:<24} {e['val_hard']:>10.4f} "
              f"{r['dense_final_eval']['val_hard']:>8.4f} {100 * r['vs_dense']:>+8.2f}%  "
              + " ".join(f"{step}:{x:.2f}" for step, x in r["density_by_eval"]))


def check(o: dict):
    if min(o["scratch_steps"], o["eval_batches"], o["threads"]) < 1:
        raise cli.BadInput("--scratch_steps, --eval_batches and --threads must be >= 1")
    if not 0 < o["target_density"] <= 1:
        raise cli.BadInput(f"--target_density={o['target_density']} must be in (0, 1] (the fraction of old pairs kept)")


def main(argv):
    started = time.time()
    given = cli.parse(argv, Flags, "ablate.py")
    o = {**dataclasses.asdict(Flags()), **given, "out": harness.out_folder(given, "realtext")}
    check(o)
    torch.set_num_threads(o["threads"])
    runs = plan(o)
    harness.train_all(o["out"], runs, o["threads"], o["eval_only"])
    results = [measure_row(o, name.removeprefix("ablate_"), flags) for name, flags in runs.items()
               if name.startswith("ablate_")]
    print_final_evals(results)
    harness.print_points(f"held-out stdlib, at the trained tau and at the tau for density {o['target_density']} "
                         "(calibrated on training text):",
                         [(f"{r['what']}{suffix}", r["measured"], r["measured"][key]) for r in results
                          for key, suffix in (("trained_tau", ""), ("calibrated_tau", ", calibrated"))])
    path = harness.save_result(o["out"], "ablate", o, {"rows": results}, started)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    cli.run(main, "ablate.py")
