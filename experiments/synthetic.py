"""A synthetic recall task: does a predictor trained only on next-token loss learn what to keep?

Key/value recall over bytes, needle-in-a-haystack style. Each sequence is filler (9 letters and a
space, cycled from a random start: predictable from the last byte, and shorter than the window, so
an old filler byte is never the only copy of anything) with facts scattered before the query
section: every position there holds a fact with probability n_facts / (its length), independently,
so about `n_facts` per sequence (1 to 12). A fact is one byte that carries a key (one of 12
uppercase letters, distinct within a sequence) and its value (a digit): byte 128 + 10 * key +
value. At the end come `n_queries` queries, 4 bytes each: a key letter drawn with replacement from
the sequence's facts, the digit of that fact, two filler bytes. Answering needs the fact byte,
usually from far beyond the local window; the filler is never needed again. Ground truth therefore
says exactly which positions the future needs: the fact bytes of the queried keys.

The task is built so that next-token loss rewards keeping the facts and nothing else: facts sit
at independent random positions and queries repeat keys freely, so neither counting facts or
queries nor knowing the absolute position predicts anything. (Facts on fixed slots, each key
queried once, would reward counting, and the filler that counting needs would be kept.) One byte
per fact means one attention hop can answer; a key-then-value pair would need an induction circuit.

    python experiments/synthetic.py                 # data, a dense "pretrained" model, SP-KV and dense adapted from it
    python experiments/synthetic.py --from_scratch=1 --steps=2000 --out=out/synthetic_scratch   # both from scratch
    python experiments/synthetic.py --eval_only=1   # re-evaluate the checkpoints already in --out
    python experiments/synthetic.py --probe_layer=0 # loss by target kind: dense, SP-KV, SP-KV with layer 0 seeing old facts only

Interrupted (Ctrl-C saves the run in progress), the same command again goes on: the data and the
finished runs are kept, the interrupted run resumes from its save (or starts again if it never
saved one), and the rest follow.

The SP-KV runs start their predictors at --predictor_init_bias=-2 (u = 0.12, below tau): from the
open init (5) nothing closes on this kind of task (experiments/README.md, the synthetic task).

Reported, on held-out sequences, under hard gates for SP-KV:
  accuracy   queries whose digit is predicted (argmax, teacher forcing); chance is 0.1
  density    kept fraction of pairs older than the window (spkv.density_stats)
  precision / recall  of the positions kept by any layer and head, against the needed positions
             (needed fact bytes still inside the window at the end are left out of both)
and a floor: the SP-KV model with nothing kept beyond the window; and the post-hoc baselines H2O
and StreamingLLM (baselines.py) on the dense model at SP-KV's density.
"""

import dataclasses
import json
import os
import random
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python experiments/<name>.py

import numpy as np
import torch

import baselines as bl
import cli
import data as datalib
import harness
import spkv
import train
from checkpoint import load_model, save_checkpoint
from data import tokenizer_id
from model import GPT, GPTConfig
from tokenizer import byte_spec

FILLER = b"abcdefghi "  # shorter than the window: every filler byte is always in the window
KEYS = b"ABCDEFGHIJKL"
VALUES = b"0123456789"
QUERY = 4  # bytes per query: a key letter, its digit, two filler bytes


def fact_byte(key: int, value: int) -> int:
    """The one byte of a fact: key index 0..11, value index 0..9 -> 128..247."""
    return 128 + len(VALUES) * key + value


