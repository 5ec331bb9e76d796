"""How well could any write-time gate do on a model? SP-KV's ceiling beside StreamingLLM and H2O.

    python experiments/ceiling.py --distill_seqs=32        # the shipped model, windows 32..256, densities 0.1, 0.25
    python experiments/ceiling.py --windows=32 --densities=0.05,0.1,0.25,0.5
    python experiments/ceiling.py --ckpt=ckpt/smollm2-135m-instruct.pt --draw_heldout=16 --windows=64 --distill_seqs=16

SP-KV's hard gate decides once, when a pair is written, whether the pair stays for every later
query. StreamingLLM keeps what is recent to each query, which no write-time decision can express
beyond the window. So before asking whether training finds good gates, this asks whether good
gates exist: on the shipped model's held-out sequences (models/stdlib_bytes_heldout.bin, the 16 x
1024 bytes of its bar; --draw_heldout=16 draws such rows from the val split instead, for a
model shipped without them, as convert.py's SmolLM2), at each window and density, the loss under
    full        plain causal attention
    window      the window alone
    streaming   StreamingLLM: 4 sinks + the most recent old keys, at the density
    h2o         H2O: heavy hitters by attention accumulated so far, at the density
    oracle_sum  the keep set of SP-KV's class chosen with hindsight (baselines.hindsight_visible):
                per sequence and KV head, the old keys full attention weighs most over the
                queries they are old to
    oracle_max  the same, ranked by the largest weight one query gives the key
    oracle_sink oracle_sum with the first 4 tokens kept first
    learned     (--distill_seqs=N) a write-time gate: SP-KV's own predictor (the same MLP, reading
                the same normalized input) fitted to the log of oracle_max's weight on N training
                sequences, the model frozen; then one tau, calibrated on training text to the
                density, as SP-KV deploys (spkv.calibrate)
all at the same final density of old pairs (learned: at the density its tau keeps on training
text; the held-out density is printed beside it). No gate that reads one token can beat the
oracle's choice by much; where the oracle loses to StreamingLLM, so will SP-KV on this model at
that window. Where the learned gate falls short of the oracle, the token alone does not tell what
the future will need; where it comes close, a gate that can be learned exists, and what stands
between it and SP-KV is the training signal.
Each figure is a deterministic eval (fp32, fixed sequences); the result is a new dated JSON in
--out/results, never merged into an earlier one. With --distill_seqs, each window's learned gates
are also saved as a checkpoint (--out/learned/learned_w<window>-<date>-<commit>.pt): the model with
its fitted predictors, their output bias shifted so that the default tau of 0.5 keeps
--save_density of old pairs on training text. mainflow.py --spkv_base=<it> adapts SP-KV from there.
--ship_gates=PATH (one window) writes the same predictors alone, a few hundred KB, as a gates file:
train.py --gates=PATH starts from them (models/stdlib_bytes_gates_w128.pt was made so:

    python experiments/ceiling.py --windows=128 --densities=0.25 --h2o=False --distill_seqs=32 \
        --ship_gates=models/stdlib_bytes_gates_w128.pt )
"""

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python experiments/<name>.py

import torch
import torch.nn.functional as F

import baselines
import cli
import data as datalib
import harness
import spkv
from checkpoint import load_model, save_checkpoint, save_gates

MODEL = os.path.join(harness.ROOT, "models", "stdlib_bytes.pt")
ORACLES = {"oracle_sum": dict(rank_by="sum"), "oracle_max": dict(rank_by="max"),
           "oracle_sink": dict(rank_by="sum", n_sink=harness.N_SINK)}


