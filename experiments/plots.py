"""Pictures of what an SP-KV checkpoint keeps, written as PNG files by one command.

    python experiments/plots.py --ckpt=out/spkv/ckpt.pt [--data=PATH] [--out=out/plots] [--batches=4 --batch_size=2]

  density_heatmap.png  density per layer x KV head (hard gates, held-out text)
  kept_tokens.png      a text, one row per layer: each token shaded by how many of that layer's
                       KV heads keep it once it leaves the window
  tau_sweep.png        density and hard-gate val loss against tau, side by side (tau.py's sweep: the same
                       --batches and --batch_size give its figures)
A picture already in --out is never replaced: the run is refused before any work, naming it (and
each file is created exclusively, so a second run at the same moment cannot replace one either).
Needs matplotlib (`pip install matplotlib`), used only here.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python experiments/<name>.py

import torch

import cli
import data as datalib
import spkv
import tau as taulib
from checkpoint import load_model
from weights import default_checkpoint


def plt_module():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots.py needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    return plt


PICTURES = ("density_heatmap.png", "kept_tokens.png", "tau_sweep.png")


def refuse_existing(out: str):
    """Refuse an --out that already holds one of the pictures: they are an earlier run's results."""
    for name in PICTURES:
        if os.path.exists(os.path.join(out, name)):
            raise cli.BadInput(f"{os.path.join(out, name)} already exists; move it away, or give another --out "
                               "(plots.py never replaces a picture)")


def save_new(fig, path):
    """fig as a PNG at path, a file created here: one that appeared meanwhile is refused, not replaced."""
    try:
        with open(path, "xb") as f:
            fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    except FileExistsError:
        raise cli.BadInput(f"{path} appeared while plots.py ran (another run into the same --out?); "
                           "it is kept, give another --out") from None


@torch.no_grad()
def keep_masks(model, x):
    """Hard keep flags per SP-KV layer for a batch x: {layer: (B, Hkv, T) bool}."""
    gates = []
    model(x, a=1.0, gates=gates)
    return {layer: spkv.hard_keep(g, model.cfg.tau) for layer, g in zip(model.cfg.spkv_layers(), gates)}


def density_heatmap(plt, model, batches, path, n_batches=4, batch_size=2):
    gen = torch.Generator().manual_seed(0)
    keeps = {}
    for _ in range(n_batches):
        for layer, k in keep_masks(model, batches.sample(batch_size, gen)[0]).items():
            keeps.setdefault(layer, []).append(k)
    stats = spkv.density_stats({k: torch.cat(v) for k, v in keeps.items()}, model.cfg.window)
    grid = torch.tensor([stats["per_head"][layer] for layer in sorted(stats["per_head"])])  # (L, Hkv)
    fig, ax = plt.subplots(figsize=(2 + grid.shape[1], 1 + 0.25 * grid.shape[0]))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set(xlabel="KV head", ylabel="layer", title=f"kept fraction of old pairs (overall {stats['overall']:.3f})",
           xticks=range(grid.shape[1]), yticks=range(grid.shape[0]))
    if grid.numel() <= 64:  # small grids: write each cell's value in it
        for layer, row in enumerate(grid.tolist()):
            for head, d in enumerate(row):
                ax.text(head, layer, f"{d:.2f}", ha="center", va="center", color="white" if d < 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax)
    save_new(fig, path)
    plt.close(fig)
    return grid


def token_label(tok, i: int) -> str:
    """A token as printable text; a token that is not whole UTF-8 by itself shows as <id>."""
    text = tok.decode([i])
    return f"<{i}>" if "\ufffd" in text else text.replace("\n", "\\n")


def labelled_positions(grid, max_labels=64) -> list:
    """The positions whose text kept_tokens writes: those some layer keeps (in at least one KV
    head), every k-th of them when there are more than max_labels, so that labels never crowd."""
    kept = (grid > 0).any(0).nonzero().flatten().tolist()
    return kept[:: -(-len(kept) // max_labels)] if kept else []


def kept_tokens_figure(plt, grid, labels):
    """grid (L, T): the fraction of each layer's KV heads keeping each token. Token positions below
    (every 16th), the text of the kept tokens above, and a colour bar for the shade."""
    L, T = grid.shape
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.06 * T + 2), 16), 1.6 + 0.3 * L))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="Greens", aspect="auto", interpolation="nearest")
    ax.set(xlabel="token position", ylabel="layer", xticks=range(0, T, 16), yticks=range(L),
           title="which tokens each layer keeps once they leave the window")
    top = ax.secondary_xaxis("top")
    shown = labelled_positions(grid)
    top.set_xticks(shown, [labels[t] for t in shown], rotation=90, fontsize=9, family="monospace")
    top.set_xlabel("text of the kept tokens")
    fig.colorbar(im, ax=ax, label="share of KV heads keeping it", fraction=0.03, pad=0.01)
    return fig


