"""Perplexity of a checkpoint on real text nobody here wrote: proof that a conversion is right.

A correct SmolLM2-135M load gives single-digit perplexity on Python standard library source
(about 6.7 on json/__init__.py); a wrong RoPE layout gives hundreds.
Usage: python perplexity.py [--ckpt=PATH] [--tokens=1024] [--view=dense|soft|hard] [FILE ...]
"""

import json
import math
import os
import sys

import torch

from checkpoint import load_model

DEFAULT_TEXTS = (os.path.join(os.path.dirname(json.__file__), "__init__.py"),  # stdlib source
                 "/usr/share/common-licenses/Apache-2.0")  # an English licence text


@torch.no_grad()
def perplexity(model, ids: list, view: str = "soft") -> float:
    """exp(mean next-token NLL) of one sequence of ids under the given gate view."""
    idx = torch.tensor(ids[:-1], device=model.embed.weight.device)[None]  # (1, T)
    tgt = torch.tensor(ids[1:], device=idx.device)[None]  # (1, T)
    _, loss = model(idx, tgt, view=view)
    return math.exp(loss.item())


def file_perplexity(model, tok, path: str, n_tokens: int, view: str = "soft") -> float:
    with open(path, encoding="utf-8", errors="replace") as f:
        ids = tok.encode(f.read())[: n_tokens + 1]
    if len(ids) < 2:
        raise ValueError(f"{path} has fewer than 2 tokens; pick a longer text")
    return perplexity(model, ids, view)


def main(argv):
    from convert import default_checkpoint

    opts = dict(a.removeprefix("--").split("=", 1) for a in argv if a.startswith("--"))
    files = [a for a in argv if not a.startswith("--")] or [p for p in DEFAULT_TEXTS if os.path.isfile(p)]
    view = opts.get("view", "dense")
    if view not in ("dense", "soft", "hard"):
        sys.exit(f"perplexity: --view={view} is not one of dense, soft, hard")
    ckpt = opts.get("ckpt") or default_checkpoint()
    model, tok, _ = load_model(ckpt, dense=view == "dense")
    model.eval()
    for path in files:
        ppl = file_perplexity(model, tok, path, int(opts.get("tokens", 1024)), "soft" if view == "dense" else view)
        print(f"perplexity {ppl:8.3f}  view={view}  {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
