"""The one checkpoint format that convert.py writes and train.py / generate.py read.

A checkpoint is a single torch.save'd dict:
    {"format": "spkv-1", "config": GPTConfig as a dict, "model": state_dict,
     "tokenizer": tokenizer spec dict or None, "source": where the weights came from,
     ... training state (optimizer, step, data position) when train.py wrote it}
It is always written atomically: to a temporary file in the same folder, flushed to disk, then
renamed over the old one, so a crash or kill -9 mid-write leaves the previous file intact.
"""

import os
import tempfile
from dataclasses import asdict

import torch

from model import GPT, GPTConfig
from tokenizer import Tokenizer

FORMAT = "spkv-1"


def atomic_save(obj, path: str):
    """torch.save obj to path so that path always holds either the old or the new complete file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path: str, model: GPT, tokenizer_spec, source: str, **extra):
    atomic_save({"format": FORMAT, "config": asdict(model.cfg), "model": model.state_dict(),
                 "tokenizer": tokenizer_spec, "source": source, **extra}, path)


def read_checkpoint(path: str) -> dict:
    """Load the raw checkpoint dict, with a clear error for a missing or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; convert one first with "
                                "`python convert.py` (embedded SmolLM2) or pass the right --ckpt path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable spkv checkpoint ({type(e).__name__}: {e}); "
                         "re-create it with `python convert.py`") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an spkv checkpoint (format {FORMAT!r}); convert it with convert.py")
    return ckpt


def load_model(path: str, device="cpu", attn_impl="sdpa", dense=False, **config_overrides):
    """Checkpoint -> (GPT on device, Tokenizer or None, raw checkpoint dict).

    dense=True makes every layer plain attention (the baseline). config_overrides change SP-KV
    knobs at load time (e.g. tau, window), never shapes. Layers without stored predictors that
    are asked to be SP-KV get open predictors.
    """
    ckpt = read_checkpoint(path)
    cfg = {**ckpt["config"], **config_overrides}
    if dense:
        cfg["dense_layers"] = tuple(range(cfg["n_layer"]))
    cfg = GPTConfig(**cfg)
    model = GPT(cfg, attn_impl=attn_impl)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    missing = [k for k in missing if ".predictor." not in k]  # fresh predictors start open
    unexpected = [k for k in unexpected if ".predictor." not in k]  # predictors of now-dense layers
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not fit its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    tok = Tokenizer(ckpt["tokenizer"]) if ckpt.get("tokenizer") else None
    return model.to(device), tok, ckpt
