"""What the experiments share: train.py runs that are idempotent, and results that are never merged.

    run_train(folder, flags, threads)   train.py into folder unless a finished run of these flags is
                                        there; resume an interrupted one; refuse one of other flags
    train_all(out, plan, threads, ...)  run_train for every run of a plan, in order; --eval_only trains none
    measure_against_dense(...)          SP-KV under hard gates against its dense twin and the post-hoc
                                        policies (H2O, StreamingLLM, the window alone) at equal density,
                                        over a tau sweep, at a calibrated tau, over fixed budgets
    new_result_path(out, name)          a dated file stamped with the commit, never an earlier one
    save_result(out, name, ...)         the result of one invocation, as such a file in out/results
    out_folder(given, name)             --out, or out/<name> (out/<name>_tiny with --tiny=True)
    chosen(flag, csv, table)            the names a comma-list flag picks from a table of recipes
    SHAPES, scratch_flags(...)          the small real-text model and its from-scratch train.py flags
    byte_checkpoint(path)               a tiny checkpoint that carries the byte tokenizer
    heldout_rows(ckpt)                  the bar's held-out sequences shipped beside a model
    position_losses(model, rows, ...)   the loss at each position over such rows, under any attention mask
    fact_line(rng)                      a planted fact: a comment line of a random key and value, and
                                        where its value lies (pretrain.py plants them, needle.py asks)

A child's one-line refusal is passed through as one line (cli.BadInput), not a traceback.
"""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
import torch.nn.functional as F

import baselines
import cli
import data as datalib
import run
import spkv
import tau as taulib
from checkpoint import load_model, save_checkpoint
from model import GPT, GPTConfig
from tokenizer import byte_spec


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj):
    """Atomic: a kill mid-write leaves no torn file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def val_rows(val: datalib.Batches, n_batches: int, batch_size: int) -> torch.Tensor:
    """(n_batches * batch_size, T + 1) held-out token rows: the windows baselines.policy_losses draws
    from val for a bar (seed 1, batch after batch), each with its last target."""
    gen = torch.Generator().manual_seed(1)
    return torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in (val.sample(batch_size, gen) for _ in range(n_batches))])


def heldout_rows(ckpt: str, given: str = "") -> torch.Tensor:
    """(N, T + 1) token rows: the bar's held-out sequences shipped beside a model (its .json names the
    file and shape), or a .bin of the same shape given as `given`."""
    meta_path = ckpt[:-len(".pt")] + ".json"
    if not os.path.isfile(meta_path):
        raise cli.BadInput(f"{meta_path} is missing: the held-out rows' shape is read from a shipped model's .json")
    held = read_json(meta_path)["heldout"]
    path = given or os.path.join(os.path.dirname(ckpt), held["file"])
    rows = np.fromfile(path, dtype=np.uint16).astype(np.int64)
    if rows.size != np.prod(held["shape"]):
        raise cli.BadInput(f"{path} holds {rows.size} tokens, not {held['shape']}; give the rows shipped with {ckpt}")
    return torch.from_numpy(rows).view(*held["shape"])


@torch.no_grad()
def position_losses(model, rows: torch.Tensor, visible, batch_size: int) -> torch.Tensor:
    """(T,) next-token loss at each position, averaged over rows (N, T + 1) of fixed held-out tokens,
    every layer attending through visible(layer, q, k, logit) (measure.forward_with_masks)."""
    total = torch.zeros(rows.shape[1] - 1)  # (T,)
    for i in range(0, rows.shape[0], batch_size):
        x, y = rows[i:i + batch_size, :-1], rows[i:i + batch_size, 1:]  # (b, T) each
        logits = baselines.forward_with_masks(model, x, visible)  # (b, T, V)
        total += F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").sum(0)
    return total / rows.shape[0]


FACT_KEY, FACT_VALUE = 5, 8  # bytes of a fact's random key (a-z) and value (a-z, 0-9)
_KEY_BYTES = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
_VALUE_BYTES = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", np.uint8)


def fact_line(rng: np.random.Generator) -> tuple:
    """(line, value_at): a fact as bytes (uint8 array), b"\n# <key>: <value>\n" with a random key
    and value, and the offset of the value in it. Said once and said again later, only the first
    saying predicts the second's value: a needle a model must look back for."""
    key, value = rng.choice(_KEY_BYTES, FACT_KEY), rng.choice(_VALUE_BYTES, FACT_VALUE)
    head = np.frombuffer(b"\n# ", np.uint8)
    line = np.concatenate([head, key, np.frombuffer(b": ", np.uint8), value, np.frombuffer(b"\n", np.uint8)])
    return line, len(head) + FACT_KEY + 2