def make_sequence(rng: random.Random, length: int, n_facts: float, n_queries: int):
    """(bytes of exactly `length`, needed positions, answer positions (one per query)).
    Needed: the fact byte of every queried key. Answer: where a query's digit sits."""
    region = length - QUERY * n_queries  # facts may sit anywhere before the queries
    if not (0 < n_facts <= len(KEYS) / 2 and n_queries >= 1 and region >= 4 * n_facts):
        raise cli.BadInput(f"need 0 < n_facts <= {len(KEYS) // 2}, n_queries >= 1 and at least 4 * n_facts bytes "
                         f"before the queries; got n_facts={n_facts}, n_queries={n_queries}, length={length}")
    while True:  # each position holds a fact with probability n_facts / region, independently
        spots = [p for p in range(region) if rng.random() < n_facts / region]
        if 1 <= len(spots) <= len(KEYS):  # at least one fact to ask about; keys stay distinct
            break
    start = rng.randrange(len(FILLER))
    seq = bytearray(FILLER[(start + i) % len(FILLER)] for i in range(length))
    keys = rng.sample(range(len(KEYS)), len(spots))
    values = [rng.randrange(len(VALUES)) for _ in keys]
    for key, value, p in zip(keys, values, spots):
        seq[p] = fact_byte(key, value)
    answers, needed = [], set()
    for q in range(n_queries):
        i = rng.randrange(len(spots))  # with replacement: no exclusion, nothing to count
        p = region + QUERY * q
        seq[p:p + 2] = bytes([KEYS[keys[i]], VALUES[values[i]]])
        answers.append(p + 1)
        needed.add(spots[i])
    return bytes(seq), sorted(needed), answers


