"""Tiny checkpoints and data that tests make themselves (no download, seconds to build)."""

import json
import os

import numpy as np
import torch

from checkpoint import save_checkpoint
from model import GPT, GPTConfig
from tokenizer import byte_spec


def tiny_config(**overrides) -> GPTConfig:
    cfg = dict(vocab_size=257, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_hidden=64, block_size=256,
               window=8, tau=0.5)
    return GPTConfig(**{**cfg, **overrides})


def tiny_checkpoint(path, seed=0, predictors=True, **overrides) -> str:
    """A random tiny model; predictors=False stores none, as convert.py's pretrained weights."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides))
    save_checkpoint(str(path), model, byte_spec(), source="tests/tiny.py", predictors=predictors)
    return str(path)


def tiny_text_dir(folder) -> str:
    """Three real stdlib files as a small corpus (json package source)."""
    os.makedirs(folder, exist_ok=True)
    src = os.path.dirname(json.__file__)
    for name in ("__init__.py", "decoder.py", "encoder.py", "scanner.py"):
        with open(os.path.join(src, name)) as f, open(os.path.join(folder, name + ".txt"), "w") as g:
            g.write(f.read())
    return str(folder)


def shipped_tiny(tmp_path, T=48, n=3):
    """A tiny dense checkpoint with a .json and held-out rows beside it, as pretrain.py ships one."""
    ckpt = tiny_checkpoint(tmp_path / "m.pt", predictors=False, dense_layers=(0, 1))
    rows = np.random.default_rng(0).integers(0, 257, size=(n, T + 1)).astype(np.uint16)
    rows.tofile(tmp_path / "m_heldout.bin")
    (tmp_path / "m.json").write_text(json.dumps({"heldout": {"file": "m_heldout.bin", "shape": [n, T + 1]}}))
    return ckpt
