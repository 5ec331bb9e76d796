"""Real text, a small Llama-shaped model, two CPU cores: does SP-KV prune at dense quality?

    python experiments/realtext.py                    # both flows and their table, ~50 min on 2 cores
    python experiments/realtext.py --eval_only=True   # re-measure finished runs (no training)
    python experiments/realtext.py --ablate=True      # the ablation: 11 SP-KV rows, 4 dense runs (see --ablate)
    python experiments/realtext.py --ablate=True --rows=lr20,wd10   # some rows only
    python experiments/realtext.py --smollm2=True     # SmolLM2-135M adapted vs dense, calibrated tau

Text nobody here wrote: the Python standard library source (train.py's default corpus, split by
file) and, as a second held-out domain, the licence texts under /usr/share/common-licenses.
Model: 4 layers, d=256, 4 query heads over 2 KV heads (GQA), RoPE, SmolLM2's tokenizer; context
1024 tokens with a window of 64, so most keys are old. Every run is train.py, with the paper's
open init (predictors start at u = 0.993) and next-token loss only:
  (a) from scratch: SP-KV and dense, the same steps and batches (150 x 4 x 1024 tokens);
  (b) the paper's main flow: the dense model of (a) is the pretrained model; SP-KV is adapted from
      it (gates open) and, as its baseline, the dense model is trained on for the same 60 steps.
One change from the paper's recipe: the predictor's learning rate. At x5 the gates need far more
steps than a CPU gives to travel from u = 0.993 to tau (the ablation's first row), so (a) uses x20
and (b), whose base rate is half of (a)'s, x100.
Then, on held-out text under hard gates: val loss and density of each SP-KV model, the dense
model's loss under full attention, H2O, StreamingLLM and the window alone at SP-KV's density
(baselines.py), SP-KV's tau sweep (tau.py), and one PNG of loss against density.
Seeds are fixed (train.py --seed, fixed eval batches); train.py runs with --threads torch threads
(OMP_NUM_THREADS). Finished runs are kept; a run folder made with other flags is refused.
The ablation table also measures each row at a calibrated tau: the tau that keeps --target_density
(0.25) of old pairs on training text, then hard loss and density on held-out text against the
row's dense run, with H2O and StreamingLLM on that dense model at the same density.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root: python experiments/<name>.py

import torch
import torch.nn.functional as F

import baselines
import harness
import cli
import data as datalib
import run
import spkv
import tau as taulib
from checkpoint import load_model
from spkv import calibrate

PROSE = "/usr/share/common-licenses"


@dataclass
class Flags:
    out: str = "out/realtext"  # one folder per run inside it
    scratch_steps: int = 150  # (a): steps of each from-scratch run
    adapt_steps: int = 60  # (b): steps of the adaptation and of the continued dense run
    eval_batches: int = 4  # held-out batches (of batch_size sequences) for every figure
    eval_only: bool = False  # skip training; measure the runs already in --out
    scratch_predictor_lr_mult: float = 20.0  # (a)'s predictor LR multiplier (paper: 5; why 20: the ablation)
    adapt_predictor_lr_mult: float = 100.0  # (b)'s: x100 of (b)'s 5e-4 is 5e-2 (the paper's x5 keeps every gate open)
    ablate: bool = False  # instead of the flows: the ablation rows and their table (20-40 min a row at 1 thread, 2-3 runs on 2 cores)
    rows: str = ""  # with --ablate: comma list of rows (see ablation_rows), e.g. lr20,wd10; with --smollm2: of recipes (SMOLLM2_RECIPES); "" = all
    target_density: float = 0.25  # --ablate / --smollm2: also measured at the tau that keeps this on training text
    smollm2: bool = False  # instead of the flows: SmolLM2-135M (--ckpt) adapted to SP-KV vs trained on densely
    smollm2_steps: int = 60  # --smollm2: steps of the adaptation and of the dense run
    threads: int = 2  # torch threads
    tiny: bool = False  # tests: a 2-layer d=32 model at 64 tokens, to check the plumbing in seconds
    data: str = ""  # training text, as train.py's --data; "" = the Python standard library source
    ckpt: str = ""  # where the tokenizer comes from, as train.py's --ckpt; "" = the embedded SmolLM2


SHAPES = {False: dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=2, seq_len=1024, window=64, batch_size=4),
          True: dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, seq_len=64, window=8, batch_size=2)}

# The ablation, in two blocks of from-scratch SP-KV runs. The first changes one knob of the paper's
# recipe (predictor LR x5, predictor weight decay 0.1, output bias 5): what makes gates close at
# all. The second changes one knob of the flows' recipe (predictor LR x20; window 64, context
# 1024): what sets how far they close. Then two controls: a model trained with every gate shut
# (bias -30: u = 1e-13, so old keys are masked in training too; a sliding-window model trained the
# same way), which says how much of SP-KV's lead over dense a local window alone gives; and the x20
# recipe at two more seeds, each against a dense run of its own seed (the spread). Steps are read
# off each run's evals (density at each).
def ablation_rows(o: dict) -> tuple:
    """(key -> (what the row changes, its train.py flags on top of scratch_flags, the dense run it is
    compared with), dense run -> its flags on top of scratch_flags). Only context changes the dense
    run."""
    shape = SHAPES[o["tiny"]]
    half_ctx = {"seq_len": shape["seq_len"] // 2, "batch_size": shape["batch_size"] * 2}  # same tokens a step
    x20 = {"predictor_lr_mult": 20}
    return {
        "paper": ("paper's recipe", {}, "scratch_dense"),
        "lr20": ("predictor LR x20", x20, "scratch_dense"),
        "lr50": ("predictor LR x50", {"predictor_lr_mult": 50}, "scratch_dense"),
        "wd10": ("predictor weight decay 10", {"predictor_weight_decay": 10}, "scratch_dense"),
        "bias2": ("init bias 2 (u = 0.88)", {"predictor_init_bias": 2}, "scratch_dense"),
        "window2x": (f"x20, window {2 * shape['window']}", {**x20, "window": 2 * shape["window"]}, "scratch_dense"),
        "ctx_half": (f"x20, context {half_ctx['seq_len']}, batch x2", {**x20, **half_ctx}, "dense_ctx_half"),
        "window_quarter": (f"x20, window {shape['window'] // 4}", {**x20, "window": shape["window"] // 4}, "scratch_dense"),
        "shut": ("init bias -30: gates shut", {"predictor_init_bias": -30}, "scratch_dense"),
        "seed2": ("x20, seed 1338", {**x20, "seed": 1338}, "dense_seed2"),
        "seed3": ("x20, seed 1339", {**x20, "seed": 1339}, "dense_seed3"),
    }, {"dense_ctx_half": half_ctx, "dense_seed2": {"seed": 1338}, "dense_seed3": {"seed": 1339}}


def argv(flags: dict) -> list:
    return [f"--{k}={v}" for k, v in flags.items()]


def scratch_flags(o: dict) -> dict:
    """train.py flags of a from-scratch run at the paper's recipe (no --predictor_* flag: train.py's
    defaults are the paper's)."""
    a = o["scratch_steps"]
    return {**SHAPES[o["tiny"]], "weight_decay": 0.1, "eval_every": 30, "eval_batches": 2, "ckpt_every": 30,
            "device": "cpu", "preset": "cpu", "data": o["data"], "ckpt": o["ckpt"], "init": "scratch",
            "lr": 1e-3, "warmup_steps": max(1, a // 10), "max_steps": a}


def runs(o: dict) -> dict:
    """name -> train.py flags of the two flows. The adaptation runs start from the dense scratch
    run's checkpoint."""
    b = o["adapt_steps"]
    scratch = scratch_flags(o)
    pretrained = os.path.join(o["out"], "scratch_dense", "ckpt.pt")
    adapt = {**scratch, "init": "pretrained", "ckpt": pretrained, "lr": 5e-4, "warmup_steps": max(1, b // 10),
             "max_steps": b}
    return {"scratch_dense": {**scratch, "dense": True},
            "scratch_spkv": {**scratch, "predictor_lr_mult": o["scratch_predictor_lr_mult"]},
            "adapt_dense": {**adapt, "dense": True},
            "adapt_spkv": {**adapt, "predictor_lr_mult": o["adapt_predictor_lr_mult"]}}


# A pretrained model that uses its old keys: SmolLM2-135M loses +162% to the window alone (64) and
# +3.9% to StreamingLLM at a quarter of them, on stdlib at 1024 tokens. SP-KV adaptations next to
# the same model trained on densely for the same steps, all with the predictor at x100 the base LR.
# Two start from open gates (bias 5): "x100" is the paper's recipe otherwise (weight decay 0.1); "wd10"
# adds predictor weight decay 10, which pulls the output bias toward u = 0.5 within ~30 steps (and
# shrinks the predictor's weights as fast). Each is measured at its trained tau and at the tau
# calibrated for --target_density. Two more start away from open gates, where the sigmoid is not
# saturated: at u = 0.993 the gate's slope u(1 - u) is 0.007, at bias 0 it is 0.25 and at bias -2
# 0.10, so the same loss gradient moves the predictor's logit 35x and 15x as far. "neutral" starts
# at u = 0.5, "closed" at u = 0.12 (old keys down-weighted by log u = -2.1 until the model opens them).
# The last two train the model under the cut it is measured at: "neutral" with train.py's
# --target_density (at the freeze, tau is reset to keep that fraction of old pairs, so the anneal
# and the hard steps see it), with the paper's frozen phase (the last 25% of the decay: 15 steps)
# and with half the decay frozen (30 steps, at a higher learning rate).
NEUTRAL = {"predictor_lr_mult": 100, "predictor_init_bias": 0.0}
SMOLLM2_RECIPES = {"x100": {"predictor_lr_mult": 100},
                   "wd10": {"predictor_lr_mult": 100, "predictor_weight_decay": 10},
                   "neutral": NEUTRAL,
                   "closed": {"predictor_lr_mult": 100, "predictor_init_bias": -2.0},
                   "neutral_cut": {**NEUTRAL, "target_density": 0.25},
                   "neutral_cut_long": {**NEUTRAL, "target_density": 0.25, "freeze_frac": 0.5}}


def smollm2_runs(o: dict) -> dict:
    shape = SHAPES[o["tiny"]]
    steps = o["smollm2_steps"]
    base = {"init": "pretrained", "ckpt": o["ckpt"], "data": o["data"], "device": "cpu", "preset": "cpu",
            "seq_len": shape["seq_len"], "window": shape["window"], "batch_size": 1, "lr": 1e-4,
            "warmup_steps": max(1, steps // 10), "max_steps": steps, "eval_every": 20, "eval_batches": 2,
            "ckpt_every": 20}
    return {"smollm2_dense": {**base, "dense": True},
            **{f"smollm2_spkv_{name}": {**base, **SMOLLM2_RECIPES[name]} for name in chosen_rows(o, SMOLLM2_RECIPES)}}


def chosen_rows(o: dict, rows: dict) -> list:
    """The ablation rows (or SmolLM2 recipes) --rows names (all when empty); an unknown one is refused."""
    keys = [k for k in o["rows"].split(",") if k] or list(rows)
    unknown = [k for k in keys if k not in rows]
    if unknown:
        raise cli.BadInput(f"--rows: unknown row {unknown[0]!r}; rows are {','.join(rows)}")
    return keys


def ablation_runs(o: dict) -> dict:
    """name -> train.py flags of the chosen ablation rows (--rows) and the dense runs they need."""
    rows, dense = ablation_rows(o)
    scratch = scratch_flags(o)
    plan = {}
    for key in chosen_rows(o, rows):
        _, over, dense_name = rows[key]
        plan[dense_name] = {**scratch, **dense.get(dense_name, {}), "dense": True}
        plan["ablate_" + key] = {**scratch, **over}
    return plan


def train(name: str, flags: dict, out: str, threads: int, eval_only: bool):
    """Run train.py for one run unless it already finished (final.json present)."""
    folder = os.path.join(out, name)
    if harness.finished(folder, flags):
        print(f"{name}: finished earlier, kept ({folder})")
        return
    if eval_only:
        raise cli.BadInput(f"--eval_only=True, but {folder} holds no finished run; drop --eval_only to train it")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *argv(flags), f"--out_dir={folder}"]
    if os.path.exists(os.path.join(folder, "ckpt.pt")):  # an interrupted run: continue it, never start over
        cmd.append("--resume=True")
    print(f"$ OMP_NUM_THREADS={threads} python train.py " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


BUDGETS = (0.1, 0.25, 0.5, 0.75)  # densities of the H2O / StreamingLLM budget sweep


@torch.no_grad()
def measure(spkv_path: str, dense_path: str, batches, n: int, bs: int) -> dict:
    """Hard-gate loss and density of the SP-KV model; the dense model under full attention and the
    post-hoc policies at SP-KV's density; SP-KV's tau sweep and the policies' budget sweep."""
    spkv_model, dense_model = load_model(spkv_path)[0].eval(), load_model(dense_path)[0].eval()
    tau = spkv_model.cfg.tau
    hard, density = taulib.hard_loss_and_density(spkv_model, batches, tau, n, bs)
    policies = baselines.policy_losses(dense_model, batches, ["full", "h2o", "streaming", "window"], density, n, bs)
    sweep = [(t, *taulib.hard_loss_and_density(spkv_model, batches, t, n, bs)) for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
    budgets = [{"density": d, **baselines.policy_losses(dense_model, batches, ["h2o", "streaming"], d, n, bs)}
               for d in BUDGETS]
    spkv_model.retune(tau=tau)
    gen = torch.Generator().manual_seed(1)  # the batches tau.hard_loss_and_density draws
    soft = sum(spkv_model(*batches.sample(bs, gen), a=0.0)[1].item() for _ in range(n)) / n
    return {"spkv_hard": hard, "spkv_soft": soft, "density": density, **policies,
            "tau_sweep": [{"tau": t, "loss": loss, "density": d} for t, loss, d in sweep], "budget_sweep": budgets}


def pct(loss: float, dense: float) -> str:
    """loss relative to the dense loss, as the tables print it."""
    return f"{100 * (loss / dense - 1):+.2f}%"


def table(results: dict):
    print(f"\n{'flow':<8} {'text':<7} {'density':>8} {'SP-KV hard':>11} {'dense':>8} {'SP-KV vs dense':>15} "
          f"{'H2O':>8} {'Stream':>8} {'window':>8}")
    for (flow, text), r in results.items():
        print(f"{flow:<8} {text:<7} {r['density']:>8.3f} {r['spkv_hard']:>11.4f} {r['full']:>8.4f} "
              + " ".join(f"{pct(r[k], r['full']):>{w}}" for k, w in
                         (("spkv_hard", 15), ("h2o", 8), ("streaming", 8), ("window", 8))))


def plot(results: dict, path: str):
    """Hard-gate loss against density: SP-KV's tau sweep, H2O and StreamingLLM on the dense model
    over budgets and at SP-KV's density, the window-only floor and the dense line, one panel per
    (flow, text)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), squeeze=False)
    for ax, ((flow, text), r) in zip(axes[0], results.items()):
        sweep = sorted(r["tau_sweep"], key=lambda s: s["density"])
        ax.plot([s["density"] for s in sweep], [s["loss"] for s in sweep], "o-", label="SP-KV, tau sweep")
        for name, mark, color in (("h2o", "s", "C1"), ("streaming", "^", "C2")):
            points = sorted([(b["density"], b[name]) for b in r["budget_sweep"]] + [(r["density"], r[name])])
            label = {"h2o": "H2O", "streaming": "StreamingLLM"}[name] + " (dense model)"
            ax.plot(*zip(*points), mark + "-", color=color, label=label)
        ax.plot([0], [r["window"]], "x", label="window only")
        ax.axhline(r["full"], color="k", lw=0.8, ls="--", label="dense, full attention")
        ax.set(title=f"{flow}, {text}", xlabel="density (old pairs kept)", ylabel="val loss (hard)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)  # atomic: an interrupted save leaves the old picture


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def final_eval(out: str, name: str) -> dict:
    return read_json(os.path.join(out, name, "final.json"))


def density_by_eval(out: str, name: str) -> list:
    """[(step, hard-gate density)] at each of the run's evals (log.jsonl)."""
    records, _ = run.steps_done(run.log_records(os.path.join(out, name, "log.jsonl")))
    return [(r["step"], r["density"]) for r in records if r is not None and "density" in r]


N_SINK = 4  # the sink diagnostic keeps this many first tokens, as StreamingLLM does


@torch.no_grad()
def sink_diagnostic(model, val, tau: float, n: int, bs: int) -> tuple:
    """A diagnostic, not the method: (the fraction of (sequence, layer, KV head) whose first token
    the gates keep at tau, the hard loss when the first N_SINK tokens are also kept in every head).
    Pretrained models park attention on the first tokens (attention sinks); a gate that drops them
    costs far more than their share of pairs. The same batches as tau.hard_loss_and_density."""
    gen = torch.Generator().manual_seed(1)
    first_kept, loss = [], 0.0

    def visible(layer, q, k, logit):  # logit (B, Hkv, T): SP-KV's hard view plus the first tokens
        first_kept.append(spkv.hard_keep(logit[..., 0], tau).float().flatten())
        vis = baselines.spkv_visible(logit, model.cfg.window, tau).clone()  # (B, Hkv, T, T)
        vis[..., :N_SINK] = True
        return vis & baselines.causal_visible(logit.shape[-1], logit.device)

    for _ in range(n):
        x, y = val.sample(bs, gen)
        logits = baselines.forward_with_masks(model, x, visible)
        loss += F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item() / n
    return torch.cat(first_kept).mean().item(), loss


@functools.lru_cache(maxsize=None)
@torch.no_grad()
def dense_reference(out: str, dense_run: str, window: int, T: int, bs: int, n: int, data: str) -> dict:
    """The dense run's held-out loss under full attention and under the window alone. They do not
    depend on the SP-KV run, so rows that share a dense run (and SmolLM2's two taus) measure them once."""
    dense_model, tok = load_model(os.path.join(out, dense_run, "ckpt.pt"), window=window)[:2]
    dense_model.eval()
    val = datalib.Batches(datalib.prepare(data, tok), "val", T)
    return baselines.policy_losses(dense_model, val, ["full", "window"], 0.0, n, bs)


@torch.no_grad()
def measured_at(o: dict, run: str, dense_run: str, target_density=None) -> dict:
    """The run's SP-KV model on held-out stdlib text (--eval_batches batches at the run's own context
    and batch size), at its trained tau, or with target_density at the tau that keeps that fraction
    of old pairs on training text (spkv.calibrate): hard loss and density, against its dense
    run under full attention, the window alone, and H2O and StreamingLLM on that dense model at the
    same density and window."""
    spkv_model, tok = load_model(os.path.join(o["out"], run, "ckpt.pt"))[:2]
    # the policies keep the same recent window as SP-KV
    dense_model = load_model(os.path.join(o["out"], dense_run, "ckpt.pt"), window=spkv_model.cfg.window)[0]
    spkv_model.eval(), dense_model.eval()
    saved = final_eval(o["out"], run)["train_config"]
    T, bs, n = saved["seq_len"], saved["batch_size"], o["eval_batches"]
    folder = datalib.prepare(o["data"], tok)
    train, val = datalib.Batches(folder, "train", T), datalib.Batches(folder, "val", T)
    tau = spkv_model.cfg.tau
    if target_density is not None:
        tau = calibrate(spkv_model, train, target_density, n, bs)  # on training text, checked held out
    hard, density = taulib.hard_loss_and_density(spkv_model, val, tau, n, bs)
    first_kept, with_sinks = sink_diagnostic(spkv_model, val, tau, n, bs)
    policies = baselines.policy_losses(dense_model, val, ["h2o", "streaming"], density, n, bs)
    reference = dense_reference(o["out"], dense_run, spkv_model.cfg.window, T, bs, n, o["data"])
    return {"tau": tau, "spkv_hard": hard, "density": density, "first_kept": first_kept,
            "spkv_with_sinks": with_sinks, **reference, **policies}


def print_against_dense(title: str, rows: list):
    """rows: [(label, measured_at's dict)], each relative to its dense run under full attention."""
    print(f"\n{title}\n{'':<28} {'tau':>7} {'density':>8} {'SP-KV hard':>10} {'dense':>8} {'vs dense':>9} "
          f"{'H2O':>8} {'Stream':>8} {'window':>8}   first token kept, SP-KV + {N_SINK} sinks")
    for label, c in rows:
        print(f"{label:<28} {c['tau']:>7.4f} {c['density']:>8.3f} {c['spkv_hard']:>10.4f} {c['full']:>8.4f} "
              + " ".join(f"{pct(c[k], c['full']):>{w}}" for k, w in
                         (("spkv_hard", 9), ("h2o", 8), ("streaming", 8), ("window", 8)))
              + f"   {c['first_kept']:.2f}, {pct(c['spkv_with_sinks'], c['full'])}")


def ablation_table(o: dict) -> list:
    """One row per knob: train.py's final eval (2 fixed held-out batches, hard gates) of the row's
    run against its dense run, the density per layer, and the density at each eval (steps); then
    the row at a calibrated tau (measured_at)."""
    rows, _ = ablation_rows(o)
    table = []
    print(f"\n{'ablation row':<28} {'density':>8} {'per layer':<24} {'SP-KV hard':>10} {'dense':>8} {'vs dense':>9}"
          "  density at each eval")
    for key in chosen_rows(o, rows):
        what, _, dense_name = rows[key]
        r, d = final_eval(o["out"], "ablate_" + key), final_eval(o["out"], dense_name)
        layers = [r["density_per_layer"][k] for k in sorted(r["density_per_layer"], key=int)]
        by_eval = density_by_eval(o["out"], "ablate_" + key)
        table.append({"row": key, "what": what, "density": r["density"], "per_layer": layers,
                      "spkv_hard": r["val_hard"], "dense": d["val_hard"], "vs_dense": r["val_hard"] / d["val_hard"] - 1,
                      "density_by_eval": by_eval,
                      "calibrated": measured_at(o, "ablate_" + key, dense_name, o["target_density"])})
        print(f"{what:<28} {r['density']:>8.3f} {' '.join(f'{x:.2f}' for x in layers):<24} "
              f"{r['val_hard']:>10.4f} {d['val_hard']:>8.4f} {100 * table[-1]['vs_dense']:>+8.2f}%  "
              + " ".join(f"{step}:{x:.2f}" for step, x in by_eval), flush=True)
    print_against_dense(f"held-out stdlib, tau calibrated on training text for density {o['target_density']}:",
                        [(row["what"], row["calibrated"]) for row in table])
    return table


def write_json(path: str, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)  # atomic: an interrupted write leaves the old file


def main(argv):
    o = dataclasses.asdict(Flags())
    o.update(cli.parse(argv, Flags, "realtext.py"))
    if not o["out"].strip():
        raise cli.BadInput("--out is empty; give the folder the runs go in (default out/realtext)")
    if min(o["scratch_steps"], o["adapt_steps"], o["smollm2_steps"], o["eval_batches"], o["threads"]) < 1:
        raise cli.BadInput("--scratch_steps, --adapt_steps, --smollm2_steps, --eval_batches and --threads must be >= 1")
    if not 0 < o["target_density"] <= 1:
        raise cli.BadInput(f"--target_density={o['target_density']} must be in (0, 1] (the fraction of old pairs kept)")
    for k in ("scratch_predictor_lr_mult", "adapt_predictor_lr_mult"):
        if not 0 < o[k] < 1e4:
            raise cli.BadInput(f"--{k}={o[k]} must be a number in (0, 1e4) (the paper's is 5)")
    torch.set_num_threads(o["threads"])
    dense_reference.cache_clear()  # a run folder may have changed since an earlier call in this process
    if o["ablate"] and o["smollm2"]:
        raise cli.BadInput("--ablate and --smollm2 are two different experiments; give one of them")
    plan = ablation_runs(o) if o["ablate"] else smollm2_runs(o) if o["smollm2"] else runs(o)
    for name, flags in plan.items():
        train(name, flags, o["out"], o["threads"], o["eval_only"])
    if o["smollm2"]:
        chosen = chosen_rows(o, SMOLLM2_RECIPES)
        result = {name: {"trained": measured_at(o, f"smollm2_spkv_{name}", "smollm2_dense"),
                         "calibrated": measured_at(o, f"smollm2_spkv_{name}", "smollm2_dense", o["target_density"]),
                         "density_per_layer": final_eval(o["out"], f"smollm2_spkv_{name}")["density_per_layer"]}
                  for name in chosen}
        print_against_dense("SmolLM2-135M adapted, held-out stdlib:",
                            [(f"{name}, {label}", result[name][key]) for name in chosen
                             for key, label in (("trained", "tau as trained"),
                                                ("calibrated", f"tau for density {o['target_density']}"))])
        path = os.path.join(o["out"], "smollm2.json")  # recipes measured now replace their old entries only
        old = read_json(path) if os.path.exists(path) else {}
        write_json(path, {name: result.get(name, old.get(name)) for name in SMOLLM2_RECIPES
                          if name in result or name in old})
        print(f"\nwrote {o['out']}/smollm2.json")
        return
    if o["ablate"]:  # rows measured now replace their old entries; rows not chosen this time are kept
        path = os.path.join(o["out"], "ablation.json")
        new = ablation_table(o)
        old = read_json(path) if os.path.exists(path) else []
        fresh = {r["row"] for r in new}
        order = list(ablation_rows(o)[0])
        write_json(path, sorted([r for r in old if r["row"] not in fresh] + new, key=lambda r: order.index(r["row"]) if r["row"] in order else len(order)))
        print(f"\nwrote {o['out']}/ablation.json")
        return
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
    write_json(os.path.join(o["out"], "results.json"), {f"{k[0]}/{k[1]}": v for k, v in results.items()})
    plot(results, os.path.join(o["out"], "loss_vs_density.png"))
    print(f"\nwrote {o['out']}/results.json and {o['out']}/loss_vs_density.png")


if __name__ == "__main__":
    cli.run(main, "realtext.py")
