"""The paper's main flow on a small model that needs its old keys: adapt it to SP-KV, against dense.

    python experiments/mainflow.py                          # the shipped model, the paper's recipe, seed 1337
    python experiments/mainflow.py --recipes=paper,lr20,lr100,neutral,closed --seeds=1337,1338,1339
    python experiments/mainflow.py --eval_only=True         # measure finished runs again
    python experiments/mainflow.py --spkv_base=out/pretrain_spkv/snapshots/step_N.pt --base=<dense snapshot at N>
                                                            # the from-scratch flow's last leg
    python experiments/mainflow.py --window=128 --spkv_base=out/ceiling/learned/learned_w128-<date>-<commit>.pt
                                                            # SP-KV from gates fitted to the hindsight oracle

The base is models/stdlib_bytes.pt (experiments/pretrain.py made it; models/stdlib_bytes.json
says how). Every run is train.py on plain stdlib source: SP-KV adapted from the base with open
predictors (u = 0.993) and next-token loss only, through the freeze-and-anneal schedule; its
baseline, the dense twin, is the base trained on densely for the same steps, batches and seed.
Then, on held-out stdlib source and licence prose, under hard gates: SP-KV's loss against density
over a tau sweep and at the tau that keeps --target_density of old pairs on training text
(spkv.calibrate: it asks whether the gates rank pairs well where none fell below 0.5), with the
first-token (sink) keep rate; the dense twin's loss under full
attention and the window alone; and H2O and StreamingLLM on the dense twin at each density SP-KV
reached. The result is a new dated JSON and PNG in --out/results (stamped with the commit), never
merged into an earlier one. Recipes are named train.py overrides (RECIPES), each with its reason.
Seeds are fixed; train.py and the measurements run with --threads torch threads.
"""

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python experiments/<name>.py

import torch

import cli
import data as datalib
import harness
from checkpoint import load_model

PROSE = "/usr/share/common-licenses"
BASE = os.path.join(harness.ROOT, "models", "stdlib_bytes.pt")

RECIPES = {  # name -> (train.py flags on top of the shared ones, why)
    "paper": ({}, "the paper's predictor recipe: LR x5, weight decay 0.1, open init (bias 5)"),
    "lr20": ({"predictor_lr_mult": 20}, "predictor LR x20: a CPU run has few steps for gates to travel from 0.993"),
    "lr100": ({"predictor_lr_mult": 100}, "predictor LR x100: at x5 the output bias moved 5.00 -> 4.75 in 300 steps"),
    "neutral": ({"predictor_lr_mult": 20, "predictor_init_bias": 0.0},
                "x20 and init bias 0 (u = 0.5), not open: the sigmoid's slope there is 35x that at u = 0.993"),
    "closed": ({"predictor_lr_mult": 20, "predictor_init_bias": -2.0},
               "x20 and init bias -2 (u = 0.12), not open: old keys start masked, and the loss must open the ones it needs"),
}


@dataclass
class Flags:
    out: str = "out/mainflow"  # a folder per run, and results/
    base: str = ""  # the dense model to adapt; "" = models/stdlib_bytes.pt
    spkv_base: str = ""  # where the SP-KV runs start instead: a pretrain.py --spkv_window snapshot (the from-scratch flow) or ceiling.py's learned gates; "" = --base
    recipes: str = "paper"  # comma list of RECIPES
    seeds: str = "1337"  # comma list; each seed has its own dense twin
    steps: int = 300  # steps of each adaptation and of its dense twin
    lr: float = 5e-4  # base learning rate of both (the predictor gets lr x its multiplier)
    window: int = 64  # SP-KV's local window; the policies on the dense twin keep the same
    batch_size: int = 8  # sequences of 1024 bytes a step
    eval_batches: int = 4  # held-out batches of eval_batch_size sequences for every figure
    eval_batch_size: int = 4  # sequences of 1024 bytes an eval batch
    threads: int = 2  # torch threads
    taus: str = "0.1,0.3,0.5,0.7,0.8,0.9,0.95,0.98,0.99"  # SP-KV's tau sweep (0.98 and 0.99 reach the paper's best density, 0.12)
    target_density: float = 0.25  # also measured at the tau that keeps this fraction of old pairs on training text
    eval_only: bool = False  # measure the finished runs in --out, train nothing
    tiny: bool = False  # tests: --base is a tiny model, 64-byte sequences, a few steps
    data: str = ""  # training and held-out text, as train.py's --data; "" = the stdlib source


