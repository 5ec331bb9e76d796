"""The one checkpoint format that convert.py writes and train.py / generate.py read.

A checkpoint is a single torch.save'd dict:
    {"format": "spkv-1", "config": GPTConfig as a dict, "model": state_dict,
     "tokenizer": tokenizer spec dict or None, "source": where the weights came from,
     ... training state (optimizer, step, data position) when train.py wrote it}
A gates file (save_gates) holds only the utility predictors of a model, the window they were made
for and a fingerprint of the weights they were fitted to: train.py --gates starts from them instead
of fresh open ones, and only on those weights.
Every file is written atomically: to a temporary file in the same folder, flushed to disk, then
renamed over the old one, so a crash or kill -9 mid-write leaves the previous file intact. The
temporary file's name carries the writer's process id, so the next save removes what a killed
writer left behind.
"""

import errno
import glob
import hashlib
import os
import tempfile
from dataclasses import asdict, fields

import torch

import cli
from model import GPT, GPTConfig
from tokenizer import Tokenizer

FORMAT = "spkv-1"


def atomic_save(obj, path: str):
    """torch.save obj to path so that path always holds either the old or the new complete file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_orphans(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # name the file the disk could not take
            raise OSError(e.errno, e.strerror, path) from e
        raise


def remove_orphans(folder: str):
    """Delete temporary files of saves whose writer is gone (killed mid-write), saying so."""
    orphans = [p for p in glob.glob(os.path.join(folder, ".tmp-*.pt")) if not writer_alive(p)]
    if orphans:
        size = sum(os.path.getsize(p) for p in orphans)
        for p in orphans:
            os.remove(p)
        print(f"checkpoint: removed {len(orphans)} temporary file(s) ({size / 1e6:.1f} MB) of interrupted saves in {folder}")


def writer_alive(tmp: str) -> bool:
    """Whether the process named in .tmp-<pid>-*.pt still runs (names without a pid are orphans)."""
    pid = os.path.basename(tmp).split("-")[1]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def save_checkpoint(path: str, model: GPT, tokenizer_spec, source: str, predictors: bool = True, **extra):
    """predictors=False leaves the utility predictors out (converted weights: they were never
    trained, so load_model makes fresh ones at the init bias asked for)."""
    state = {k: v for k, v in model.state_dict().items() if predictors or ".predictor." not in k}
    atomic_save({"format": FORMAT, "config": asdict(model.cfg), "model": state,
                 "tokenizer": tokenizer_spec, "source": source, **extra}, path)


GATES_FORMAT = "spkv-gates-1"


def weights_fingerprint(model: GPT) -> str:
    """sha256 of every weight but the predictors' (names, dtypes, shapes and bytes), 16 hex digits:
    which pretrained model a gates file was fitted to."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if ".predictor." not in k:
            h.update(f"{k} {v.dtype} {tuple(v.shape)}".encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_gates(path: str, model: GPT, source: str, **extra):
    """The utility predictors alone (a few hundred KB), with the window they were made for and the
    fingerprint of the weights they were fitted to: a start for train.py --gates instead of fresh
    open predictors."""
    state = {k: v for k, v in model.state_dict().items() if ".predictor." in k}
    atomic_save({"format": GATES_FORMAT, "window": model.cfg.window, "fitted_to": weights_fingerprint(model),
                 "predictors": state, "source": source, **extra}, path)


def load_gates(path: str, model: GPT) -> dict:
    """Put a gates file's predictors (save_gates) into model's SP-KV layers; refuse a file made for
    another window, another shape or other weights, naming the fix. Returns the file's dict."""
    if not os.path.isfile(path):
        raise cli.BadInput(f"--gates={path} does not exist; give a gates file (experiments/ceiling.py --ship_gates "
                           "makes one), or --gates= for fresh open predictors (the paper's init)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a foreign or torn file
        raise cli.BadInput(f"--gates={path} is not readable ({type(e).__name__}); give a gates file or --gates=") from e
    if not isinstance(raw, dict) or raw.get("format") != GATES_FORMAT:
        raise cli.BadInput(f"--gates={path} is not a gates file (format {GATES_FORMAT!r}); give one or --gates=")
    if raw["window"] != model.cfg.window:
        raise cli.BadInput(f"--gates={path} was fitted at window {raw['window']}, not {model.cfg.window}; give "
                           f"--window={raw['window']}, or --gates= for fresh open predictors")
    own = {k: v.shape for k, v in model.state_dict().items() if ".predictor." in k}
    given = {k: v.shape for k, v in raw["predictors"].items()}
    if own != given:
        raise cli.BadInput(f"--gates={path} holds predictors of another model ({len(given)} tensors, this model has "
                           f"{len(own)} of other shapes); give --gates= for fresh open predictors")
    own_weights = weights_fingerprint(model)  # hashes every weight: once
    if raw.get("fitted_to") != own_weights:
        raise cli.BadInput(f"--gates={path} was fitted to other weights than this model's (fingerprint "
                           f"{raw.get('fitted_to')}, this model {own_weights}); give --gates= for fresh "
                           "open predictors, or fit gates to this model (experiments/ceiling.py --ship_gates)")
    model.load_state_dict(raw["predictors"], strict=False)
    return raw


def read_checkpoint(path: str) -> dict:
    """Load the raw checkpoint dict, with a clear error for a missing or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; convert one first with "
                                "`python convert.py` (embedded SmolLM2) or pass the right --ckpt path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a foreign or torn file
        raise cli.BadInput(f"{path!r} is not a readable spkv checkpoint ({type(e).__name__}: {e}); "
                         "re-create it with `python convert.py`") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise cli.BadInput(f"{path!r} is not an spkv checkpoint (format {FORMAT!r}); convert it with convert.py")
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
    unknown = sorted(set(cfg) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise cli.BadInput(f"{path} was made by another version of this code (unknown config fields {unknown[:3]}); "
                           "convert or train it again with this one")
    try:
        cfg = GPTConfig(**cfg)
    except ValueError as e:  # GPTConfig refuses knob values out of range (e.g. a tau override)
        raise cli.BadInput(f"{path}: {e}") from None
    model = GPT(cfg, attn_impl=attn_impl)
    check_shapes(model, ckpt["model"], path)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    missing = [k for k in missing if ".predictor." not in k]  # fresh predictors start open
    unexpected = [k for k in unexpected if ".predictor." not in k]  # predictors of now-dense layers
    if missing or unexpected:
        raise cli.BadInput(f"checkpoint {path!r} does not fit its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    tok = Tokenizer(ckpt["tokenizer"]) if ckpt.get("tokenizer") else None
    return model.to(device), tok, ckpt


def mismatched_shapes(model: GPT, state: dict) -> list:
    """'name (given shape) vs (model's shape)' for every tensor of state whose shape is not the model's."""
    own = model.state_dict()
    return [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]


def check_shapes(model: GPT, state: dict, path: str):
    """Refuse a state dict whose tensors have other shapes than the model's, naming the first few."""
    wrong = mismatched_shapes(model, state)
    if wrong:
        raise cli.BadInput(f"{path} holds tensors of another model size ({'; '.join(wrong[:3])}: checkpoint vs model); "
                           "use the --ckpt (or model flags) this checkpoint was made with")