@dataclass
class Flags:
    ckpt: str = ""  # the dense model; "" = models/stdlib_bytes.pt
    heldout: str = ""  # its held-out sequences (a .bin of uint16 rows, shape in the model's .json); "" = the shipped ones
    draw_heldout: int = 0  # > 0: measure on this many --draw_len-token rows of --data's val split (harness.val_rows, 4 a batch) instead, for a model shipped without rows (convert.py's SmolLM2)
    draw_len: int = 1024  # tokens a drawn held-out row
    windows: str = "32,64,128,256"  # comma list
    densities: str = "0.1,0.25"  # comma list of kept fractions of old pairs
    batch_size: int = 4  # sequences a forward
    h2o: bool = False  # also H2O (a step-by-step loop: minutes a point; the model's .json holds its bar's H2O figures)
    distill_seqs: int = 0  # > 0: also the learned write-time gate, fitted on this many training sequences
    distill_steps: int = 400  # full-batch Adam steps of each layer's predictor fit
    data: str = ""  # the training text of the learned gate, as train.py's --data; "" = the stdlib source
    data_cache: str = ""  # where that text is tokenized; "" = data_cache/ beside train.py
    replot: str = ""  # draw the PNG of an earlier result JSON beside it (never over one) and measure nothing
    seed: int = 0  # the learned gate's training and calibration sequences, and its init
    save_density: float = 0.25  # each window's learned gates are saved (--out/learned/) shifted so that tau 0.5 keeps this
    ship_gates: str = ""  # with one window: also write its learned gates alone there (train.py --gates); never over a file
    threads: int = 2  # torch threads
    out: str = "out/ceiling"  # results/ceiling-<date>-<commit>.json


def policy(name: str, window: int, density: float):
    """visible(layer, q, k, logit) for one policy name at this window and density."""
    if name in ORACLES:
        return lambda layer, q, k, logit: baselines.hindsight_visible(q, k, window, density, **ORACLES[name])
    p = baselines.make_policy(name, window, tau=0.5, density=density)
    return lambda layer, q, k, logit: p(q, k, None)


def loss_of(model, rows: torch.Tensor, visible, batch_size: int) -> float:
    """Mean next-token loss over rows (N, T + 1), every layer attending through visible."""
    return harness.position_losses(model, rows, visible, batch_size).mean().item()


@torch.no_grad()
def oracle_targets(model, x: torch.Tensor, window: int) -> list:
    """Per layer, (inputs (N, d), targets (N, Hkv)): the attention's normalized input at every
    position that becomes old in a sequence of x (B, T), and the log of its hindsight weight
    (rank_by="max", floored at 1e-6), all under full attention."""
    inputs, weights, T = {}, {}, x.shape[1]
    hooks = [b.attn.register_forward_pre_hook(lambda m, args, layer=i: inputs.__setitem__(layer, args[0]))
             for i, b in enumerate(model.blocks)]

    def visible(layer, q, k, logit):
        weights[layer] = baselines.hindsight_weight(q, k, window, "max")  # (B, Hkv, T)
        return baselines.causal_visible(T, q.device)

    try:
        baselines.forward_with_masks(model, x, visible)
    finally:
        for h in hooks:
            h.remove()
    n_old = T - window  # positions 0 .. T - 1 - window become old
    return [(inputs[i][:, :n_old].reshape(-1, inputs[i].shape[-1]),  # (B * n_old, d)
             weights[i][:, :, :n_old].clamp_min(1e-6).log().transpose(1, 2).reshape(-1, weights[i].shape[1]))
            for i in range(len(model.blocks))]


