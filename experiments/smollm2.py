"""SmolLM2-135M, a pretrained model that uses its old keys, adapted to SP-KV on 2 CPU cores with
several predictor recipes, against the same steps of dense training.

    python experiments/smollm2.py                     # every recipe, ~2 h in all on 2 cores (estimated)
    python experiments/smollm2.py --recipes=neutral   # one recipe, ~35 min
    python experiments/smollm2.py --eval_only=True    # measure the finished runs again
    python experiments/smollm2.py --recipes=paper --spkv_base=<ceiling.py's learned_w64 checkpoint of SmolLM2>
                                                      # from gates fitted to the model's own attention
    python experiments/smollm2.py --recipes=paper --spkv_base=... --seed=1338   # another seed: dense and SP-KV runs of its own

The model is the embedded SmolLM2-135M-Instruct (or --ckpt), on stdlib source at 1024 tokens with a
window of 64: --steps steps of 1 sequence at base LR 1e-4. Every run is train.py: the dense run,
and one SP-KV adaptation per recipe (RECIPES: named train.py overrides, each with its reason), all
with the predictor at x100 the base LR (paper: x5, from --spkv_base). Each SP-KV model is measured on --eval_batches held-out
sequences under hard gates (harness.measure_against_dense) at its trained tau and at the tau that
keeps --target_density of old pairs on training text, against the dense run under full attention
and the window alone, with H2O and StreamingLLM on the dense run at SP-KV's density and window; a
diagnostic beside it, not the method: how often the gates keep the first token, and the loss with
the first 4 tokens kept in every head too. The runs share realtext.py's folder of named runs. The
result is a new dated JSON in --out/results, stamped with the commit, never merged.
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

RECIPES = {  # name -> (train.py flags of the SP-KV run on top of the shared ones, why)
    "x100": ({"predictor_lr_mult": 100},
             "open gates (bias 5), otherwise the paper's recipe (predictor weight decay 0.1)"),
    "wd10": ({"predictor_lr_mult": 100, "predictor_weight_decay": 10},
             "open gates, with predictor decay 10 pulling the output bias toward u = 0.5"),
    "neutral": ({"predictor_lr_mult": 100, "predictor_init_bias": 0.0},
                "init bias 0 (u = 0.5): the gate's slope u(1 - u) is 0.25 there, 0.007 at u = 0.993"),
    "closed": ({"predictor_lr_mult": 100, "predictor_init_bias": -2.0},
               "init bias -2 (u = 0.12): old keys start down-weighted by log u = -2.1"),
    "paper": ({"predictor_lr_mult": 5},
              "the paper's predictor recipe (LR x5, weight decay 0.1); with --spkv_base, from gates fitted by ceiling.py"),
}


@dataclass
class Flags:
    out: str = ""  # a folder per run, and results/; "" = out/realtext (out/realtext_tiny with --tiny=True)
    recipes: str = ""  # comma list of RECIPES, e.g. neutral,closed; "" = all
    steps: int = 60  # steps of each adaptation and of the dense run
    target_density: float = 0.25  # also measured at the tau that keeps this fraction of old pairs on training text
    eval_batches: int = 4  # held-out sequences for every figure
    eval_only: bool = False  # skip training; measure the runs already in --out
    threads: int = 2  # torch threads
    tiny: bool = False  # tests: 64 tokens, a window of 8, to check the plumbing in seconds (give a tiny --ckpt)
    data: str = ""  # training text, as train.py's --data; "" = the Python standard library source
    ckpt: str = ""  # the pretrained model, as train.py's --ckpt; "" = the embedded SmolLM2-135M
    spkv_base: str = ""  # where the SP-KV runs start instead: ceiling.py's learned-gates checkpoint of --ckpt; "" = --ckpt
    tau: float = 0.5  # the SP-KV runs' hard-gate threshold (train.py --tau); from fitted gates, the tau that keeps a chosen share of old pairs at the start (experiments/tau.py --target_density)
    seed: int = 1337  # train.py --seed of every run (data order, fresh predictors' init); another seed than 1337 has run folders of its own


def shared_flags(o: dict) -> dict:
    """train.py flags of every run: the pretrained model at the shape's context and window."""
    shape, steps = harness.SHAPES[o["tiny"]], o["steps"]
    return {"init": "pretrained", "ckpt": o["ckpt"], "data": o["data"], "device": "cpu", "preset": "cpu", "gates": "",
            "seq_len": shape["seq_len"], "window": shape["window"], "batch_size": 1, "lr": 1e-4, "weight_decay": 0.0,
            "warmup_steps": max(1, steps // 10), "max_steps": steps, "eval_every": 20, "eval_batches": 2,
            "ckpt_every": 20, "seed": o["seed"]}


def plan(o: dict) -> dict:
    """{run name: train.py flags}: the dense run, then the chosen recipes."""
    base = shared_flags(o)
    start = {"ckpt": o["spkv_base"]} if o["spkv_base"] else {}
    start["tau"] = o["tau"]
    return {dense_run(o): {**base, "dense": True},
            **{spkv_run(o, name): {**base, **start, **RECIPES[name][0]}
               for name in harness.chosen("recipes", o["recipes"], RECIPES)}}


def seed_suffix(o: dict) -> str:
    """"" at train.py's default seed (the folders of runs made before --seed existed), else _s<seed>."""
    return "" if o["seed"] == Flags.seed else f"_s{o['seed']}"


def dense_run(o: dict) -> str:
    """The folder of the dense run of --seed."""
    return "smollm2_dense" + seed_suffix(o)


def spkv_run(o: dict, recipe: str) -> str:
    """The folder of a recipe's SP-KV run. Runs from another start than --ckpt, at another tau than
    0.5, or at another seed, have folders of their own beside the dense run."""
    return f"smollm2_spkv_{recipe}{harness.start_suffix(o['spkv_base'])}" + (f"_tau{o['tau']:g}" if o["tau"] != 0.5 else "") + seed_suffix(o)


def measure_recipe(o: dict, name: str, flags: dict) -> dict:
    """One recipe's SP-KV run against the dense run: measure_against_dense at its trained tau and at
    the tau calibrated on training text, and train.py's final eval."""
    folder = lambda run: os.path.join(o["out"], run)  # noqa: E731
    run = spkv_run(o, name)
    train, val = harness.train_and_val(os.path.join(folder(run), "ckpt.pt"), o["data"], flags["seq_len"])
    measured = harness.measure_against_dense(os.path.join(folder(run), "ckpt.pt"),
                                             os.path.join(folder(dense_run(o)), "ckpt.pt"), val, (),
                                             o["eval_batches"], flags["batch_size"], target_density=o["target_density"],
                                             calibrate_on=train, with_sinks=True)
    return {"recipe": name, "why": RECIPES[name][1], "run": run, "dense": dense_run(o), "train_flags": flags,
            "final_eval": harness.final_eval(folder(run)), "measured": measured}


def check(o: dict):
    if o["spkv_base"] and not os.path.isfile(o["spkv_base"]):
        raise cli.BadInput(f"--spkv_base={o['spkv_base']} does not exist; give ceiling.py's learned-gates checkpoint "
                           "(ceiling.py --ckpt=<this model> --draw_heldout=16 --distill_seqs=16 saves one)")
    if not 0 < o["tau"] < 1:
        raise cli.BadInput(f"--tau={o['tau']} must be in (0, 1): the gate value an old pair needs to be kept")
    if not 0 <= o["seed"] < 2 ** 63:
        raise cli.BadInput(f"--seed={o['seed']} must be in [0, 2**63) (train.py's --seed)")
    if min(o["steps"], o["eval_batches"], o["threads"]) < 1:
        raise cli.BadInput("--steps, --eval_batches and --threads must be >= 1")
    if not 0 < o["target_density"] <= 1:
        raise cli.BadInput(f"--target_density={o['target_density']} must be in (0, 1] (the fraction of old pairs kept)")


def main(argv):
    started = time.time()
    given = cli.parse(argv, Flags, "smollm2.py")
    o = {**dataclasses.asdict(Flags()), **given, "out": harness.out_folder(given, "realtext")}
    check(o)
    torch.set_num_threads(o["threads"])
    runs = plan(o)
    harness.train_all(o["out"], runs, o["threads"], o["eval_only"])
    results = [measure_recipe(o, name, runs[spkv_run(o, name)]) for name in harness.chosen("recipes", o["recipes"], RECIPES)]
    harness.print_points("SmolLM2-135M adapted, held-out stdlib:",
                         [(f"{r['recipe']}, {label}", r["measured"], r["measured"][key]) for r in results
                          for key, label in (("trained_tau", "tau as trained"),
                                             ("calibrated_tau", f"tau for density {o['target_density']}"))])
    path = harness.save_result(o["out"], "smollm2", o, {"recipes": results}, started)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    cli.run(main, "smollm2.py")
