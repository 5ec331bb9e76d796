"""Perplexity of a checkpoint on real text nobody here wrote: proof that a conversion is right.

A correct SmolLM2-135M load gives single-digit perplexity on Python standard library source
(about 6.7 on json/__init__.py); a wrong RoPE layout gives hundreds.
Usage: python experiments/perplexity.py [--ckpt=PATH] [--tokens=1024] [--view=dense|soft|hard] [--files=A,B]
"""

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python experiments/<name>.py

import torch

import cli
from checkpoint import load_model
from weights import default_checkpoint

DEFAULT_TEXTS = (os.path.join(os.path.dirname(json.__file__), "__init__.py"),  # stdlib source
                 "/usr/share/common-licenses/Apache-2.0")  # an English licence text


@torch.no_grad()
def perplexity(model, ids: list, a: float = 0.0) -> float:
    """exp(mean next-token NLL) of one sequence of ids under gates of anneal weight a (0 soft, 1 hard)."""
    idx = torch.tensor(ids[:-1], device=model.embed.weight.device)[None]  # (1, T)
    tgt = torch.tensor(ids[1:], device=idx.device)[None]  # (1, T)
    _, loss = model(idx, tgt, a=a)
    return math.exp(loss.item())


def file_perplexity(model, tok, path: str, n_tokens: int, a: float = 0.0) -> float:
    with open(path, encoding="utf-8", errors="replace") as f:
        ids = tok.encode(f.read())[: n_tokens + 1]
    if len(ids) < 2:
        raise cli.BadInput(f"{path} has fewer than 2 tokens; pick a longer text")
    return perplexity(model, ids, a)


@dataclass
class Flags:
    ckpt: str = ""  # checkpoint to measure; "" = the embedded SmolLM2-135M
    tokens: int = 1024  # tokens of each file to score
    view: str = "dense"  # dense (plain attention), soft or hard (SP-KV gates)
    files: str = ""  # comma list of text files to score; "" = stdlib json/__init__.py and the Apache-2.0 licence


def main(argv):
    o = dataclasses.asdict(Flags())
    o.update(cli.parse(argv, Flags, "perplexity.py"))
    files = o["files"].split(",") if o["files"] else [p for p in DEFAULT_TEXTS if os.path.isfile(p)]
    if o["view"] not in ("dense", "soft", "hard"):
        raise cli.BadInput(f"--view={o['view']} is not one of dense, soft, hard")
    if o["tokens"] < 1:
        raise cli.BadInput(f"--tokens={o['tokens']} must be >= 1")
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        raise cli.BadInput(f"{missing[0]} is not a file; give text files to score")
    model, tok, _ = load_model(o["ckpt"] or default_checkpoint(), dense=o["view"] == "dense")
    if tok is None:
        raise cli.BadInput(f"{o['ckpt']} has no tokenizer; convert it from a folder with tokenizer.json")
    if o["tokens"] > model.cfg.block_size:
        raise cli.BadInput(f"--tokens={o['tokens']} is beyond the model's context of {model.cfg.block_size}")
    model.eval()
    for path in files:
        ppl = file_perplexity(model, tok, path, o["tokens"], 1.0 if o["view"] == "hard" else 0.0)
        print(f"perplexity {ppl:8.3f}  view={o['view']}  {path}")


if __name__ == "__main__":
    cli.run(main, "perplexity.py")
