"""The BPE-model flows on real text and 2 CPU cores: does SP-KV prune at the dense loss, from scratch
and adapted from dense, and how does it compare with H2O and StreamingLLM at its density?

    python experiments/realtext.py                    # both flows, a table and a PNG, ~50 min on 2 cores
    python experiments/realtext.py --eval_only=True   # measure the finished runs again (no training)

Text nobody here wrote: the Python standard library source (train.py's default corpus, split by
file) and, as a second held-out domain, the licence texts under /usr/share/common-licenses.
Model: harness.SHAPES, 4 layers, d=256, 4 query heads over 2 KV heads (GQA), RoPE, SmolLM2's
tokenizer; context 1024 tokens with a window of 64, so most keys are old. Every run is train.py
(RUNS: named overrides, each with its reason), with the paper's open init (predictors start at
u = 0.993) and next-token loss only:
  (a) from scratch: SP-KV and dense, the same steps and batches (150 x 4 x 1024 tokens);
  (b) the paper's main flow: the dense model of (a) is the pretrained model; SP-KV is adapted from
      it (gates open) and, as its baseline, the dense model is trained on for the same 60 steps.
Then, on held-out text under hard gates (harness.measure_against_dense): each SP-KV model at its
trained tau and over a tau sweep, against its dense twin under full attention and the window
alone, with H2O and StreamingLLM on the dense twin at each density SP-KV reached and over fixed
budgets. The result is a new dated JSON and PNG in --out/results, stamped with the commit, never
merged into an earlier one. Seeds are fixed (train.py --seed, fixed eval batches); train.py runs
with --threads torch threads. Finished runs are kept; a run folder made with other flags is refused.
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
FLOWS = ("scratch", "adapt")
RUNS = {  # name -> (flow, train.py flags on top of the flow's, why)
    "scratch_dense": ("scratch", {"dense": True},
                      "the baseline of (a), and the pretrained model that (b) adapts"),
    "scratch_spkv": ("scratch", {"predictor_lr_mult": 20.0},
                     "predictor LR x20 (paper: x5): open gates must travel from u = 0.993 to tau in 150 steps"),
    "adapt_dense": ("adapt", {"dense": True},
                    "the baseline of (b): the pretrained model trained on densely for the same steps"),
    "adapt_spkv": ("adapt", {"predictor_lr_mult": 100.0},
                   "predictor LR x100 of (b)'s base 5e-4 (5e-2): open gates have only 60 steps to close"),
}
TAUS = (0.1, 0.3, 0.5, 0.7, 0.9)  # SP-KV's tau sweep
BUDGETS = (0.1, 0.25, 0.5, 0.75)  # densities of the H2O / StreamingLLM budget sweep


@dataclass
class Flags:
    out: str = ""  # a folder per run, and results/; "" = out/realtext (out/realtext_tiny with --tiny=True)
    scratch_steps: int = 150  # (a): steps of each from-scratch run
    adapt_steps: int = 60  # (b): steps of the adaptation and of the continued dense run
    eval_batches: int = 4  # held-out batches (of the shape's batch_size sequences) for every figure
    eval_only: bool = False  # skip training; measure the runs already in --out
    threads: int = 2  # torch threads
    tiny: bool = False  # tests: a 2-layer d=32 model at 64 tokens, to check the plumbing in seconds
    data: str = ""  # training text, as train.py's --data; "" = the Python standard library source
    ckpt: str = ""  # where the tokenizer comes from, as train.py's --ckpt; "" = the embedded SmolLM2


def flow_flags(o: dict, flow: str) -> dict:
    """train.py flags shared by a flow's two runs. (b) starts from (a)'s dense checkpoint, at half
    (a)'s learning rate."""
    scratch = harness.scratch_flags(o["tiny"], o["scratch_steps"], o["data"], o["ckpt"])
    if flow == "scratch":
        return scratch
    b = o["adapt_steps"]
    return {**scratch, "init": "pretrained", "ckpt": os.path.join(o["out"], "scratch_dense", "ckpt.pt"),
            "lr": 5e-4, "warmup_steps": max(1, b // 10), "max_steps": b}


def plan(o: dict) -> dict:
    """{run name: train.py flags}, (a)'s dense run first: (b) starts from it."""
    return {name: {**flow_flags(o, flow), **over} for name, (flow, over, _) in RUNS.items()}


def held_out(o: dict) -> dict:
    """{text: Batches}: the stdlib val split (files no run trained on) and the licence prose."""
    tok = load_model(os.path.join(o["out"], "scratch_dense", "ckpt.pt"))[1]
    T = harness.SHAPES[o["tiny"]]["seq_len"]
    return {"stdlib": datalib.Batches(datalib.prepare(o["data"], tok), "val", T),
            "prose": datalib.Batches(datalib.prepare(PROSE, tok), "train", T)}


def measure(o: dict, texts: dict) -> list:
    """Each flow's SP-KV run against its dense run, on each held-out text."""
    ckpt = lambda name: os.path.join(o["out"], name, "ckpt.pt")  # noqa: E731
    bs = harness.SHAPES[o["tiny"]]["batch_size"]
    return [{"flow": flow, "text": text,
             "measured": harness.measure_against_dense(ckpt(f"{flow}_spkv"), ckpt(f"{flow}_dense"), batches, TAUS,
                                                       o["eval_batches"], bs, budgets=BUDGETS)}
            for flow in FLOWS for text, batches in texts.items()]


def print_table(results: list):
    """One line per (flow, text) at SP-KV's trained tau; every % is against the dense twin."""
    print(f"\n{'flow':<8} {'text':<7} {'density':>8} {'SP-KV hard':>11} {'dense':>8} {'SP-KV vs dense':>15} "
          f"{'H2O':>8} {'Stream':>8} {'window':>8}")
    for r in results:
        m = r["measured"]
        p, ref = harness.point(m, m["trained_tau"]), m["dense_full"]
        print(f"{r['flow']:<8} {r['text']:<7} {p['density']:>8.3f} {p['loss']:>11.4f} {ref:>8.4f} "
              f"{harness.pct(p['loss'], ref):>15} {harness.pct(p['h2o'], ref):>8} "
              f"{harness.pct(p['streaming'], ref):>8} {harness.pct(m['window'], ref):>8}")


STYLES = {  # policy -> (marker and line, colour, legend label): one colour and one marker each
    "spkv": ("o-", "C0", "SP-KV, tau sweep"),
    "h2o": ("s-", "C1", "H2O (dense model)"),
    "streaming": ("^-", "C2", "StreamingLLM (dense model)"),
    "window": ("X", "C3", "window only"),
}


def loss_density_panel(ax, m: dict, title: str):
    """One (flow, text)'s measure_against_dense result m on ax: SP-KV's tau sweep, H2O and
    StreamingLLM at SP-KV's densities and over the budgets, the window alone, the dense line."""
    sweep = sorted(m["points"], key=lambda p: p["density"])
    style, color, label = STYLES["spkv"]
    ax.plot([p["density"] for p in sweep], [p["loss"] for p in sweep], style, color=color, label=label)
    for name in ("h2o", "streaming"):
        style, color, label = STYLES[name]
        ax.plot(*zip(*sorted((p["density"], p[name]) for p in m["points"] + m["budgets"])), style, color=color,
                label=label)
    style, color, label = STYLES["window"]
    ax.plot([0], [m["window"]], style, color=color, ms=8, label=label)
    ax.axhline(m["dense_full"], color="k", lw=0.8, ls="--", label="dense, full attention")
    ax.set(title=title, xlabel="density (old pairs kept)", ylabel="val loss (hard)")


def loss_density_figure(plt, results: list):
    """Hard-gate loss against density, one panel per (flow, text), and one legend for them all
    below the panels (every panel draws the same five entries)."""
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        loss_density_panel(ax, r["measured"], f"{r['flow']}, {r['text']}")
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # the bottom tenth holds the legend
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=5, frameon=False)
    return fig


def plot(results: list, path: str):
    """loss_density_figure as a PNG at path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = loss_density_figure(plt, results)
    fig.savefig(path)
    plt.close(fig)


def check(o: dict):
    if min(o["scratch_steps"], o["adapt_steps"], o["eval_batches"], o["threads"]) < 1:
        raise cli.BadInput("--scratch_steps, --adapt_steps, --eval_batches and --threads must be >= 1")


def main(argv):
    started = time.time()
    given = cli.parse(argv, Flags, "realtext.py")
    o = {**dataclasses.asdict(Flags()), **given, "out": harness.out_folder(given, "realtext")}
    check(o)
    torch.set_num_threads(o["threads"])
    runs = plan(o)
    harness.train_all(o["out"], runs, o["threads"], o["eval_only"])
    results = measure(o, held_out(o))
    print_table(results)
    train_evals = {name: {"why": RUNS[name][2], "train_flags": flags,
                          "final_eval": harness.final_eval(os.path.join(o["out"], name))}
                   for name, flags in runs.items()}
    path = harness.save_result(o["out"], "realtext", o, {"runs": train_evals, "measured": results}, started)
    plot(results, path[:-len(".json")] + ".png")
    print(f"\nresults: {path} and its .png")


if __name__ == "__main__":
    cli.run(main, "realtext.py")
