"""Real text, a small Llama-shaped model, two CPU cores: does SP-KV prune at dense quality?

    python experiments/realtext.py                      # the whole flow and its table, ~35 min on 2 cores (150 + 150 + 60 + 60 steps of 4 x 1024 tokens)
    python experiments/realtext.py --eval_only=True     # re-measure finished runs (no training)

Text nobody here wrote: the Python standard library source (train.py's default corpus, split by
file) and, as a second held-out domain, the licence texts under /usr/share/common-licenses.
Model: 4 layers, d=256, 4 query heads over 2 KV heads (GQA), RoPE, SmolLM2's tokenizer; context
1024 tokens with a window of 64, so most keys are old. Every run is train.py, with the paper's
open init (predictors start at u = 0.993) and next-token loss only:
  (a) from scratch: SP-KV and dense, the same steps and batches;
  (b) the paper's main flow: the dense model of (a) is the pretrained model; SP-KV is adapted from
      it (gates open) and, as its baseline, the dense model is trained on for the same steps.
Then, on held-out text under hard gates: val loss and density of each SP-KV model, the dense
model's loss under full attention, H2O, StreamingLLM and the window alone at SP-KV's density
(baselines.py), SP-KV's tau sweep (tau.py), and one PNG of loss against density.
Seeds are fixed (train.py --seed, fixed eval batches); torch uses 2 threads.
"""

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python experiments/<name>.py

import torch

import baselines
import cli
import data as datalib
import tau as taulib
from checkpoint import load_model

PROSE = "/usr/share/common-licenses"


@dataclass
class Flags:
    out: str = "out/realtext"  # one folder per run inside it
    scratch_steps: int = 150  # (a): steps of each from-scratch run
    adapt_steps: int = 60  # (b): steps of the adaptation and of the continued dense run
    eval_batches: int = 4  # held-out batches (of batch_size sequences) for every figure
    eval_only: bool = False  # skip training; measure the runs already in --out
    threads: int = 2  # torch threads
    tiny: bool = False  # tests: a 2-layer d=32 model at 64 tokens, to check the plumbing in seconds
    data: str = ""  # training text, as train.py's --data; "" = the Python standard library source
    ckpt: str = ""  # where the tokenizer comes from, as train.py's --ckpt; "" = the embedded SmolLM2


SHAPES = {False: dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=2, seq_len=1024, window=64, batch_size=4),
          True: dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, seq_len=64, window=8, batch_size=2)}


def runs(o: dict) -> dict:
    """name -> train.py flags. The adaptation runs start from the dense scratch run's checkpoint."""
    out, a, b = o["out"], o["scratch_steps"], o["adapt_steps"]
    common = [f"--{k}={v}" for k, v in SHAPES[o["tiny"]].items()] + [
        "--weight_decay=0.1", "--eval_every=30", "--eval_batches=2", "--ckpt_every=30", "--device=cpu", "--preset=cpu",
        f"--data={o['data']}"]
    scratch = common + [f"--ckpt={o['ckpt']}", "--init=scratch", "--lr=1e-3", f"--warmup_steps={max(1, a // 10)}", f"--max_steps={a}"]
    pretrained = os.path.join(out, "scratch_dense", "ckpt.pt")
    adapt = common + ["--init=pretrained", f"--ckpt={pretrained}", "--lr=5e-4", f"--warmup_steps={max(1, b // 10)}", f"--max_steps={b}"]
    return {"scratch_dense": scratch + ["--dense=True"], "scratch_spkv": scratch,
            "adapt_dense": adapt + ["--dense=True"], "adapt_spkv": adapt}