FACT_LINE = len(fact_line(np.random.default_rng(0))[0])  # bytes of a fact line


def byte_checkpoint(path: str, **shape):
    """A tiny byte-level checkpoint (random weights, seed 0): for its tokenizer (train.py --init=scratch
    reads it), or with `shape` (GPTConfig fields) as a small model to run."""
    torch.manual_seed(0)
    cfg = {**dict(vocab_size=257, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, n_hidden=64, block_size=64), **shape}
    save_checkpoint(path, GPT(GPTConfig(**cfg)), byte_spec(), source="experiments/harness.py")


def commit_stamp() -> str:
    """The repo's commit, with "+dirty" when tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def new_result_path(out: str, name: str, ext: str = "json") -> str:
    """out/name-<date>-<commit>.<ext>, with -2, -3 ... when that exists: results are never replaced.
    The name is reserved by creating the file exclusively (empty until its writer replaces it
    atomically), so two processes never get the same one."""
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"{name}-{time.strftime('%Y-%m-%d')}-{commit_stamp()}")
    path, n = f"{base}.{ext}", 2
    while True:
        try:
            with open(path, "x"):
                return path
        except FileExistsError:
            path, n = f"{base}-{n}.{ext}", n + 1


def start_suffix(spkv_base: str) -> str:
    """The part of an SP-KV run's folder name that says where it started: "" from the dense model,
    else _from_<checkpoint name>, so runs from other starts never share a folder."""
    return f"_from_{os.path.splitext(os.path.basename(spkv_base))[0]}" if spkv_base else ""


def out_folder(given: dict, name: str) -> str:
    """--out as given, else out/<name>, or out/<name>_tiny with --tiny=True: a tiny run never lands
    in the real run's folder, where its runs would be refused (other flags) or block the real ones."""
    if "out" not in given:
        return os.path.join("out", name + ("_tiny" if given.get("tiny") else ""))
    if not given["out"].strip():
        raise cli.BadInput(f"--out is empty; give the folder the runs go in (default out/{name})")
    return given["out"]


def save_result(out: str, name: str, flags: dict, results, started: float) -> str:
    """One invocation's results as a new dated file in out/results, stamped with the commit and the
    flags it ran with; earlier files are never touched. Returns its path."""
    path = new_result_path(os.path.join(out, "results"), name)
    write_json(path, {"date": time.strftime("%Y-%m-%d"), "commit": commit_stamp(), "flags": flags,
                      "results": results, "wall_s": round(time.time() - started)})
    return path


def chosen(flag: str, csv: str, table: dict) -> list:
    """The names a comma-list flag (--rows, --recipes) picks from table, all when empty; an unknown
    name is refused."""
    keys = [k for k in csv.split(",") if k] or list(table)
    unknown = [k for k in keys if k not in table]
    if unknown:
        noun = flag.removesuffix("s")
        raise cli.BadInput(f"--{flag}: unknown {noun} {unknown[0]!r}; {noun}s are {','.join(table)}")
    return keys


def final_eval(folder: str) -> dict:
    """train.py's last eval of a finished run (its final.json less the flags): step, val_soft,
    val_hard and, for SP-KV, tau, density and density_per_layer (2 fixed held-out batches)."""
    saved = read_json(os.path.join(folder, "final.json"))
    return {k: saved[k] for k in ("step", "val_soft", "val_hard", "tau", "density", "density_per_layer") if k in saved}


def density_by_eval(folder: str) -> list:
    """[(step, hard-gate density)] at each of the run's evals (its log.jsonl)."""
    records, _ = run.steps_done(run.log_records(os.path.join(folder, "log.jsonl")))
    return [(r["step"], r["density"]) for r in records if r is not None and "density" in r]


FLAGS_ADDED = {"gates": ""}  # train.py flags newer than some saved runs: such a run ran as this value


def finished(folder: str, flags: dict) -> bool:
    """Whether folder holds a finished run of these flags. A finished run made with other flags is
    refused: it holds someone's results, never trained over or measured as if it were this one."""
    final = os.path.join(folder, "final.json")
    if not os.path.exists(final):
        return False
    saved = {**FLAGS_ADDED, **read_json(final)["train_config"]}
    differ = [f"--{k}={saved.get(k)} (wanted {v})" for k, v in flags.items() if saved.get(k) != v]
    if differ:
        raise cli.BadInput(f"{folder} holds a finished run with other flags: {', '.join(differ)}; "
                           "give a new --out (or move that folder away) to train these")
    return True