def kept_tokens(plt, model, tok, ids, path):
    """Rows = layers, columns = tokens; shade = fraction of KV heads keeping the token."""
    masks = keep_masks(model, torch.tensor(ids)[None])
    grid = torch.stack([m[0].float().mean(0) for m in masks.values()])  # (L, T)
    fig = kept_tokens_figure(plt, grid, [token_label(tok, i) for i in ids])
    save_new(fig, path)
    plt.close(fig)
    return grid


def tau_sweep_figure(plt, taus, rows, plain=None):
    """Two panels side by side: density against tau, and hard-gate val loss against tau (with the
    plain-attention loss of the same weights as a dashed line, where given)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(taus, [d for _, d in rows], "o-", color="tab:green")
    left.set(xlabel="tau", ylabel="density (old pairs kept)", ylim=(-0.03, 1.03), title="density")
    right.plot(taus, [loss for loss, _ in rows], "s-", color="tab:blue", label="SP-KV, hard gates")
    if plain is not None:
        right.axhline(plain, color="k", lw=0.8, ls="--", label="plain attention, same weights")
        right.legend(fontsize=8)
    right.set(xlabel="tau", ylabel="val loss", title="hard-gate val loss")
    fig.tight_layout()
    return fig


def tau_sweep(plt, model, batches, path, taus=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), n_batches=2,
              batch_size=2, plain=None):
    """[(hard val loss, density)] per tau (tau.py's sweep, on the same batches for the same sizes),
    drawn as tau_sweep_figure into path."""
    rows = [taulib.hard_loss_and_density(model, batches, t, n_batches=n_batches, batch_size=batch_size)
            for t in taus]
    fig = tau_sweep_figure(plt, taus, rows, plain)
    save_new(fig, path)
    plt.close(fig)
    return rows


@dataclass
class Flags:
    ckpt: str = ""  # SP-KV checkpoint; "" = the embedded SmolLM2-135M
    data: str = ""  # as train.py's --data; "" = Python stdlib source
    out: str = "out/plots"  # folder the three PNGs are written to (refused if it holds one already)
    seq_len: int = 512  # tokens per sequence
    batches: int = 4  # held-out batches of the tau sweep, as tau.py's --batches (the same flags give its figures)
    batch_size: int = 2  # sequences per batch of the tau sweep, as tau.py's --batch_size


def main(argv):
    o = dataclasses.asdict(Flags())
    o.update(cli.parse(argv, Flags, "plots.py"))
    if min(o["batches"], o["batch_size"]) < 1:
        raise cli.BadInput("--batches and --batch_size must be >= 1")
    refuse_existing(o["out"])
    plt = plt_module()
    model, tok, _ = load_model(o["ckpt"] or default_checkpoint())
    model.eval()
    if o["seq_len"] > model.cfg.block_size:
        raise cli.BadInput(f"--seq_len={o['seq_len']} is beyond the model's context of {model.cfg.block_size}; give "
                           f"--seq_len <= {model.cfg.block_size}")
    folder = datalib.prepare(o["data"], tok)
    val = taulib.windows(folder, "val", o["seq_len"])  # at sequence starts on the synthetic task's data
    os.makedirs(o["out"], exist_ok=True)
    heatmap, kept, sweep = (os.path.join(o["out"], name) for name in PICTURES)
    density_heatmap(plt, model, val, heatmap)
    ids = val.sample(1, torch.Generator().manual_seed(2))[0][0].tolist()
    kept_tokens(plt, model, tok, ids[: min(len(ids), 160 + model.cfg.window)], kept)
    plain = taulib.plain_loss(o["ckpt"] or default_checkpoint(), val, o["batches"], o["batch_size"])
    tau_sweep(plt, model, val, sweep, n_batches=o["batches"], batch_size=o["batch_size"], plain=plain)
    print(f"plots: wrote {', '.join(PICTURES)} to {o['out']}")


if __name__ == "__main__":
    cli.run(main, "plots.py")