def train_flags(o: dict, seed: int, dense: bool, recipe: dict) -> dict:
    seq_len = 64 if o["tiny"] else 1024
    flags = dict(init="pretrained", ckpt=o["base"] if dense else o["spkv_base"] or o["base"], dense=dense, data=o["data"], data_cache=os.path.join(o["out"], "data_cache"),
                 seq_len=seq_len, batch_size=o["batch_size"], max_steps=o["steps"], lr=o["lr"],
                 warmup_steps=max(1, o["steps"] // 15), weight_decay=0.1, window=o["window"], seed=seed,
                 eval_every=max(1, o["steps"] // 5), eval_batches=2, ckpt_every=max(1, min(50, o["steps"] // 2)),
                 device="cpu", preset="cpu", gates="")  # gates="": the predictors as the checkpoint holds them
    return {**flags, **({} if dense else recipe)}


def plan(o: dict) -> list:
    """[(spkv run, dense run, recipe name, seed)], and each run's train.py flags in o["flags"]."""
    rows, o["flags"] = [], {}
    for seed in cli.number_list("seeds", o["seeds"], int):
        dense = f"dense_s{seed}"
        o["flags"][dense] = train_flags(o, seed, True, {})
        for name in o["recipes"].split(","):
            if name not in RECIPES:
                raise cli.BadInput(f"--recipes: unknown recipe {name!r}; use a comma list of {sorted(RECIPES)}")
            run = f"spkv_{name}{harness.start_suffix(o['spkv_base'])}_s{seed}"  # runs from another start have folders of their own beside the twin
            o["flags"][run] = train_flags(o, seed, False, RECIPES[name][0])
            rows.append((run, dense, name, seed))
    return rows


def held_out(o: dict) -> tuple:
    """({domain: Batches}, stdlib train Batches): plain stdlib val (files the base never saw) and
    licence prose to measure on; the training text to calibrate tau on."""
    tok = load_model(o["base"])[1]
    cache = os.path.join(o["out"], "data_cache")
    T = 64 if o["tiny"] else 1024
    stdlib = datalib.prepare(o["data"], tok, cache)
    domains = {"stdlib": datalib.Batches(stdlib, "val", T)}
    if not o["tiny"]:
        domains["prose"] = datalib.Batches(datalib.prepare(PROSE, tok, cache), "val", T)
    return domains, datalib.Batches(stdlib, "train", T)


def print_rows(results: list):
    print(f"\n{'run':<18} {'text':<7} {'tau':>5} {'density':>8} {'SP-KV':>8} {'vs dense':>9} {'H2O':>8} "
          f"{'Stream':>8} {'window':>8} {'sink kept':>9}")
    for r in results:
        for domain, m in r["measured"].items():
            for p in m["points"]:
                mark = "*" if p["tau"] == m["trained_tau"] else "c" if p["tau"] == m.get("calibrated_tau") else " "
                print(f"{r['run']:<18} {domain:<7} {p['tau']:>4g}{mark} {p['density']:>8.3f} {p['loss']:>8.4f} "
                      f"{harness.pct(p['loss'], m['dense_full']):>9} {harness.pct(p['h2o'], m['dense_full']):>8} "
                      f"{harness.pct(p['streaming'], m['dense_full']):>8} {harness.pct(m['window'], m['dense_full']):>8} "
                      f"{p['first_token_kept']:>9.2f}")
    print("(* the trained tau, c the tau calibrated on training text; every % is against the dense twin under full attention, on the same batches)")


def plot(results: list, path: str):
    """Loss over the dense twin's, against density, one panel per held-out domain: SP-KV's tau sweep
    (one line per run), H2O and StreamingLLM on the dense twin at the same densities, the window alone."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(results[0]["measured"])
    fig, axes = plt.subplots(1, len(domains), figsize=(5.2 * len(domains), 4.0), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for i, r in enumerate(results):
            m = r["measured"][domain]
            pts = sorted(m["points"], key=lambda p: p["density"])
            rel = lambda v: 100 * (v / m["dense_full"] - 1)  # noqa: E731
            d = [p["density"] for p in pts]
            ax.plot(d, [rel(p["loss"]) for p in pts], "o-", color=f"C{i}", label=f"SP-KV {r['run']}")
            if i == 0:  # the policies run on the dense twin of the first run's seed
                ax.plot(d, [rel(p["h2o"]) for p in pts], "s--", color="C7", label="H2O (dense twin)")
                ax.plot(d, [rel(p["streaming"]) for p in pts], "^:", color="C8", label="StreamingLLM (dense twin)")
                ax.axhline(rel(m["window"]), color="C3", lw=1, ls="-.", label="window alone")
        ax.axhline(0, color="k", lw=0.8)
        ax.set(title=f"held-out {domain}", xlabel="density (fraction of old KV pairs kept)",
               ylabel="loss vs dense twin, full attention (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv):
    o = dataclasses.asdict(Flags())
    o.update(cli.parse(argv, Flags, "mainflow.py"))
    o["base"] = o["base"] or BASE
    if not os.path.isfile(o["base"]):
        raise cli.BadInput(f"--base={o['base']} does not exist; give a dense checkpoint (experiments/pretrain.py makes one)")
    if o["spkv_base"] and not os.path.isfile(o["spkv_base"]):
        raise cli.BadInput(f"--spkv_base={o['spkv_base']} does not exist; give a pretrain.py --spkv_window snapshot "
                           "or a ceiling.py learned-gates checkpoint")
    if min(o["steps"], o["batch_size"], o["eval_batches"], o["eval_batch_size"], o["threads"]) < 1:
        raise cli.BadInput("--steps, --batch_size, --eval_batches, --eval_batch_size and --threads must be >= 1")
    if not 0 < o["target_density"] <= 1:
        raise cli.BadInput(f"--target_density={o['target_density']} must be in (0, 1] (the fraction of old pairs kept)")
    taus = cli.number_list("taus", o["taus"], float)
    if not all(0 < t < 1 for t in taus):
        raise cli.BadInput(f"--taus={o['taus']}: each tau must be in (0, 1), the gate value an old pair needs to be kept")
    torch.set_num_threads(o["threads"])
    rows = plan(o)
    t0 = time.time()
    for run in dict.fromkeys(name for row in rows for name in row[:2]):  # each run once, its seed's dense twin after the first
        folder = os.path.join(o["out"], run)
        if o["eval_only"] and not harness.finished(folder, o["flags"][run]):
            raise cli.BadInput(f"--eval_only=True, but {folder} holds no finished run; drop --eval_only to train it")
        harness.run_train(folder, o["flags"][run], o["threads"])
    domains, train = held_out(o)
    results = []
    for run, dense, recipe, seed in rows:
        ckpt = lambda name: os.path.join(o["out"], name, "ckpt.pt")  # noqa: E731
        measured = {d: harness.measure_against_dense(ckpt(run), ckpt(dense), b, taus, o["eval_batches"], o["eval_batch_size"],
                                                     target_density=o["target_density"], calibrate_on=train)
                    for d, b in domains.items()}
        results.append({"run": run, "dense": dense, "recipe": recipe, "why": RECIPES[recipe][1], "seed": seed,
                        "train_flags": o["flags"][run], "measured": measured})
    print_rows(results)
    path = harness.new_result_path(os.path.join(o["out"], "results"), "mainflow")
    harness.write_json(path, {"date": time.strftime("%Y-%m-%d"), "commit": harness.commit_stamp(), "threads": o["threads"],
                              "flags": {k: v for k, v in o.items() if k != "flags"}, "results": results,
                              "wall_s": round(time.time() - t0)})
    plot(results, path[:-len(".json")] + ".png")
    print(f"results: {path} and its .png")


if __name__ == "__main__":
    cli.run(main, "mainflow.py")