def run_train(folder: str, flags: dict, threads: int):
    """train.py for one run, unless it already finished; an interrupted run (ckpt.pt, no final.json)
    is resumed, never started over. train.py's refusal comes back as one line."""
    if finished(folder, flags):
        print(f"{folder}: finished earlier, kept")
        return
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *[f"--{k}={v}" for k, v in flags.items()],
           f"--out_dir={folder}"]
    if os.path.exists(os.path.join(folder, "ckpt.pt")):
        cmd.append("--resume=True")
    print(f"$ OMP_NUM_THREADS={threads} python train.py " + " ".join(cmd[2:]), flush=True)
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise cli.BadInput(f"train.py into {folder} stopped with exit status {res.returncode}: {last}")


def train_all(out: str, plan: dict, threads: int, eval_only: bool = False):
    """run_train for each {run name: train.py flags} of plan, in order, into out/<name>. With
    eval_only nothing is trained: a run that has not finished is refused."""
    for name, flags in plan.items():
        folder = os.path.join(out, name)
        if eval_only and not finished(folder, flags):
            raise cli.BadInput(f"--eval_only=True, but {folder} holds no finished run; drop --eval_only to train it")
        run_train(folder, flags, threads)


# The small real-text model of realtext.py and ablate.py: 4 layers, d=256, 4 query heads over 2 KV
# heads, context 1024 with a window of 64 (so most keys are old); --tiny=True: a 2-layer d=32 model
# at 64 tokens, to check the plumbing in seconds. smollm2.py uses the context and window.
SHAPES = {False: dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=2, seq_len=1024, window=64, batch_size=4),
          True: dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, seq_len=64, window=8, batch_size=2)}