def fit_predictors(model, train: datalib.Batches, window: int, n_seqs: int, steps: int, batch_size: int, seed: int):
    """Fit every layer's utility predictor (model weights frozen) to oracle_targets on n_seqs
    training sequences drawn with seed: mean squared error, full-batch Adam. Prints each layer's fit."""
    gen = torch.Generator().manual_seed(seed)
    parts = [oracle_targets(model, train.sample(min(batch_size, n_seqs - i), gen)[0], window)
             for i in range(0, n_seqs, batch_size)]
    for i, block in enumerate(model.blocks):
        x, y = (torch.cat([p[i][j] for p in parts]) for j in (0, 1))  # (N, d), (N, Hkv)
        pred = block.attn.predictor
        torch.manual_seed(seed + i)
        pred.reset_open()
        with torch.no_grad():
            pred.proj.bias.copy_(y.mean(0))
        opt = torch.optim.Adam(pred.parameters(), lr=3e-3)
        for _ in range(steps):
            loss = F.mse_loss(pred(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"  learned gate, layer {i}: MSE {loss.item():.3f} against the variance {y.var().item():.3f} "
              f"of log oracle weight, {x.shape[0]:,} positions", flush=True)


@torch.no_grad()
def learned_loss(model, rows, window: int, tau: float, batch_size: int) -> tuple:
    """(loss, held-out density) of the model's own gates at tau (hard), every layer."""
    kept = old = 0

    def visible(layer, q, k, logit):
        nonlocal kept, old
        k_, o_ = spkv.kept_counts(spkv.hard_keep(logit, tau), window)
        kept, old = kept + k_.sum().item(), old + o_.sum().item()
        return baselines.spkv_visible(logit, window, tau)

    return loss_of(model, rows, visible, batch_size), kept / max(old, 1)


@contextlib.contextmanager
def shifted_to_half(model, tau: float):
    """Within: every predictor's output bias moved by -logit(tau), so that tau 0.5 keeps what tau
    kept. The biases are put back after."""
    shift = torch.logit(torch.tensor(tau, dtype=torch.float64)).item()
    saved = [b.attn.predictor.proj.bias.detach().clone() for b in model.blocks]
    with torch.no_grad():
        for b in model.blocks:
            b.attn.predictor.proj.bias -= shift
    try:
        yield model
    finally:
        with torch.no_grad():
            for b, bias in zip(model.blocks, saved):
                b.attn.predictor.proj.bias.copy_(bias)


def save_learned(gated, tok, out: str, window: int, tau: float, density: float, ship_to: str = "") -> str:
    """The fitted gates as a checkpoint whose tau 0.5 keeps what tau keeps now (density of old
    pairs on training text), a new file in out/learned/; with ship_to, also as a gates file there
    (train.py --gates). Returns the checkpoint's path."""
    path = harness.new_result_path(os.path.join(out, "learned"), f"learned_w{window}", "pt")
    fitted = {"window": window, "density_on_training_text": density, "commit": harness.commit_stamp()}
    with shifted_to_half(gated, tau):
        save_checkpoint(path, gated, tok.spec, source="experiments/ceiling.py", learned_gates=fitted)
        if ship_to:
            save_gates(ship_to, gated, source="experiments/ceiling.py", fitted=fitted)
    return path


@dataclass
class LearnedGate:
    """What the learned write-time gate is fitted with, once per window."""
    model: object  # the dense model's weights with an SP-KV predictor in every layer, only those trainable
    tok: object  # its tokenizer, saved with the fitted gates
    train: datalib.Batches  # training text: the fit's and the calibration's sequences
    n_seqs: int  # sequences the fit reads
    steps: int  # full-batch Adam steps per layer
    out: str  # the fitted gates go to out/learned/
    save_density: float  # saved so that tau 0.5 keeps this fraction on training text
    seed: int  # the fit's and the calibration's sequences, and the fit's init
    ship_to: str  # also write the fitted gates there as a gates file (train.py --gates); "" = no


def measure(model, rows, windows, densities, batch_size, with_h2o, learned=None) -> list:
    """[{window, full, window_alone, points: [{density, policy: loss}]}], printed as it goes;
    learned: a LearnedGate to fit and measure at every window, or None."""
    full = loss_of(model, rows, policy("full", 1, 1.0), batch_size)
    names = ["streaming", *(["h2o"] if with_h2o else []), *ORACLES]
    pct = lambda v: f"{100 * (v / full - 1):+.2f}%"  # noqa: E731
    print(f"full attention {full:.4f} nats a token on {rows.shape[0]} x {rows.shape[1] - 1} held-out tokens")
    print(f"{'window':>6} {'density':>7} {'alone':>8} " + " ".join(f"{n:>11}" for n in names)
          + ("     learned (held-out density)" if learned else ""), flush=True)
    out = []
    for w in windows:
        alone = loss_of(model, rows, policy("window", w, 0.0), batch_size)
        if learned:
            g = learned
            g.model.retune(window=w)
            fit_predictors(g.model, g.train, w, g.n_seqs, g.steps, batch_size, g.seed)
            u = spkv.old_gate_values(g.model, g.train, 4, batch_size, torch.Generator().manual_seed(g.seed))  # (N,)
            tau = spkv.tau_for_density(u, g.save_density)  # spkv.calibrate's tau, from one pass a window
            print(f"  saved: {save_learned(g.model, g.tok, g.out, w, tau, g.save_density, g.ship_to)} "
                  f"(tau 0.5 keeps {g.save_density:g})" + (f" and the gates alone: {g.ship_to}" if g.ship_to else ""))
        points = []
        for d in densities:
            losses = {n: loss_of(model, rows, policy(n, w, d), batch_size) for n in names}
            line = f"{w:>6} {d:>7g} {pct(alone):>8} " + " ".join(f"{pct(losses[n]):>11}" for n in names)
            if learned:
                tau = spkv.tau_for_density(u, d) if d > 0 else 1.0
                losses["learned"], losses["learned_density"] = learned_loss(g.model, rows, w, tau, batch_size)
                losses["learned_tau"] = tau
                line += f" {pct(losses['learned']):>11} ({losses['learned_density']:.3f})"
            points.append({"density": d, **losses})
            print(line, flush=True)
        out.append({"window": w, "window_alone": alone, "points": points})
    print("(every % is over full attention on the same sequences)")
    return [{"full": full}, *out]


def plot(results: list, path: str):
    """Loss over full attention against density, one panel per window: StreamingLLM, H2O (where
    measured), the hindsight oracle (its best ranking), the learned write-time gate (where
    measured, at its held-out density) and the window alone."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full, rows = results[0]["full"], results[1:]
    rel = lambda v: 100 * (v / full - 1)  # noqa: E731
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.4), squeeze=False)
    for ax, r in zip(axes[0], rows):
        pts = r["points"]
        d = [p["density"] for p in pts]
        ax.plot(d, [rel(p["streaming"]) for p in pts], "^:", color="C8", label="StreamingLLM")
        if "h2o" in pts[0]:
            ax.plot(d, [rel(p["h2o"]) for p in pts], "s--", color="C7", label="H2O")
        ax.plot(d, [rel(min(p[n] for n in ORACLES)) for p in pts], "o-", color="C2", label="hindsight oracle (best)")
        if "learned" in pts[0]:
            ax.plot([p["learned_density"] for p in pts], [rel(p["learned"]) for p in pts], "D-", color="C0",
                    label="learned write-time gate")
        ax.axhline(rel(r["window_alone"]), color="C3", lw=1, ls="-.", label="window alone")
        ax.axhline(0, color="k", lw=0.8)
        ax.set(title=f"window {r['window']} (window alone {rel(r['window_alone']):+.1f}%)",
               xlabel="density (old pairs kept)", xscale="log", xticks=d,
               ylim=(min(-0.5, ax.get_ylim()[0]), 2 * max(rel(p["streaming"]) for p in pts) + 0.5))
        ax.set_xticklabels([f"{x:g}" for x in d])
        ax.minorticks_off()
    axes[0][0].set_ylabel("loss vs full attention (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def held_out_rows(ckpt: str, tok, o: dict) -> torch.Tensor:
    """(N, T + 1) the rows every figure is measured on: those shipped beside ckpt (or --heldout), or
    with --draw_heldout, rows drawn from --data's val split in the model's tokenizer tok. Says which."""
    if not o["draw_heldout"]:
        if not os.path.isfile(ckpt[:-len(".pt")] + ".json"):
            raise cli.BadInput(f"{ckpt} has no .json naming its held-out rows; give --draw_heldout=16 to draw "
                               "rows from --data's val split instead")
        rows = harness.heldout_rows(ckpt, o["heldout"])
        print(f"held-out rows: {rows.shape[0]} x {rows.shape[1] - 1} tokens shipped with {ckpt}")
        return rows
    folder = datalib.prepare(o["data"], tok, o["data_cache"] or datalib.DEFAULT_CACHE)
    rows = harness.val_rows(datalib.Batches(folder, "val", o["draw_len"]), o["draw_heldout"] // 4, 4)
    print(f"held-out rows: {rows.shape[0]} x {o['draw_len']} tokens drawn from the val split of "
          f"{o['data'] or 'the stdlib source'} (--draw_heldout)")
    return rows


def main(argv):
    given = cli.parse(argv, Flags, "ceiling.py")
    o = {**dataclasses.asdict(Flags()), **given}
    if o["replot"]:
        if not os.path.isfile(o["replot"]):
            raise cli.BadInput(f"--replot={o['replot']} does not exist; give a ceiling-*.json of an earlier run")
        png = o["replot"].removesuffix(".json") + ".png"
        if os.path.exists(png):
            raise cli.BadInput(f"{png} exists; move it away to draw it again")
        plot(harness.read_json(o["replot"])["results"], png)
        print(f"picture: {png}")
        return
    ckpt = o["ckpt"] or MODEL
    if not os.path.isfile(ckpt):
        raise cli.BadInput(f"--ckpt={ckpt} does not exist; give a dense checkpoint shipped with its held-out .bin")
    windows = cli.number_list("windows", o["windows"], int)
    densities = cli.number_list("densities", o["densities"], float)
    if (min(o["batch_size"], o["threads"], o["distill_steps"], *windows) < 1 or min(o["distill_seqs"], o["seed"]) < 0
            or not 0 < o["save_density"] < 1 or not all(0 <= d <= 1 for d in densities)):
        raise cli.BadInput("--batch_size, --threads and --distill_steps must be >= 1, --distill_seqs and --seed >= 0, "
                           "--save_density in (0, 1), --windows >= 1, --densities in [0, 1]")
    if o["draw_heldout"] % 4 or o["draw_heldout"] < 0 or o["draw_len"] < 2:
        raise cli.BadInput(f"--draw_heldout={o['draw_heldout']} must be a multiple of 4 (drawn 4 a batch), 0 for the "
                           f"shipped rows; --draw_len={o['draw_len']} at least 2")
    if o["ship_gates"] and (len(windows) != 1 or o["distill_seqs"] < 1):
        raise cli.BadInput("--ship_gates writes one window's learned gates: give one --windows and --distill_seqs >= 1")
    if o["ship_gates"] and os.path.exists(o["ship_gates"]):
        raise cli.BadInput(f"--ship_gates={o['ship_gates']} exists; move it away or give a new path")
    torch.set_num_threads(o["threads"])
    model, tok, _ = load_model(ckpt, dense=True)
    rows = held_out_rows(ckpt, tok, o)
    if max(windows) >= rows.shape[1] - 1:
        raise cli.BadInput(f"--windows: {max(windows)} is not below the sequence length {rows.shape[1] - 1}")
    model.eval()
    learned = None
    if o["distill_seqs"] > 0:
        torch.manual_seed(0)
        gated, tok, _ = load_model(ckpt, dense_layers=())  # the same weights, every layer with a predictor, fitted per window
        for p in gated.parameters():
            p.requires_grad_(False)
        for p in gated.predictor_parameters():
            p.requires_grad_(True)
        folder = datalib.prepare(o["data"], tok, o["data_cache"] or datalib.DEFAULT_CACHE)
        learned = LearnedGate(gated.eval(), tok, datalib.Batches(folder, "train", rows.shape[1] - 1), o["distill_seqs"],
                              o["distill_steps"], o["out"], o["save_density"], o["seed"], o["ship_gates"])
    t0 = time.time()
    results = measure(model, rows, windows, densities, o["batch_size"], o["h2o"], learned)
    path = harness.save_result(o["out"], "ceiling", {**o, "ckpt": ckpt}, results, t0)
    plot(results, path[:-len(".json")] + ".png")
    print(f"results: {path} and its .png")


if __name__ == "__main__":
    cli.run(main, "ceiling.py")
