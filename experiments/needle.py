"""The needle-in-a-haystack test: a fact planted in held-out text and asked for later, under SP-KV,
H2O, StreamingLLM and the window alone at equal density.

    python experiments/needle.py --dense=<dense model> --spkv=<SP-KV checkpoint>
    python experiments/needle.py --dense=<dense model>       # the dense policies alone, at --densities

Haystacks are held-out rows of plain stdlib source (the bar's rows shipped beside --dense, or
beside models/stdlib_bytes.pt where --dense is a run's checkpoint; or --heldout). In each, a fact line (harness.fact_line:
"\\n# <key>: <value>\\n", a random key and an 8-byte random value) is planted so that --depths
bytes of haystack text lie between it and the same line said again at the row's end; only the
first saying predicts the second's value. --per_row needles per row and depth, each a new fact;
fixed by --seed. Measured on the second saying's value bytes, teacher-forced: the loss in nats a
byte (a guess costs ln 36 = 3.58), and retrieval, the share of needles whose every value byte is
the model's top choice.

The policies, each a mask over the same forward (baselines.forward_with_masks):
    full        the dense model, plain causal attention
    window      the dense model, the local window alone
    spkv@tau    the SP-KV model under hard gates at each tau of --taus; its density (the kept
                fraction of old pairs, spkv.density_stats) measured on these haystacks, from the
                gates of that tau's forward
    streaming   the dense model, 4 sinks + the most recent old keys, at SP-KV's density
    h2o         the dense model, heavy hitters, at SP-KV's density
Without --spkv, StreamingLLM and H2O run at each of --densities. For SP-KV also "value kept": the
share of (needle, layer, KV head) whose gates keep all of the first saying's value bytes.
Deterministic (fp32, fixed rows and facts); the result is a new dated JSON in --out/results, with
its PNG (retrieval against density, a panel per depth) beside it.
"""

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python experiments/<name>.py

import numpy as np
import torch
import torch.nn.functional as F

import baselines
import cli
import harness
import spkv
from checkpoint import load_model

MODEL = os.path.join(harness.ROOT, "models", "stdlib_bytes.pt")


@dataclass
class Flags:
    dense: str = ""  # the dense model the post-hoc policies run on; "" = models/stdlib_bytes.pt
    spkv: str = ""  # an SP-KV checkpoint (its gates and window); "" = the dense policies alone
    window: int = 128  # the local window of every policy, when no --spkv brings its own
    heldout: str = ""  # a .bin of uint16 rows shaped as models/stdlib_bytes.json says; "" = the bar's rows
    depths: str = "256,512,768"  # comma list: bytes of haystack text between the fact and its second saying
    per_row: int = 2  # needles per held-out row at each depth
    taus: str = "0.5,0.9,0.98"  # SP-KV's hard-gate thresholds
    densities: str = "0.05,0.1,0.25"  # StreamingLLM's and H2O's budgets when there is no --spkv
    batch_size: int = 8  # haystacks a forward
    seed: int = 0  # the facts
    threads: int = 2  # torch threads
    out: str = "out/needle"  # results/needle-<date>-<commit>.json


def haystacks(rows: torch.Tensor, depth: int, per_row: int, rng: np.random.Generator) -> tuple:
    """(seqs (N, T + 1), first (N,), second (N,)): each row of rows (R, T + 1) per_row times, with a
    fact line planted `depth` tokens of the row before the same line again, which ends the sequence;
    first and second are where the value of each saying starts (N = R * per_row)."""
    seqs, first, second = [], [], []
    T1 = rows.shape[1]
    for row in rows.numpy():
        for _ in range(per_row):
            line, at = harness.fact_line(rng)
            a = T1 - 2 * len(line) - depth  # where the first saying goes
            seqs.append(np.concatenate([row[:a], line, row[a:a + depth], line]).astype(np.int64))
            first.append(a + at)
            second.append(a + len(line) + depth + at)
    return torch.from_numpy(np.stack(seqs)), torch.tensor(first), torch.tensor(second)


@torch.no_grad()
def value_scores(model, seqs: torch.Tensor, second: torch.Tensor, visible, batch_size: int) -> dict:
    """{"loss": nats a byte on the second saying's value, "retrieved": share of needles whose value
    bytes are all the top choice}, every layer attending through visible(layer, q, k, logit)."""
    n = harness.FACT_VALUE
    losses, hits = [], []
    for i in range(0, seqs.shape[0], batch_size):
        x = seqs[i:i + batch_size]  # (b, T + 1)
        logits = baselines.forward_with_masks(model, x[:, :-1], visible)  # (b, T, V)
        at = second[i:i + batch_size, None] - 1 + torch.arange(n)  # (b, n) the positions predicting the value
        pred = logits.float().gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))  # (b, n, V)
        target = x.gather(1, at + 1)  # (b, n)
        losses.append(F.cross_entropy(pred.transpose(1, 2), target, reduction="none").mean(1))
        hits.append((pred.argmax(-1) == target).all(1).float())
    return {"loss": torch.cat(losses).mean().item(), "retrieved": torch.cat(hits).mean().item()}


def gate_stats(logits: dict, first: torch.Tensor, tau: float, window: int) -> dict:
    """SP-KV's hard gates at tau on the haystacks, from the gate logits {layer: [(b, Hkv, T) per
    batch]} of the forward at that tau: density (the kept fraction of old pairs) and the share of
    (needle, layer, KV head) that keep every byte of the first saying's value."""
    keeps = {layer: spkv.hard_keep(torch.cat(g), tau) for layer, g in logits.items()}  # each (N, Hkv, T)
    at = first[:, None, None] + torch.arange(harness.FACT_VALUE)  # (N, 1, n)
    value_kept = [k.gather(-1, at.expand(-1, k.shape[1], -1)).all(-1).float().flatten() for k in keeps.values()]
    return {"density": spkv.density_stats(keeps, window)["overall"], "value_kept": torch.cat(value_kept).mean().item()}


