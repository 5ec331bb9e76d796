"""A synthetic recall task: does a predictor trained only on next-token loss learn what to keep?

Each sequence is random filler (lowercase letters and spaces) with facts "#AB=42;" scattered in
its first 60%, and at its end queries "?AB=42;" for some of them. Answering a query needs the
value digits of its fact, far beyond the local window; the filler is never needed again. Ground
truth therefore says which positions the future needs: the key letters, '=' and the value digits
of each queried fact.

    python synthetic.py                 # data, SP-KV and dense runs from scratch, evaluation table
    python synthetic.py --steps=600 --seq_len=1024 --out=out/synthetic

Reported, on held-out sequences, under hard gates for SP-KV:
  accuracy   queries whose two value digits are both predicted (argmax, teacher forcing)
  density    kept fraction of pairs older than the window (spkv.density_stats)
  precision / recall  of the positions kept by any layer and head, against the needed positions
and a floor: the SP-KV model with its long-term store emptied (window-only attention).
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import torch

import cli
import spkv
from checkpoint import load_model, save_checkpoint
from data import tokenizer_id
from model import GPT, GPTConfig
from tokenizer import byte_spec

FILLER = b"abcdefghijklmnopqrstuvwxyz    "
KEYS = [bytes([a, b]) for a in range(65, 91) for b in range(65, 91)]


def make_sequence(rng: random.Random, length: int, n_facts: int, n_queries: int):
    """(bytes of exactly `length`, needed positions, answer positions (2 per query))."""
    seq = bytearray(rng.choice(FILLER) for _ in range(length))
    keys = rng.sample(KEYS, n_facts)
    values = [b"%02d" % rng.randrange(100) for _ in keys]
    slots = sorted(rng.sample(range(int(0.6 * length) // 8), n_facts))  # non-overlapping 8-byte slots
    needed = []
    for key, value, slot in zip(keys, values, slots):
        p = 8 * slot
        seq[p:p + 7] = b"#" + key + b"=" + value + b";"
        needed.append(list(range(p + 1, p + 6)))  # key letters, '=', value digits
    answers, needed_by_queries = [], []
    for q, i in enumerate(rng.sample(range(n_facts), n_queries)):
        p = length - 8 * (n_queries - q)
        seq[p:p + 7] = b"?" + keys[i] + b"=" + values[i] + b";"
        answers.append((p + 4, p + 5))
        needed_by_queries += needed[i]
    return bytes(seq), sorted(needed_by_queries), answers


def prepare(folder, length, n_train, n_val, n_facts, n_queries, seed=0):
    """Write train.bin / val.bin (each document = sequence + end-of-text) and meta.json with
    align = length + 1, so training windows start at document boundaries."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    spec = byte_spec()
    for split, n in (("train", n_train), ("val", n_val)):
        docs = [list(make_sequence(rng, length, n_facts, n_queries)[0]) + [spec["eos_id"]] for _ in range(n)]
        np.array(docs, dtype=np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
    meta = {"tokenizer_id": tokenizer_id(spec), "dtype": "uint16", "source": "synthetic recall",
            "align": length + 1, "train_tokens": n_train * (length + 1), "val_tokens": n_val * (length + 1)}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)


