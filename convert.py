"""Convert pretrained weights into spkv's checkpoint format: the command line of weights.py.

Sources:
  --gguf=PATH     a llama-architecture GGUF file; the default is the embedded SmolLM2-135M-Instruct
  --hf_dir=DIR    a local Hugging Face checkpoint (config.json, *.safetensors, tokenizer.json):
                  Llama 3.x, SmolLM/SmolLM2, Qwen2/2.5, GPT-2
  --hf_repo=ID    download ID from the Hugging Face hub first (needs `huggingface_hub` and a network)
Usage: python convert.py [--gguf=PATH | --hf_dir=DIR | --hf_repo=ID] [--out=PATH]

One writer per --out: while converting, OUT.lock (lockfile.py) holds this process's pid, so a
second convert.py into the same --out is refused in one line, and an --out that exists is never
replaced.
"""

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import cli
import lockfile
from weights import DEFAULT_CKPT, HERE, convert, download_hf, embedded_gguf_path


@dataclass
class Flags:
    gguf: str = ""  # a llama-architecture GGUF file; "" (and no other source) = the embedded SmolLM2
    hf_dir: str = ""  # a local Hugging Face checkpoint folder
    hf_repo: str = ""  # a Hugging Face hub id to download first (needs a network)
    out: str = ""  # checkpoint to write; "" = ckpt/smollm2-135m-instruct.pt (GGUF) or ckpt/model.pt (HF)


def main(argv):
    args = {**dataclasses.asdict(Flags()), **cli.parse(argv, Flags, "convert.py")}
    sources = [k for k in ("gguf", "hf_dir", "hf_repo") if args[k]]
    if len(sources) > 1:
        raise cli.BadInput(f"give one source, not {', '.join('--' + k for k in sources)}")
    out = args["out"] or (DEFAULT_CKPT if not (args["hf_dir"] or args["hf_repo"]) else os.path.join(HERE, "ckpt", "model.pt"))
    with exclusive(out):
        if args["hf_repo"]:
            args["hf_dir"] = download_hf(args["hf_repo"], os.path.join(HERE, "hf", args["hf_repo"].replace("/", "--")))
        if args["hf_dir"]:
            convert(args["hf_dir"], "hf", out)
        else:
            convert(args["gguf"] or embedded_gguf_path(), "gguf", out)


@contextlib.contextmanager
def exclusive(out: str):
    """Hold OUT.lock while writing out: refuse when another process holds it, or when out exists."""
    folder = os.path.dirname(os.path.abspath(out))
    made = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    lock = f"{out}.lock"
    try:
        fd, _ = lockfile.acquire(lock)  # a dead holder's pid needs no word: nothing of its is kept
    except lockfile.Busy as busy:
        raise cli.BadInput(f"{out} is being written by process {busy.holder} (its lock {lock}); wait for it to end, "
                           "or give another --out") from None
    try:
        if os.path.exists(out):
            raise cli.BadInput(f"{out} already exists; delete it first, or give another --out")
        yield
    finally:
        lockfile.release(fd, lock)
        if made and not os.listdir(folder):  # a refused or failed first conversion leaves no empty folder
            os.rmdir(folder)


if __name__ == "__main__":
    cli.run(main, "convert.py")
