"""Training data: text tokenized once into uint16/uint32 memmaps, then random windows (nanoGPT).

Sources (train.py's --data):
  ""            the Python standard library source of the running interpreter, split by file
  a text file   split by position: the first 90% train, the rest val
  a folder      every text file under it, split by file (binary files are skipped, with a note;
                each real folder is read once, symlink loops included; a token cache or a run folder
                inside it is skipped, with a note)
  a prepared folder holding train.bin, val.bin and meta.json (from an earlier run)
The cache folder's name hashes the tokenizer and the source path; meta.json records the
tokenizer's identity and a fingerprint of the source's contents (each file's size, mtime and a
hash of its head), so a cache made with another tokenizer, or from a file since rewritten or
deleted, is never reused. A rewritten source is tokenized again into the same folder. A token
file whose length disagrees with its meta.json (cut short) is refused. One process tokenizes into
a cache folder at a time (its .lock, lockfile.py); another that needs it waits, then reuses it.
"""

import glob
import hashlib
import json
import os
import sysconfig

import numpy as np
import torch

import cli
import lockfile

VAL_EVERY = 10  # every 10th file (sorted) goes to the validation split
DEFAULT_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_cache")
HEAD_BYTES = 1 << 16  # how much of each source file the fingerprint hashes


def tokenizer_id(spec: dict) -> str:
    """A short hash that changes whenever the tokenizer would encode differently."""
    h = hashlib.sha256(spec["pattern"].encode())
    for p in spec["pieces"]:
        h.update(b"\0" if p is None else p + b"\1")
    return h.hexdigest()[:16]


def stdlib_files() -> list:
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    skip = ("site-packages", f"{os.sep}test{os.sep}", "idlelib", "lib2to3")
    return sorted(f for f in files if not any(s in f for s in skip))


def read_text(path: str):
    """File contents as text, or None if it is binary (NUL bytes or not UTF-8)."""
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


RUN_MARKS = ("log.jsonl", "ckpt.pt", "lock")  # a folder holding one is a training run, not text


def source_files(data: str, cache_root: str = DEFAULT_CACHE) -> list:
    """The files a data argument names: stdlib source, every file under a folder, or one file."""
    if data == "":
        return stdlib_files()
    if os.path.isdir(data):
        return folder_files(data, cache_root)
    if os.path.isfile(data):
        return [data]
    raise FileNotFoundError(f"--data={data} does not exist; give a text file, a folder, or omit it for stdlib")


def folder_files(data: str, cache_root: str) -> list:
    """Every file under data, each real folder visited once (a symlink loop is walked once), with
    the token cache and any run folder inside it skipped, and said: they are outputs, not text."""
    seen, files, skipped = set(), [], []
    for root, dirs, names in os.walk(data, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        outputs = any(m in names for m in RUN_MARKS) or {"meta.json", "train.bin"} <= set(names)  # a run, a cache
        if real == os.path.realpath(cache_root) or (root != data and outputs):
            skipped.append(root)
            dirs[:] = []
            continue
        dirs[:] = sorted(n for n in dirs if not n.startswith("."))  # as glob's "*": hidden names are not text
        files += [os.path.join(root, n) for n in names if not n.startswith(".") and os.path.isfile(os.path.join(root, n))]
    if skipped:
        print(f"data: skipping {len(skipped)} folder(s) of outputs inside --data={data}, e.g. {skipped[0]}")
    return sorted(files)


def fingerprint(files: list) -> str:
    """A hash of each file's path, size, mtime and first HEAD_BYTES: changes when a file is rewritten."""
    h = hashlib.sha256()
    for path in files:
        st = os.stat(path)
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}|".encode())
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read(HEAD_BYTES)).digest())
    return h.hexdigest()[:16]


def split_sources(data: str, files: list):
    """(train texts, val texts, description) for a data argument and its source_files."""
    if data and os.path.isfile(data):
        text = read_text(data)
        if text is None:
            raise cli.BadInput(f"--data={data} is a binary file; give a UTF-8 text file, a folder of them, "
                             "or a prepared folder with train.bin/val.bin/meta.json")
        if not text.strip():
            raise cli.BadInput(f"--data={data} is empty; give a text file with content")
        cut = int(len(text) * 0.9)
        return [text[:cut]], [text[cut:]], data
    texts = [(f, read_text(f)) for f in files]
    binary = [f for f, t in texts if t is None]
    if binary:
        print(f"data: skipping {len(binary)} binary files, e.g. {binary[0]}")
    texts = [t for _, t in texts if t and t.strip()]  # empty files carry nothing
    if len(texts) < 2:
        raise cli.BadInput(f"--data={data or 'stdlib'} is empty or nearly: {len(texts)} non-empty text files; need at least 2 "
                         "(one for training, one for validation), or pass a single text file")
    val_every = min(VAL_EVERY, len(texts))
    train = [t for i, t in enumerate(texts) if i % val_every != val_every - 1]
    val = [t for i, t in enumerate(texts) if i % val_every == val_every - 1]
    return train, val, data or "stdlib"


def write_split(path: str, texts: list, tok, dtype) -> tuple:
    """Tokenize texts into path (via path.tmp, removed if the write fails); returns (tokens, characters
    dropped because the vocabulary lacks one of their bytes)."""
    ids, dropped = [], 0
    for t in texts:
        ids.extend(tok.encode(t))
        dropped += tok.dropped(t)
        if tok.eos_id is not None:
            ids.append(tok.eos_id)  # documents are separated by end-of-text
    arr = np.array(ids, dtype=dtype)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(arr.data)  # (not arr.tofile: its disk-full error carries no errno)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return len(arr), dropped