@torch.no_grad()
def evaluate(ckpt, length, n_facts, n_queries, n_seqs=64, seed=12345, empty_store=False) -> dict:
    model, _, _ = load_model(ckpt)
    model.eval()
    if empty_store:  # every gate closed: only the local window remains
        for block in model.blocks:
            if block.attn.is_spkv:
                block.attn.predictor.proj.bias.fill_(-1e4)
    rng = random.Random(seed)
    correct = total = hit = kept_total = needed_total = 0
    keeps = {layer: [] for layer in model.cfg.spkv_layers()}
    per_layer = {}  # layer -> [fact bytes kept, fact bytes, filler kept, filler] (old positions)
    for _ in range(n_seqs):
        seq, needed, answers = make_sequence(rng, length, n_facts, n_queries)
        ids = torch.tensor(list(seq))[None]
        gates = []
        logits, _ = model(ids, view="hard", gates=gates)
        pred = logits[0].argmax(-1)  # pred[t] is the guess for token t + 1
        for a, b in answers:
            correct += int(pred[a - 1] == seq[a] and pred[b - 1] == seq[b])
            total += 1
        if gates:
            kept = [spkv.hard_keep(g, model.cfg.tau)[0] for g in gates]  # each (Hkv, T)
            for layer, k in zip(keeps, kept):
                keeps[layer].append(k[None])
            old = torch.arange(length) <= length - 1 - model.cfg.window
            any_kept = torch.stack(kept).any(0).any(0) & old  # (T,) kept by some layer and head
            facts = torch.tensor([c not in FILLER for c in seq]) & old  # every fact/query byte
            for layer, k in zip(keeps, kept):
                per_layer.setdefault(layer, [0, 0, 0, 0])
                counts = per_layer[layer]
                counts[0] += int((k.any(0) & facts).sum())
                counts[1] += int(facts.sum())
                counts[2] += int((k.any(0) & ~facts & old).sum())
                counts[3] += int((~facts & old).sum())
            hit += int(any_kept[needed].sum())
            kept_total += int(any_kept.sum())
            needed_total += len(needed)
    out = {"accuracy": correct / total}
    if keeps:
        stats = spkv.density_stats({k: torch.cat(v) for k, v in keeps.items()}, model.cfg.window)
        out.update(density=stats["overall"], recall=hit / needed_total,
                   precision=hit / kept_total if kept_total else float("nan"),
                   kept_fact_vs_filler={layer: (c[0] / c[1], c[2] / c[3]) for layer, c in per_layer.items()})
    return out


def main(argv):
    o = dict(out="out/synthetic", seq_len=1024, steps=600, window=32, n_facts=8, n_queries=4, batch_size=8,
             lr=2e-3, n_layer=4, n_embd=128, n_train=2000, eval_only=0)
    o.update(cli.parse(argv, o, "synthetic.py"))
    data_dir, L = os.path.join(o["out"], "data"), o["seq_len"]
    if o["eval_only"]:  # re-evaluate the runs already in --out
        return report(o, {name: evaluate(os.path.join(o["out"], name, "ckpt.pt"), L, o["n_facts"], o["n_queries"])
                          for name in ("spkv", "dense")})
    prepare(data_dir, L, o["n_train"], 200, o["n_facts"], o["n_queries"])
    init = os.path.join(o["out"], "init.pt")  # carries the byte tokenizer; weights are re-drawn
    save_checkpoint(init, GPT(GPTConfig(vocab_size=257, n_layer=1, n_head=1, n_kv_head=1, n_embd=32,
                                        n_hidden=32, block_size=L)), byte_spec(), source="synthetic.py")
    common = [f"--ckpt={init}", "--init=scratch", f"--data={data_dir}", f"--seq_len={L}", f"--window={o['window']}",
              f"--max_steps={o['steps']}", f"--batch_size={o['batch_size']}", f"--lr={o['lr']}",
              f"--n_layer={o['n_layer']}", f"--n_embd={o['n_embd']}", "--n_head=4", "--n_kv_head=2",
              "--warmup_steps=30", f"--eval_every={o['steps']}", f"--ckpt_every={o['steps']}", "--preset=cpu",
              "--weight_decay=0.1"]
    results = {}
    for name, extra in (("spkv", []), ("dense", ["--dense=True"])):
        run_dir = os.path.join(o["out"], name)
        subprocess.run([sys.executable, "train.py", *common, *extra, f"--out_dir={run_dir}"], check=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
        results[name] = evaluate(os.path.join(run_dir, "ckpt.pt"), L, o["n_facts"], o["n_queries"])
    report(o, results)


def report(o, results):
    results["window_only"] = evaluate(os.path.join(o["out"], "spkv", "ckpt.pt"), o["seq_len"], o["n_facts"],
                                      o["n_queries"], empty_store=True)
    print(f"\n{'model':<12} {'accuracy':>9} {'density':>8} {'precision':>10} {'recall':>7}")
    for name, r in results.items():
        print(f"{name:<12} {r['accuracy']:>9.3f} {r.get('density', float('nan')):>8.3f} "
              f"{r.get('precision', float('nan')):>10.3f} {r.get('recall', float('nan')):>7.3f}")
    with open(os.path.join(o["out"], "results.json"), "w") as f:
        json.dump({"settings": o, "results": results}, f, indent=1)
    for layer, (fact, filler) in results["spkv"].get("kept_fact_vs_filler", {}).items():
        print(f"SP-KV layer {layer}: keeps {fact:.3f} of fact/query bytes, {filler:.3f} of filler bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