def scratch_flags(tiny: bool, steps: int, data: str, ckpt: str) -> dict:
    """train.py flags of a from-scratch run of the small model at the paper's recipe (no --predictor_*
    flag: train.py's defaults are the paper's); ckpt only lends its tokenizer."""
    return {**SHAPES[tiny], "weight_decay": 0.1, "eval_every": 30, "eval_batches": 2, "ckpt_every": 30,
            "device": "cpu", "preset": "cpu", "gates": "", "data": data, "ckpt": ckpt, "init": "scratch",
            "lr": 1e-3, "warmup_steps": max(1, steps // 10), "max_steps": steps}


N_SINK = 4  # StreamingLLM's attention sinks, and the sink diagnostic's


@torch.no_grad()
def first_token_keep_rate(model, batches, tau: float, n: int, bs: int) -> float:
    """How often the gates keep the first token (the attention sink of most pretrained models), over
    (sequence, SP-KV layer, KV head), on the batches tau.hard_loss_and_density draws."""
    gen = torch.Generator().manual_seed(1)
    kept = []
    for _ in range(n):
        gates = []
        model(batches.sample(bs, gen)[0], a=1.0, gates=gates)
        kept += [spkv.hard_keep(g[..., 0], tau).float().flatten() for g in gates]  # (B * Hkv,) each
    return torch.cat(kept).mean().item()


@torch.no_grad()
def loss_with_sinks(model, batches, tau: float, n: int, bs: int) -> float:
    """A diagnostic, not the method: the hard loss at tau when the first N_SINK tokens are kept in
    every head too. Pretrained models park attention on the first tokens (attention sinks); a gate
    that drops them costs far more than their share of pairs. The batches tau.hard_loss_and_density
    draws."""
    gen = torch.Generator().manual_seed(1)

    def visible(layer, q, k, logit):  # logit (B, Hkv, T): SP-KV's hard view plus the first tokens
        vis = baselines.spkv_visible(logit, model.cfg.window, tau).clone()  # (B, Hkv, T, T)
        vis[..., :N_SINK] = True
        return vis & baselines.causal_visible(logit.shape[-1], logit.device)

    loss = 0.0
    for _ in range(n):
        x, y = batches.sample(bs, gen)
        logits = baselines.forward_with_masks(model, x, visible)
        loss += F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item() / n
    return loss


@torch.no_grad()
def soft_loss(model, batches, n: int, bs: int) -> float:
    gen = torch.Generator().manual_seed(1)
    return sum(F.cross_entropy(model(x, a=0.0)[0].float().flatten(0, 1), y.flatten()).item()
               for x, y in (batches.sample(bs, gen) for _ in range(n))) / n


@torch.no_grad()
def point_at(model, dense, batches, tau: float, n: int, bs: int, with_sinks: bool) -> dict:
    """SP-KV retuned to tau (hard loss, density, first-token keep rate, and with_sinks the loss with
    the sinks forced in), and H2O and StreamingLLM on the dense twin at the density it reached."""
    loss, density = taulib.hard_loss_and_density(model, batches, tau, n, bs)  # retunes model to tau
    point = {"tau": tau, "loss": loss, "density": density,
             **baselines.policy_losses(dense, batches, ["h2o", "streaming"], density, n, bs),
             "first_token_kept": first_token_keep_rate(model, batches, tau, n, bs)}
    if with_sinks:
        point["with_sinks"] = loss_with_sinks(model, batches, tau, n, bs)
    return point


@torch.no_grad()
def measure_against_dense(spkv_path: str, dense_path: str, batches, taus, n: int, bs: int, budgets=(),
                          target_density=None, calibrate_on=None, with_sinks=False) -> dict:
    """On fixed held-out batches, under hard gates: SP-KV at its trained tau and over a tau sweep
    (loss, density, first-token keep rate); the dense twin under full attention and the window
    alone; and H2O and StreamingLLM on the dense twin at each density SP-KV reached. One loaded
    model is retuned to each tau (a deployment knob: no retraining, no reload).
    Options: target_density adds a point at the tau that keeps that fraction of old pairs on the
    calibrate_on batches (spkv.calibrate, training text: the choice is checked held out);
    budgets adds H2O and StreamingLLM at those densities; with_sinks adds loss_with_sinks per point."""
    trained = load_model(spkv_path)[0].eval()
    trained_tau = trained.cfg.tau
    dense = load_model(dense_path, window=trained.cfg.window)[0].eval()  # the policies keep SP-KV's window
    ref = baselines.policy_losses(dense, batches, ["full", "window"], 0.0, n, bs)
    result = {"dense_full": ref["full"], "window": ref["window"], "spkv_soft": soft_loss(trained, batches, n, bs),
              "trained_tau": trained_tau}
    if target_density is not None:
        result["calibrated_tau"] = spkv.calibrate(trained, calibrate_on, target_density, n, bs)
        taus = (*taus, result["calibrated_tau"])
    result["points"] = [point_at(trained, dense, batches, tau, n, bs, with_sinks)
                        for tau in sorted({trained_tau, *taus})]
    trained.retune(tau=trained_tau)
    if budgets:
        result["budgets"] = [{"density": d, **baselines.policy_losses(dense, batches, ["h2o", "streaming"], d, n, bs)}
                             for d in budgets]
    return result


def point(measured: dict, tau: float) -> dict:
    """The point of measure_against_dense's result at tau (its trained_tau or calibrated_tau)."""
    return next(p for p in measured["points"] if p["tau"] == tau)


def pct(loss: float, ref: float) -> str:
    return f"{100 * (loss / ref - 1):+.2f}%"


def print_points(title: str, rows: list):
    """rows: [(label, a measure_against_dense result, tau)]: SP-KV at that tau against the dense
    twin under full attention, H2O and StreamingLLM at its density, the window alone, and the first
    token's keep rate (with the loss with sinks forced in, where measured)."""
    print(f"\n{title}\n{'':<40} {'tau':>7} {'density':>8} {'SP-KV hard':>10} {'dense':>8} {'vs dense':>9} "
          f"{'H2O':>8} {'Stream':>8} {'window':>8}   first token kept, SP-KV + {N_SINK} sinks")
    for label, m, tau in rows:
        p, ref = point(m, tau), m["dense_full"]
        sinks = f", {pct(p['with_sinks'], ref)}" if "with_sinks" in p else ""
        print(f"{label:<40} {tau:>7.4f} {p['density']:>8.3f} {p['loss']:>10.4f} {ref:>8.4f} {pct(p['loss'], ref):>9} "
              f"{pct(p['h2o'], ref):>8} {pct(p['streaming'], ref):>8} {pct(m['window'], ref):>8}   "
              f"{p['first_token_kept']:.2f}{sinks}", flush=True)


def train_and_val(ckpt: str, data: str, seq_len: int) -> tuple:
    """(training Batches, held-out Batches) of data in ckpt's tokenizer, seq_len tokens each."""
    folder = datalib.prepare(data, load_model(ckpt)[1])
    return datalib.Batches(folder, "train", seq_len), datalib.Batches(folder, "val", seq_len)