def train(name: str, flags: list, out: str):
    """Run train.py for one run unless it already finished (final.json present)."""
    folder = os.path.join(out, name)
    if os.path.exists(os.path.join(folder, "final.json")):
        print(f"{name}: finished earlier, kept ({folder})")
        return
    cmd = [sys.executable, "train.py", *flags, f"--out_dir={folder}"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


@torch.no_grad()
def measure(spkv_path: str, dense_path: str, batches, n: int, bs: int) -> dict:
    """Hard-gate loss and density of the SP-KV model; the dense model under full attention and the
    post-hoc policies at SP-KV's density; the tau sweep."""
    spkv_model, dense_model = load_model(spkv_path)[0].eval(), load_model(dense_path)[0].eval()
    tau = spkv_model.cfg.tau
    hard, density = taulib.hard_loss_and_density(spkv_model, batches, tau, n, bs)
    policies = baselines.policy_losses(dense_model, batches, ["full", "h2o", "streaming", "window"], density, n, bs)
    sweep = [(t, *taulib.hard_loss_and_density(spkv_model, batches, t, n, bs)) for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
    spkv_model.cfg.tau = tau
    gen = torch.Generator().manual_seed(1)  # the batches tau.hard_loss_and_density draws
    soft = sum(spkv_model(*batches.sample(bs, gen), a=0.0)[1].item() for _ in range(n)) / n
    return {"spkv_hard": hard, "spkv_soft": soft, "density": density, **policies,
            "tau_sweep": [{"tau": t, "loss": loss, "density": d} for t, loss, d in sweep]}


def table(results: dict):
    print(f"\n{'flow':<8} {'text':<7} {'density':>8} {'SP-KV hard':>11} {'dense':>8} {'SP-KV vs dense':>15} "
          f"{'H2O':>8} {'Stream':>8} {'window':>8}")
    for (flow, text), r in results.items():
        pct = lambda x: f"{100 * (x / r['full'] - 1):+.2f}%"  # noqa: E731
        print(f"{flow:<8} {text:<7} {r['density']:>8.3f} {r['spkv_hard']:>11.4f} {r['full']:>8.4f} "
              f"{pct(r['spkv_hard']):>15} {pct(r['h2o']):>8} {pct(r['streaming']):>8} {pct(r['window']):>8}")


def plot(results: dict, path: str):
    """Hard-gate loss against density: SP-KV's tau sweep, the baselines at SP-KV's density, the
    window-only floor and the dense line, one panel per (flow, text)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), squeeze=False)
    for ax, ((flow, text), r) in zip(axes[0], results.items()):
        sweep = sorted(r["tau_sweep"], key=lambda s: s["density"])
        ax.plot([s["density"] for s in sweep], [s["loss"] for s in sweep], "o-", label="SP-KV, tau sweep")
        ax.plot([r["density"]], [r["h2o"]], "s", label="H2O (dense model)")
        ax.plot([r["density"]], [r["streaming"]], "^", label="StreamingLLM (dense model)")
        ax.plot([0], [r["window"]], "x", label="window only")
        ax.axhline(r["full"], color="k", lw=0.8, ls="--", label="dense, full attention")
        ax.set(title=f"{flow}, {text}", xlabel="density (old pairs kept)", ylabel="val loss (hard)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)  # atomic: an interrupted save leaves the old picture


def main(argv):
    o = dataclasses.asdict(Flags())
    o.update(cli.parse(argv, Flags, "realtext.py"))
    if min(o["scratch_steps"], o["adapt_steps"], o["eval_batches"], o["threads"]) < 1:
        raise cli.BadInput("--scratch_steps, --adapt_steps, --eval_batches and --threads must be >= 1")
    torch.set_num_threads(o["threads"])
    plan = runs(o)
    if not o["eval_only"]:
        for name, flags in plan.items():
            train(name, flags, o["out"])
    tok = load_model(os.path.join(o["out"], "scratch_dense", "ckpt.pt"))[1]
    T = SHAPES[o["tiny"]]["seq_len"]
    texts = {"stdlib": datalib.Batches(datalib.prepare(o["data"], tok), "val", T),
             "prose": datalib.Batches(datalib.prepare(PROSE, tok), "train", T)}
    results = {}
    for flow in ("scratch", "adapt"):
        for text, batches in texts.items():
            results[(flow, text)] = measure(os.path.join(o["out"], f"{flow}_spkv", "ckpt.pt"),
                                            os.path.join(o["out"], f"{flow}_dense", "ckpt.pt"), batches,
                                            o["eval_batches"], SHAPES[o["tiny"]]["batch_size"])
    table(results)
    with open(os.path.join(o["out"], "results.json.tmp"), "w") as f:
        json.dump({f"{k[0]}/{k[1]}": v for k, v in results.items()}, f, indent=1)
    os.replace(os.path.join(o["out"], "results.json.tmp"), os.path.join(o["out"], "results.json"))
    plot(results, os.path.join(o["out"], "loss_vs_density.png"))
    print(f"\nwrote {o['out']}/results.json and {o['out']}/loss_vs_density.png")


if __name__ == "__main__":
    cli.run(main, "realtext.py")