def measure_depth(dense, trained, seqs, first, second, o: dict, taus, densities) -> list:
    """[{policy, tau, density, loss, retrieved, value_kept}] at one depth."""
    T, window = seqs.shape[1] - 1, dense.cfg.window
    score = lambda model, mask: value_scores(model, seqs, second, mask, o["batch_size"])  # noqa: E731
    out = [{"policy": "full", **score(dense, lambda layer, q, k, logit: baselines.causal_visible(T))},
           {"policy": "window", **score(dense, lambda layer, q, k, logit: baselines.window_visible(T, window))}]
    points = []
    for tau in taus:
        logits = {}  # {layer: [(b, Hkv, T)]}: the gates of this tau's own forward (a layer's input depends on tau)

        def mask(layer, q, k, logit, tau=tau, logits=logits):
            if logit is not None:  # a dense layer has no gates
                logits.setdefault(layer, []).append(logit)
            return baselines.spkv_visible(logit, window, tau)
        scores = score(trained, mask)
        stats = gate_stats(logits, first, tau, window)
        out.append({"policy": "spkv", "tau": tau, **stats, **scores})
        points.append(stats["density"])
    for density in points or densities:
        for name in ("streaming", "h2o"):
            policy = baselines.make_policy(name, window, 0.5, density)
            out.append({"policy": name, "density": density,
                        **score(dense, lambda layer, q, k, logit, p=policy: p(q, k, logit))})
    return out


def print_depth(depth: int, rows: list):
    print(f"\ndepth {depth} bytes: the value's loss (nats a byte) / retrieved")
    for r in rows:
        label = r["policy"] + (f"@{r['tau']:g}" if "tau" in r else "")
        density = f"density {r['density']:.3f}" if "density" in r else ""
        kept = f"value kept {r['value_kept']:.2f}" if "value_kept" in r else ""
        print(f"  {label:<12} {density:<15} {r['loss']:6.3f} / {r['retrieved']:.2f}   {kept}", flush=True)


def plot(results: dict, path: str):
    """Retrieval against density, one panel per depth: SP-KV's tau sweep, StreamingLLM and H2O at
    its densities, full attention and the window alone as lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (depth, rows) in zip(axes[0], results.items()):
        for name, style in (("spkv", "o-"), ("streaming", "^:"), ("h2o", "s--")):
            pts = sorted((r["density"], r["retrieved"]) for r in rows if r["policy"] == name)
            if pts:
                ax.plot(*zip(*pts), style, label={"spkv": "SP-KV", "streaming": "StreamingLLM", "h2o": "H2O"}[name])
        for name, color in (("full", "k"), ("window", "C3")):
            ax.axhline(next(r["retrieved"] for r in rows if r["policy"] == name), color=color, lw=1, ls="-.",
                       label="full attention" if name == "full" else "window alone")
        ax.set(title=f"fact {depth} bytes back", xlabel="density (fraction of old KV pairs kept)",
               ylabel="needles retrieved", ylim=(-0.03, 1.03))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv):
    o = {**dataclasses.asdict(Flags()), **cli.parse(argv, Flags, "needle.py")}
    dense_path = o["dense"] or MODEL
    for flag, path in (("dense", dense_path), ("spkv", o["spkv"])):
        if path and not os.path.isfile(path):
            raise cli.BadInput(f"--{flag}={path} does not exist; give a checkpoint")
    depths = cli.number_list("depths", o["depths"], int)
    taus = cli.number_list("taus", o["taus"], float)
    densities = cli.number_list("densities", o["densities"], float)
    if min(o["per_row"], o["batch_size"], o["threads"], o["window"], *depths) < 1:
        raise cli.BadInput("--depths, --per_row, --batch_size, --threads and --window must be >= 1")
    if not all(0 < t < 1 for t in taus) or not all(0 <= d <= 1 for d in densities):
        raise cli.BadInput(f"--taus={o['taus']} must be in (0, 1) and --densities={o['densities']} in [0, 1]")
    torch.set_num_threads(o["threads"])
    shipped_with = dense_path if os.path.isfile(dense_path[:-len(".pt")] + ".json") else MODEL  # a run has no .json
    rows = harness.heldout_rows(shipped_with, o["heldout"])  # (R, T + 1)
    line = harness.FACT_LINE
    if max(depths) + 2 * line > rows.shape[1]:
        raise cli.BadInput(f"--depths: {max(depths)} bytes and two fact lines of {line} do not fit a row of "
                           f"{rows.shape[1]}; keep each depth at most {rows.shape[1] - 2 * line}")
    trained = load_model(o["spkv"])[0].eval() if o["spkv"] else None
    window = trained.cfg.window if trained is not None else o["window"]
    dense = load_model(dense_path, dense=True, window=window)[0].eval()
    print(f"haystacks: {rows.shape[0]} held-out rows x {o['per_row']} needles a depth; window {window}; "
          f"dense {dense_path}" + (f"; SP-KV {o['spkv']}" if trained is not None else ""))
    t0, results = time.time(), {}
    rng = np.random.default_rng(o["seed"])
    for depth in depths:
        seqs, first, second = haystacks(rows, depth, o["per_row"], rng)
        results[str(depth)] = measure_depth(dense, trained, seqs, first, second, o, taus if trained else [], densities)
        print_depth(depth, results[str(depth)])
    path = harness.save_result(o["out"], "needle", {**o, "dense": dense_path, "window": window}, results, t0)
    plot(results, path[:-len(".json")] + ".png")
    print(f"results: {path} and its .png")


if __name__ == "__main__":
    cli.run(main, "needle.py")