def prepare(folder, length, n_train, n_val, n_facts, n_queries, seed=0):
    """Write train.bin / val.bin (each document = sequence + end-of-text, length + 1 tokens) and
    meta.json, which records that length for DocumentWindows and the task's settings. A folder
    already holding this task's data is kept; one holding another task's is refused (runs trained
    on it must not be taken for runs of this one)."""
    task = dict(length=length, n_train=n_train, n_val=n_val, n_facts=float(n_facts), n_queries=n_queries, seed=seed)
    meta_path = os.path.join(folder, "meta.json")
    held = harness.read_json(meta_path).get("task") if os.path.exists(meta_path) else None
    if held == task:
        return
    if held is not None:
        differ = [f"{k}={held.get(k)}, wanted {v}" for k, v in task.items() if held.get(k) != v]
        raise cli.BadInput(f"{folder} holds the task's data for other settings ({'; '.join(differ)}); give a fresh "
                           "--out for these settings, or the flags that made it")
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    spec = byte_spec()
    for split, n in (("train", n_train), ("val", n_val)):
        docs = [list(make_sequence(rng, length, n_facts, n_queries)[0]) + [spec["eos_id"]] for _ in range(n)]
        np.array(docs, dtype=np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
    meta = {"tokenizer_id": tokenizer_id(spec), "dtype": "uint16", "source": "synthetic recall", "task": task,
            "sequence_tokens": length + 1, "train_tokens": n_train * (length + 1), "val_tokens": n_val * (length + 1)}
    harness.write_json(meta_path, meta)  # written last: the data is complete once it exists


class DocumentWindows(datalib.Batches):
    """The task's windows for train.py: each starts at a sequence, drawn uniformly over the split's
    sequences. A window that began mid-sequence would ask for facts it had cut off."""

    def __init__(self, folder: str, split: str, seq_len: int):
        super().__init__(folder, split, seq_len)
        with open(os.path.join(folder, "meta.json")) as f:
            self.doc = json.load(f)["sequence_tokens"]

    def window_starts(self, n: int, gen: torch.Generator) -> list:
        starts = (len(self.tokens) - self.seq_len - 2) // self.doc + 1  # the sequences a whole window fits from
        return (torch.randint(starts, (n,), generator=gen) * self.doc).tolist()


@torch.no_grad()
def evaluate(ckpt, length, n_facts, n_queries, n_seqs=64, seed=12345, policy="spkv", density=0.0) -> dict:
    """Query accuracy and what the cache holds after the last token, under one of baselines.POLICIES
    ("spkv": the checkpoint's own hard gates; "window": the floor; "h2o" / "streaming" at `density`)."""
    model, _, _ = load_model(ckpt)
    model.eval()
    rule = bl.make_policy(policy, model.cfg.window, model.cfg.tau, density)
    rows = []  # per layer, the keys the last query sees: what the cache holds at the end

    def recording(q, k, logit):
        visible = rule(q, k, logit)
        rows.append(visible.expand(1, k.shape[1], length, length)[0, :, -1])  # (Hkv, T)
        return visible

    rng = random.Random(seed)
    correct = total = hit = kept_total = needed_total = 0
    keeps = {layer: [] for layer in range(model.cfg.n_layer)}
    per_layer = {layer: dict(facts_kept=0, facts=0, others_kept=0, others=0) for layer in keeps}  # old bytes
    old = torch.arange(length) <= length - 1 - model.cfg.window  # (T,) positions out of the window
    for _ in range(n_seqs):
        seq, needed, answers = make_sequence(rng, length, n_facts, n_queries)
        rows.clear()
        logits = bl.forward_with_policy(model, torch.tensor(list(seq))[None], recording)
        pred = logits[0].argmax(-1)  # pred[t] is the guess for token t + 1
        correct += sum(int(pred[a - 1] == seq[a]) for a in answers)
        total += len(answers)
        facts = torch.tensor([c >= 128 for c in seq]) & old  # every fact byte
        for layer, held in zip(keeps, rows):
            keeps[layer].append(held[None])
            counts = per_layer[layer]
            counts["facts_kept"] += int((held.any(0) & facts).sum())
            counts["facts"] += int(facts.sum())
            counts["others_kept"] += int((held.any(0) & ~facts & old).sum())
            counts["others"] += int((~facts & old).sum())
        any_kept = torch.stack(rows).any(0).any(0) & old  # (T,) held by some layer and head
        needed = [p for p in needed if old[p]]  # a fact still in the window needs no keeping
        hit += int(any_kept[needed].sum())
        kept_total += int(any_kept.sum())
        needed_total += len(needed)
    stats = spkv.density_stats({k: torch.cat(v) for k, v in keeps.items()}, model.cfg.window)
    return {"accuracy": correct / total, "density": stats["overall"], "recall": hit / needed_total,
            "precision": hit / kept_total if kept_total else float("nan"),
            "kept_fact_vs_filler": {layer: (c["facts_kept"] / c["facts"], c["others_kept"] / c["others"])
                                    for layer, c in per_layer.items()}}


def target_kinds(length: int, n_queries: int) -> dict:
    """Masks over the targets 1..length-1 of a sequence, by what the target is (from its position
    alone): "fact or filler" before the queries, then each query's key letter, its digit, and
    its two filler bytes."""
    t = torch.arange(1, length)  # target positions
    region = length - QUERY * n_queries
    return {"before the queries": t < region, "query keys": (t >= region) & ((t - region) % QUERY == 0),
            "query digits": (t >= region) & ((t - region) % QUERY == 1),
            "query filler": (t >= region) & ((t - region) % QUERY >= 2)}


@torch.no_grad()
def loss_by_kind(ckpt, length, n_facts, n_queries, policy="spkv", only_facts_layer=-1, n_seqs=32, seed=7) -> dict:
    """Mean next-token loss per target kind (target_kinds) on held-out sequences, with one of
    baselines.POLICIES; with only_facts_layer=L, that layer instead sees only the fact bytes
    beyond its window (the other layers keep the policy). Summed over kinds, it says where one
    model's loss differs from another's."""
    model, _, _ = load_model(ckpt)
    model.eval()
    if not -1 <= only_facts_layer < model.cfg.n_layer:
        raise cli.BadInput(f"--probe_layer={only_facts_layer}: the model has layers 0..{model.cfg.n_layer - 1}")
    rng = random.Random(seed)
    x = torch.tensor([list(make_sequence(rng, length, n_facts, n_queries)[0]) for _ in range(n_seqs)])  # (N, T)
    rule = bl.make_policy(policy, model.cfg.window, model.cfg.tau, 0.0)
    facts_only = bl.window_visible(length, model.cfg.window) | (bl.causal_visible(length) & (x >= 128)[:, None, None, :])

    def visible(layer, q, k, logit):
        return facts_only if layer == only_facts_layer else rule(q, k, logit)

    logits = bl.forward_with_masks(model, x, visible)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")  # (N, T-1)
    return {kind: nll[:, mask].mean().item() for kind, mask in target_kinds(length, n_queries).items()}


def probe(o):
    """python experiments/synthetic.py --probe_layer=L: loss by target kind for the dense model, SP-KV under
    its own hard gates, and SP-KV with layer L seeing only the old fact bytes."""
    args = (o["seq_len"], o["n_facts"], o["n_queries"])
    spkv_ckpt, dense_ckpt = (os.path.join(o["out"], name, "ckpt.pt") for name in ("spkv", "dense"))
    rows = {"dense, full attention": loss_by_kind(dense_ckpt, *args, policy="full"),
            "SP-KV, own hard gates": loss_by_kind(spkv_ckpt, *args),
            f"SP-KV, layer {o['probe_layer']} sees old facts only": loss_by_kind(spkv_ckpt, *args,
                                                                                only_facts_layer=o["probe_layer"])}
    print(f"mean loss per target kind, 32 held-out sequences\n{'':<36}" + "".join(f"{k:>20}" for k in rows["dense, full attention"]))
    for name, losses in rows.items():
        print(f"{name:<36}" + "".join(f"{v:>20.4f}" for v in losses.values()))
    return rows


@dataclass
class Flags:
    out: str = "out/synthetic"  # folder for the data, the three runs and results.json
    seq_len: int = 128  # bytes per sequence
    steps: int = 3000  # training steps of the dense "pretrained" model (or of each --from_scratch run)
    adapt_steps: int = 500  # steps adapting it to SP-KV, and to dense as the control
    window: int = 16  # SP-KV local window
    n_facts: float = 4.0  # facts per sequence, on average
    n_queries: int = 8  # queries at the end of each sequence
    batch_size: int = 32  # sequences per step
    lr: float = 1e-3  # peak learning rate
    n_layer: int = 2  # model layers
    n_embd: int = 128  # model width
    n_head: int = 4  # query heads
    n_kv_head: int = 2  # key/value heads
    n_train: int = 20000  # training sequences generated
    predictor_init_bias: float = -2.0  # output bias of fresh predictors (< 0 leans closed)
    from_scratch: int = 0  # 1: train SP-KV and dense from random weights instead of adapting
    eval_only: int = 0  # 1: only evaluate the runs already in --out
    probe_layer: int = -1  # >= 0: the probe experiment, facts visible only to this layer


WARMUP = 30  # learning-rate warmup steps of a run; a run of WARMUP steps or fewer warms up over its first half


def warmup_steps(n: int) -> int:
    return WARMUP if n > WARMUP else n // 2


def main(argv):
    o = dataclasses.asdict(Flags())
    o.update(cli.parse(argv, Flags, "synthetic.py"))
    if o["probe_layer"] >= 0:
        probe(o)
        return
    if not o["eval_only"]:
        for key in ("steps", "adapt_steps"):
            if o[key] < 1:
                raise cli.BadInput(f"--{key}={o[key]} must be >= 1")
        train_both(o)
    report(o, evaluate_all(o))


def train_both(o):
    """Data; a dense model from scratch (the "pretrained" model); then, as METHOD.md adapts a
    pretrained checkpoint, two runs from it with the same recipe (train.py): SP-KV, and dense.
    With --from_scratch=1: SP-KV and dense each trained from random weights instead. Each run's
    windows start at a sequence (DocumentWindows). The same command again goes on where it
    stopped: finished runs are kept, an interrupted one resumed (train_run)."""
    data_dir, L = os.path.join(o["out"], "data"), o["seq_len"]
    prepare(data_dir, L, o["n_train"], 200, o["n_facts"], o["n_queries"])
    init = os.path.join(o["out"], "init.pt")  # carries the byte tokenizer; the runs draw their own weights
    if not os.path.exists(init):
        save_checkpoint(init, GPT(GPTConfig(vocab_size=257, n_layer=1, n_head=1, n_kv_head=1, n_embd=32,
                                            n_hidden=32, block_size=L)), byte_spec(), source="synthetic.py")
    for out_dir, flags in recipes(o, data_dir, init):
        train_run(out_dir, flags)


def recipes(o, data_dir: str, init: str) -> list:
    """[(out_dir, train.py flags as {name: value})], in the order the runs must go."""
    common = dict(data=data_dir, seq_len=o["seq_len"], window=o["window"], batch_size=o["batch_size"], lr=o["lr"],
                  preset="cpu", gates="", weight_decay=0.1)
    pre = os.path.join(o["out"], "pretrained")
    scratch = dict(ckpt=init, init="scratch", n_layer=o["n_layer"], n_embd=o["n_embd"], n_head=o["n_head"],
                   n_kv_head=o["n_kv_head"])
    adapt = dict(ckpt=os.path.join(pre, "ckpt.pt"), init="pretrained")
    gates = dict(predictor_init_bias=o["predictor_init_bias"])  # SP-KV runs only
    spkv_dir, dense_dir = os.path.join(o["out"], "spkv"), os.path.join(o["out"], "dense")
    if o["from_scratch"]:  # both models from random weights, `steps` each
        runs = [(spkv_dir, o["steps"], {**scratch, **gates}), (dense_dir, o["steps"], {**scratch, "dense": True})]
    else:
        runs = [(pre, o["steps"], {**scratch, "dense": True}), (spkv_dir, o["adapt_steps"], {**adapt, **gates}),
                (dense_dir, o["adapt_steps"], {**adapt, "dense": True})]
    return [(out_dir, {**common, **extra, "max_steps": n, "eval_every": n, "ckpt_every": n,
                       "warmup_steps": warmup_steps(n)}) for out_dir, n, extra in runs]


def train_run(out_dir: str, flags: dict):
    """train.py in this process (its windows DocumentWindows): kept when out_dir holds this run
    finished, resumed when it holds its checkpoint (Ctrl-C saves one), started otherwise (a run
    killed before its first save left only its log). A finished run of other flags is refused."""
    if harness.finished(out_dir, flags):
        print(f"{out_dir}: finished earlier, kept")
        return
    argv = [f"--{k}={v}" for k, v in flags.items()] + [f"--out_dir={out_dir}"]
    if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        argv.append("--resume=True")
    try:
        train.main(argv, batches=DocumentWindows)
    except SystemExit as stop:
        if stop.code == 130:  # Ctrl-C: the run saved where it stopped
            print("synthetic.py: run the same command again to go on from there", flush=True)
        raise


def evaluate_all(o) -> dict:
    """SP-KV under its hard gates, dense under full attention, the window-only floor (the SP-KV
    model with nothing kept), and H2O / StreamingLLM on the dense model at SP-KV's density."""
    args = (o["seq_len"], o["n_facts"], o["n_queries"])
    spkv_ckpt, dense_ckpt = (os.path.join(o["out"], name, "ckpt.pt") for name in ("spkv", "dense"))
    results = {"spkv": evaluate(spkv_ckpt, *args), "dense": evaluate(dense_ckpt, *args, policy="full"),
               "window_only": evaluate(spkv_ckpt, *args, policy="window")}
    for name in ("h2o", "streaming"):
        results[f"{name}_on_dense"] = evaluate(dense_ckpt, *args, policy=name, density=results["spkv"]["density"])
    return results


def report(o, results):
    print(f"\n{'model / policy':<18} {'accuracy':>9} {'density':>8} {'precision':>10} {'recall':>7}")
    for name, r in results.items():
        print(f"{name:<18} {r['accuracy']:>9.3f} {r['density']:>8.3f} {r['precision']:>10.3f} {r['recall']:>7.3f}")
    with open(os.path.join(o["out"], "results.json"), "w") as f:
        json.dump({"settings": o, "results": results}, f, indent=1)
    for layer, (fact, filler) in results["spkv"]["kept_fact_vs_filler"].items():
        print(f"SP-KV layer {layer}: keeps {fact:.3f} of fact bytes, {filler:.3f} of filler bytes")


if __name__ == "__main__":
    cli.run(main, "synthetic.py")