def remove_leftovers(folder: str):
    """Delete *.tmp files a killed or failed tokenization left in a cache folder."""
    for tmp in glob.glob(os.path.join(folder, "*.tmp")):
        print(f"data: removing {tmp}, left by an interrupted tokenization")
        os.remove(tmp)


def prepare(data: str, tok, cache_root: str = DEFAULT_CACHE) -> str:
    """Tokenize `data` once; return the folder holding train.bin, val.bin, meta.json."""
    tid = tokenizer_id(tok.spec)
    if os.path.exists(cache_root) and not os.path.isdir(cache_root):
        raise cli.BadInput(f"the data cache {cache_root} (--data_cache) is a file; give a folder")
    if data and os.path.isfile(os.path.join(data, "meta.json")):
        with open(os.path.join(data, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("tokenizer_id") != tid:
            raise cli.BadInput(f"prepared data in {data} was made with tokenizer {meta.get('tokenizer_id')}, "
                             f"this model's is {tid}; point --data at the raw text to re-tokenize")
        return data
    key = hashlib.sha256(f"{tid}|{os.path.abspath(data) if data else 'stdlib'}".encode()).hexdigest()[:12]
    folder = os.path.join(cache_root, key)
    files = source_files(data, cache_root)
    os.makedirs(cache_root, exist_ok=True)
    try:  # a dead holder's pid needs no word: it left no meta.json, so its folder is tokenized again
        fd, _ = lockfile.acquire(folder + ".lock")
    except lockfile.Busy as busy:
        print(f"data: waiting for process {busy.holder}, which is tokenizing into {folder}")
        fd, _ = lockfile.acquire(folder + ".lock", wait=True)
    try:
        return tokenize_once(data, tok, tid, folder, files)
    finally:
        lockfile.release(fd, folder + ".lock")


def tokenize_once(data: str, tok, tid: str, folder: str, files: list) -> str:
    """The cache folder for files, tokenized into it unless its meta.json matches their fingerprint."""
    content = fingerprint(files)
    meta_path = os.path.join(folder, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            if json.load(f).get("fingerprint") == content:
                return folder
        print(f"data: {data or 'stdlib'} changed since it was tokenized into {folder}; tokenizing it again")
        os.remove(meta_path)  # the folder is incomplete until the new meta.json is written
    train, val, desc = split_sources(data, files)
    os.makedirs(folder, exist_ok=True)
    remove_leftovers(folder)
    dtype = np.uint16 if tok.n_vocab <= 2**16 else np.uint32
    n_train, dropped_train = write_split(os.path.join(folder, "train.bin"), train, tok, dtype)
    n_val, dropped_val = write_split(os.path.join(folder, "val.bin"), val, tok, dtype)
    if n_train == 0 or n_val == 0:
        raise cli.BadInput(f"--data={desc} tokenized to {n_train} train / {n_val} val tokens; it is empty")
    meta = {"tokenizer_id": tid, "fingerprint": content, "dtype": np.dtype(dtype).name, "source": desc,
            "train_tokens": n_train, "val_tokens": n_val, "dropped_chars": dropped_train + dropped_val}
    with open(meta_path + ".tmp", "w") as f:  # written last: marks the cache complete
        json.dump(meta, f)
    os.replace(meta_path + ".tmp", meta_path)
    print(f"data: tokenized {desc}: {n_train:,} train / {n_val:,} val tokens -> {folder}"
          + (f"; dropped {meta['dropped_chars']:,} characters with bytes the vocabulary lacks" if meta["dropped_chars"] else ""))
    return folder


class Batches:
    """Random windows of seq_len + 1 tokens from one split, drawn from an explicit generator whose
    state is saved in checkpoints (the data position), so a resumed run sees the same batches.
    Where windows may start is window_starts(): anywhere, as nanoGPT; a subclass may draw otherwise."""

    def __init__(self, folder: str, split: str, seq_len: int):
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        path = os.path.join(folder, f"{split}.bin")
        n = os.path.getsize(path) / np.dtype(meta["dtype"]).itemsize
        if n != meta.get(f"{split}_tokens", n) or n < 1:
            raise cli.BadInput(f"{path} holds {n:,.1f} tokens but its meta.json says {meta.get(f'{split}_tokens')}: "
                               f"it was cut short or changed; delete {folder} to tokenize the source again")
        self.tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
        self.seq_len = seq_len
        if len(self.tokens) <= seq_len + 1:
            raise cli.BadInput(f"the {split} split has {len(self.tokens)} tokens, too few for seq_len={seq_len}; "
                             "use more data or a shorter --seq_len")

    def window_starts(self, n: int, gen: torch.Generator) -> list:
        """n positions to start windows at: uniform over 0 .. len - seq_len - 2 (nanoGPT)."""
        return torch.randint(len(self.tokens) - self.seq_len - 1, (n,), generator=gen).tolist()

    def sample(self, n: int, gen: torch.Generator):
        """n windows: x, y of shape (n, seq_len), y shifted by one."""
        ix = self.window_starts(n, gen)
        rows = np.stack([self.tokens[i:i + self.seq_len + 1].astype(np.int64) for i in ix])  # (n, T + 1)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]
