"""Every script on bad input: one line naming the input and the fix, exit status 2, no traceback,
and nothing a user had before is replaced. Then the cases where the right answer is behaviour, not
a message: a new run into an old out_dir, a diverged model, a rewritten data source, orphaned
temporary files, a resumed log, strict JSON, end-of-text, the cache report's counts."""

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

import cli
import data as datalib
import generate as G
import lockfile
import run
import train
from checkpoint import atomic_save, read_checkpoint, save_checkpoint
from model import GPT
from tiny import tiny_checkpoint, tiny_config, tiny_text_dir
from tokenizer import Tokenizer, byte_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train", "generate", "perplexity", "tau", "baselines", "plots", "bench_decode", "convert", "synthetic",
           "decode_paths")


def train_flags(base, **kw) -> list:
    flags = dict(ckpt=base / "tiny.pt", data=base / "text", data_cache=base / "cache", out_dir=base / "run",
                 preset="cpu", gates="", seq_len=64, batch_size=2, max_steps=2, warmup_steps=1, eval_every=2, eval_batches=1,
                 ckpt_every=2, window=8, lr=3e-3, device="cpu")
    flags.update(kw)
    return [f"--{k}={v}" for k, v in flags.items()]


def tree_hashes(folder) -> dict:
    """{path: sha256} of every file under folder, the data cache excepted."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if f"{os.sep}cache{os.sep}" not in path:
                out[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny checkpoint, a tiny corpus, a finished two-step run in run/, and broken inputs."""
    base = tmp_path_factory.mktemp("reliability")
    tiny_checkpoint(base / "tiny.pt")
    tiny_checkpoint(base / "wide.pt", n_embd=64)
    tiny_text_dir(base / "text")
    train.main(train_flags(base))
    raw = read_checkpoint(str(base / "tiny.pt"))  # a config that disagrees with its tensors
    raw["config"]["n_hidden"] = 96
    torch.save(raw, base / "mismatch.pt")
    raw = read_checkpoint(str(base / "tiny.pt"))  # a field this version does not know (version skew)
    raw["config"]["bogus_knob"] = 1
    torch.save(raw, base / "skew.pt")
    raw = read_checkpoint(str(base / "tiny.pt"))  # a diverged model: NaN weights
    raw["model"]["blocks.0.mlp.up_proj.weight"][0, 0] = float("nan")
    torch.save(raw, base / "nan.pt")
    tiny_checkpoint(base / "dense.pt", dense_layers=(0, 1))  # a dense run's model: no SP-KV layer
    for name, damage in (("foreign", "log"), ("skewed_run", "config")):  # copies of run/, damaged
        shutil.copytree(base / "run", base / name)
        if damage == "log":
            with open(base / name / "log.jsonl", "a") as f:
                f.write('["not", "a", "record"]\n')
        else:
            raw = read_checkpoint(str(base / name / "ckpt.pt"))
            raw["train_config"]["bogus_knob"] = 1
            torch.save(raw, base / name / "ckpt.pt")
    os.makedirs(base / "plots_done")  # an earlier plots.py run's picture
    (base / "plots_done" / "tau_sweep.png").write_bytes(b"\x89PNG earlier picture")
    (base / "random.gguf").write_bytes(os.urandom(4096))
    write_gguf(base / "gpt2.gguf", "gpt2")
    write_gguf(base / "notok.gguf", "llama")
    for name, config, weights in (("no_config", None, b"x"), ("no_weights", LLAMA_JSON, None),
                                  ("hf_mismatch", LLAMA_JSON, wider_safetensors()),
                                  ("hf_heads", LLAMA_JSON.replace('"num_attention_heads": 4', '"num_attention_heads": 3, '
                                                                  '"num_key_value_heads": 2'), wider_safetensors()),
                                  ("bad_json", "{not json", b"x"), ("torn", LLAMA_JSON, torn_safetensors())):
        os.makedirs(base / name)
        if config is not None:
            (base / name / "config.json").write_text(config)
        if weights is not None:
            (base / name / "model.safetensors").write_bytes(weights)
    return base


LLAMA_JSON = json.dumps(dict(architectures=["LlamaForCausalLM"], vocab_size=300, num_hidden_layers=1, hidden_size=32,
                             num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))


def wider_safetensors() -> bytes:
    """Weights 64 wide where LLAMA_JSON says hidden_size=32: a config.json of another model."""
    from safetensors.torch import save

    return save({"model.embed_tokens.weight": torch.zeros(300, 64), "model.norm.weight": torch.ones(64)})


def torn_safetensors() -> bytes:
    from safetensors.torch import save

    whole = save({"model.embed_tokens.weight": torch.zeros(300, 32)})
    return whole[: len(whole) // 2]


def write_gguf(path, arch):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# (script, argv with {b} for the fixture folder, what the one line must say)
CASES = [
    ("train", "RUN", "already holds a finished run (step 2, final.json); give a new --out_dir"),  # the overwrite case
    ("train", "NEW --device=tpu", "--device='tpu' is not one of"),
    ("train", "NEW --window=64", "--window=64 must be in [1, --seq_len=64)"),
    ("train", "RUN --lr=2", "--lr is given twice"),
    ("train", "NEW --max_stpes=3", "unknown flag --max_stpes; did you mean --max_steps"),
    ("train", "--out_dir={b}/new --resume=True", "--resume=True but {b}/new/ckpt.pt does not exist"),
    ("train", "--out_dir={b}/converted --resume=True", "is a converted checkpoint, not a training run"),
    ("train", "--out_dir={b}/run --resume=True --max_steps=4 --ckpt={b}/wide.pt", "holds tensors of another model size"),
    ("train", "NEW --ckpt={b}/nope.pt", "{b}/nope.pt' does not exist"),
    ("train", "NEW --out_dir={b}/tiny.pt", "--out_dir={b}/tiny.pt is a file; give a folder"),
    ("train", "NEW --data_cache={b}/tiny.pt", "the data cache {b}/tiny.pt (--data_cache) is a file"),
    ("train", "NEW --init=scratch --n_head=3", "n_head=3 must be a multiple of n_kv_head=2"),
    ("train", "NEW --init=scratch --n_kv_head=0", "--n_kv_head=0 must be >= 1"),
    ("train", "NEW --init=scratch --n_embd=0", "--n_embd=0 must be >= 1"),
    ("train", "NEW --init=scratch --n_layer=0", "--n_layer=0 must be >= 1"),
    ("train", "NEW --attn=flex", "--attn=flex has no backward on the CPU"),
    ("train", "NEW --seed=99999999999999999999", "--seed=99999999999999999999 must be below 2**63"),
    ("train", "NEW --predictor_weight_decay=nan", "--predictor_weight_decay=nan must be a finite number >= 0"),
    ("train", "NEW --weight_decay=-1", "--weight_decay=-1.0 must be a finite number >= 0"),
    ("train", "NEW --warmup_steps=-1", "--warmup_steps=-1 must be a finite number >= 0"),
    ("train", "--out_dir={b}/run --resume=True --max_steps=1 --warmup_steps=0", "is at step 2: nothing to do at --max_steps=1"),
    ("train", "--out_dir={b}/run --resume=True", "is at step 2: nothing to do at --max_steps=2"),
    ("train", "--out_dir={b}/foreign --resume=True --max_steps=4", "{b}/foreign/log.jsonl line 3 is not a train.py record"),
    ("train", "--out_dir={b}/skewed_run --resume=True --max_steps=4", "another version of train.py (unknown settings ['bogus_knob'])"),
    ("train", "NEW --ckpt={b}/skew.pt", "{b}/skew.pt was made by another version of this code"),
    ("generate", "--ckpt={b}/skew.pt", "{b}/skew.pt was made by another version of this code"),
    ("generate", "--ckpt={b}/nan.pt", "{b}/nan.pt holds non-finite weights (blocks.0.mlp.up_proj.weight)"),
    ("generate", "--ckpt={b}/dense.pt --tau=0.9", "{b}/dense.pt has no SP-KV layers"),
    ("generate", "--ckpt={b}/tiny.pt --prompt_file={b}/nope.txt", "--prompt_file={b}/nope.txt: cannot read it as UTF-8 text"),
    ("generate", "--ckpt={b}/tiny.pt --prompt_file={b}/tiny.pt", "--prompt_file={b}/tiny.pt: cannot read it as UTF-8 text"),
    ("generate", "--ckpt={b}/tiny.pt --dense=True --target_density=0.5", "--dense=True has no gates"),
    ("generate", "--ckpt={b}/tiny.pt --temperature=1e-40", "--temperature=1e-40 must be 0 (greedy) or"),
    ("generate", "--ckpt={b}/tiny.pt --page_size=1000000000000", "--page_size=1000000000000 is larger than"),
    ("generate", "--ckpt={b}/tiny.pt --chunk=0", "--chunk=0 must be >= 1"),
    ("generate", "--ckpt={b}/tiny.pt --chunk=-3", "--chunk=-3 must be >= 1"),
    ("generate", "--ckpt={b}/tiny.pt --temperature=nan", "--temperature=nan must be 0 (greedy) or a finite number"),
    ("generate", "--ckpt={b}/tiny.pt --temperature=-1", "--temperature=-1.0 must be 0 (greedy) or a finite number"),
    ("generate", "--ckpt={b}/tiny.pt --top_k=-5", "--top_k=-5 must be >= 0"),
    ("generate", "--ckpt={b}/tiny.pt --target_density=1.5", "--target_density=1.5 must be in (0, 1]"),
    ("generate", "--ckpt={b}/mismatch.pt", "holds tensors of another model size"),
    ("generate", "--ckpt={b}/nope.pt", "{b}/nope.pt' does not exist"),
    ("generate", "--ckpt={b}/tiny.pt --max_new_tokens=300", "longer than the model's context of 256"),
    ("perplexity", "--ckpt={b}/nope.pt", "{b}/nope.pt' does not exist"),
    ("perplexity", "--ckpt={b}/tiny.pt --tokns=64", "unknown flag --tokns; did you mean --tokens"),
    ("perplexity", "--ckpt={b}/tiny.pt --files={b}/missing.txt", "{b}/missing.txt is not a file"),
    ("tau", "--ckpt={b}/nope.pt", "{b}/nope.pt' does not exist"),
    ("tau", "--ckpt={b}/tiny.pt --target_density=1.5", "--target_density=1.5 must be in (0, 1]"),
    ("tau", "--ckpt={b}/tiny.pt --data={b}/text", "--seq_len=512 is beyond the model's context of 256"),
    ("tau", "--ckpt={b}/dense.pt --data={b}/text --seq_len=64", "--ckpt={b}/dense.pt has no SP-KV layers"),
    ("tau", "--ckpt={b}/dense.pt --data={b}/text --seq_len=64 --target_density=0.5", "--ckpt={b}/dense.pt has no SP-KV"),
    ("baselines", "--ckpt={b}/tiny.pt --data={b}/text", "--seq_len=512 is beyond the model's context of 256"),
    ("plots", "--ckpt={b}/tiny.pt --data={b}/text --out={b}/plots", "--seq_len=512 is beyond the model's context of 256"),
    ("bench_decode", "--ckpt={b}/tiny.pt --contexts=64 --densities=1.5", "--densities=1.5: every density must be in [0, 1]"),
    ("bench_decode", "--ckpt={b}/tiny.pt --contexts=0", "--contexts=0: every context must be >= 1"),
    ("bench_decode", "--ckpt={b}/tiny.pt --contexts=8", "--contexts=8: every context must be above the model's window of 8"),
    ("baselines", "--ckpt={b}/nope.pt", "{b}/nope.pt' does not exist"),
    ("plots", "--ckpt={b}/nope.pt --out={b}/plots", "{b}/nope.pt' does not exist"),
    ("plots", "--ckpt={b}/tiny.pt --data={b}/text --seq_len=64 --out={b}/plots_done",
     "{b}/plots_done/tau_sweep.png already exists; move it away, or give another --out"),
    ("bench_decode", "--ckpt={b}/nope.pt", "{b}/nope.pt' does not exist"),
    ("bench_decode", "--contexts=2k", "--contexts=2k must be a comma list of ints"),
    ("convert", "--gguf={b}/random.gguf --out={b}/c.pt", "{b}/random.gguf is not a readable GGUF file"),
    ("convert", "--gguf={b}/gpt2.gguf --out={b}/c.pt", "GGUF architecture 'gpt2' is not supported"),
    ("convert", "--gguf={b}/notok.gguf --out={b}/c.pt", "{b}/notok.gguf has no tokenizer"),
    ("convert", "--hf_dir={b}/no_config --out={b}/c.pt", "needs config.json and *.safetensors"),
    ("convert", "--hf_dir={b}/no_weights --out={b}/c.pt", "needs config.json and *.safetensors"),
    ("convert", "--hf_dir={b}/bad_json --out={b}/c.pt", "{b}/bad_json/config.json is not valid JSON"),
    ("convert", "--hf_dir={b}/hf_mismatch --out={b}/c.pt",
     "{b}/hf_mismatch/config.json does not match the weights (embed.weight (300, 64) vs (300, 32); "),
    ("convert", "--hf_dir={b}/hf_heads --out={b}/c.pt", "{b}/hf_heads/config.json: bad model config: n_head=3 must be a multiple"),
    ("convert", "--hf_dir={b}/torn --out={b}/c.pt", "{b}/torn/model.safetensors is not a readable safetensors file"),
    ("convert", "--gguf={b}/random.gguf --out={b}/tiny.pt", "{b}/tiny.pt already exists"),
    ("synthetic", "--out={b} --n_facts=0", "need 0 < n_facts"),
    ("decode_paths", "--bogus=1", "unknown flag --bogus"),
    ("gpu_check", "--dry=True --limit_s=0 --out={b}/gc", "--limit_s=0 must be > 0"),
    ("gpu_check", "--dry=True --parts= --out={b}/gc", "--parts= names no part"),
    ("gpu_check", "--dry=True --parts=train,,train --out={b}/gc", "--parts=train,,train names train twice"),
]


def run_in_process(script, argv, monkeypatch, capsys):
    """The script's __main__ path (cli.run(main)) with argv; returns (exit status, stdout, stderr)."""
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as stop:
        cli.run(module.main, f"{script}.py")
    out, err = capsys.readouterr()
    return stop.value.code, out, err


@pytest.mark.parametrize("script,args,says", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(base, script, args, says, monkeypatch, capsys):
    if "converted" in args and not (base / "converted" / "ckpt.pt").exists():
        os.makedirs(base / "converted")
        shutil.copy(base / "tiny.pt", base / "converted" / "ckpt.pt")
    argv = args.format(b=base).split()
    if argv[0] == "NEW":  # a fresh run, with these flags in place of the usual ones
        argv = train_flags(base, **{"out_dir": base / "new", **dict(a[2:].split("=", 1) for a in argv[1:])})
    elif argv[0] == "RUN":  # the run already in run/, these flags added
        argv = train_flags(base) + argv[1:]
    before = tree_hashes(base)
    monkeypatch.setattr(datalib, "prepare", refuse_to_tokenize) if script in ("generate", "tau") else None
    status, _, err = run_in_process(script, argv, monkeypatch, capsys)
    assert status == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"{script}.py: "), err
    assert says.format(b=base) in err, err
    assert tree_hashes(base) == before


def refuse_to_tokenize(*args, **kwargs):
    raise AssertionError("a flag that cannot work must be refused before any data is tokenized")


@pytest.mark.parametrize("argv,says", [(["train.py"], "already holds a finished run"),
                                       (["generate.py", "--chunk=0"], "--chunk=0 must be >= 1")])
def test_the_line_comes_from_the_real_command(base, argv, says):
    extra = train_flags(base) if argv[0] == "train.py" else [f"--ckpt={base / 'tiny.pt'}"]
    before = tree_hashes(base / "run")
    res = subprocess.run([sys.executable, *argv, *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert tree_hashes(base / "run") == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag_with_default_and_meaning(script, monkeypatch, capsys):
    module = importlib.import_module(script)
    flags_class = train.TrainConfig if script == "train" else module.Flags
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    with pytest.raises(SystemExit) as stop:
        cli.run(module.main, f"{script}.py")
    out = capsys.readouterr().out
    assert stop.value.code == 0
    for name, meaning in cli.meanings(flags_class).items():
        assert meaning, f"{script}.py --{name} has no comment to print"
        assert any(line.strip().startswith(f"--{name}=") and line.rstrip().endswith(meaning)
                   for line in out.splitlines()), name
    path = os.path.join(ROOT, f"{script}.py")
    path = path if os.path.exists(path) else os.path.join(ROOT, "experiments", f"{script}.py")
    assert "cli.run(main" in open(path).read()


def test_dense_baseline_has_its_own_default_out_dir():
    assert train.parse_flags([])[0].out_dir == "out/spkv"
    assert train.parse_flags(["--dense=True"])[0].out_dir == "out/dense"


def test_diverged_model_never_replaces_the_checkpoint(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    before = tree_hashes(run)["" + str(run / "ckpt.pt")]
    with pytest.raises(cli.BadInput, match=f"not saved, {run}/ckpt.pt still holds step 2"):
        train.main([f"--out_dir={run}", "--resume=True", "--lr=1e6", "--max_steps=4", "--ckpt_every=1"])
    assert tree_hashes(run)[str(run / "ckpt.pt")] == before


def test_diverged_first_save_says_no_checkpoint_exists(base, tmp_path):
    with pytest.raises(cli.BadInput, match="no checkpoint exists yet"):
        train.main(train_flags(base, out_dir=tmp_path / "new", lr=1e6, ckpt_every=1))
    assert not (tmp_path / "new" / "ckpt.pt").exists()


def test_resume_drops_log_records_past_the_checkpoint_and_says_so(base, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    with open(run / "log.jsonl", "a") as f:  # what a run killed after step 2's save wrote on
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + json.dumps({"step": 4, "loss": 1.0}) + "\n{\"st")
    train.main([f"--out_dir={run}", "--resume=True", "--max_steps=4"])
    assert "; dropped 3 log records past it" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in open(run / "log.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_a_log_counted_from_zero_is_renumbered_on_resume(base, tmp_path, capsys):
    """An older train.py logged each step's index (0 for the first): resumed, its records count
    steps done like the new ones, so no step appears twice."""
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    old = [{**json.loads(line), "step": json.loads(line)["step"] - 1} for line in open(run / "log.jsonl")]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old + [{"step": 2, "loss": 1.0}]))
    train.main([f"--out_dir={run}", "--resume=True", "--max_steps=4"])
    assert "counted steps from 0 (an older train.py); renumbered" in capsys.readouterr().out
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[1]["loss"] == old[1]["loss"]


def test_logs_are_strict_json(base, tmp_path):
    run.log_line(str(tmp_path / "log.jsonl"), {"step": 0, "density": float("nan"), "per": {"0": [float("inf")]}})
    strict = dict(parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert json.loads(open(tmp_path / "log.jsonl").read(), **strict) == {"step": 0, "density": None, "per": {"0": [None]}}
    for line in open(base / "run" / "log.jsonl"):
        json.loads(line, **strict)
    json.loads(open(base / "run" / "final.json").read(), **strict)


def test_rewritten_or_deleted_source_is_never_read_from_the_cache(tmp_path, capsys):
    tok, src, cache = Tokenizer(byte_spec()), tmp_path / "corpus.txt", tmp_path / "cache"
    src.write_text("first version of the text. " * 40)
    folder = datalib.prepare(str(src), tok, str(cache))
    first = open(os.path.join(folder, "train.bin"), "rb").read()
    src.write_text("a rewritten, longer second version. " * 400)
    assert datalib.prepare(str(src), tok, str(cache)) == folder
    assert "changed since it was tokenized" in capsys.readouterr().out
    second = open(os.path.join(folder, "train.bin"), "rb").read()
    assert second != first and len(second) > 5 * len(first)
    os.remove(src)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datalib.prepare(str(src), tok, str(cache))


def test_a_data_folder_is_read_once_without_its_own_cache_or_runs(tmp_path, capsys):
    """A symlink loop is walked once; the token cache and a run folder inside --data are outputs,
    not text: skipped (and said), so a second prepare reuses the cache instead of re-tokenizing."""
    tok, text = Tokenizer(byte_spec()), tmp_path / "text"
    tiny_text_dir(text)
    os.symlink(".", text / "loop")  # text/loop/loop/... is text again
    os.makedirs(text / "out")
    (text / "out" / "log.jsonl").write_text('{"step": 0}\n')
    files = datalib.source_files(str(text), str(text / "cache"))
    assert len(files) == len({os.path.realpath(f) for f in files}) == 4
    folder = datalib.prepare(str(text), tok, str(text / "cache"))
    assert "skipping 1 folder(s) of outputs" in capsys.readouterr().out
    assert datalib.prepare(str(text), tok, str(text / "cache")) == folder
    assert "changed since it was tokenized" not in capsys.readouterr().out


def test_a_token_file_shorter_than_its_meta_is_refused(tmp_path):
    tok, src = Tokenizer(byte_spec()), tmp_path / "corpus.txt"
    src.write_text("some text to tokenize. " * 200)
    folder = datalib.prepare(str(src), tok, str(tmp_path / "cache"))
    path = os.path.join(folder, "train.bin")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(cli.BadInput, match="train.bin holds .* tokens but its meta.json says"):
        datalib.Batches(folder, "train", 32)


def test_one_process_tokenizes_into_a_cache_folder_and_another_waits_for_it(tmp_path, capsys):
    """While the cache folder's lock is held (as by a process tokenizing into it), prepare waits and
    writes nothing; once it is released, prepare tokenizes and returns the folder."""
    tok, src, cache = Tokenizer(byte_spec()), tmp_path / "corpus.txt", tmp_path / "cache"
    src.write_text("text two processes want at once. " * 40)
    os.makedirs(cache)
    key = hashlib.sha256(f"{datalib.tokenizer_id(tok.spec)}|{os.path.abspath(src)}".encode()).hexdigest()[:12]
    fd, _ = lockfile.acquire(str(cache / key) + ".lock")
    done = []
    waiter = threading.Thread(target=lambda: done.append(datalib.prepare(str(src), tok, str(cache))))
    waiter.start()
    waiter.join(timeout=2)
    assert waiter.is_alive() and not os.path.exists(cache / key / "meta.json")
    assert "data: waiting for process" in capsys.readouterr().out
    lockfile.release(fd, str(cache / key) + ".lock")
    waiter.join(timeout=60)
    assert done == [str(cache / key)] and os.path.isfile(cache / key / "meta.json")


def test_leftover_and_failed_cache_writes_are_removed(tmp_path):
    tok, src, cache = Tokenizer(byte_spec()), tmp_path / "corpus.txt", tmp_path / "cache"
    src.write_text("some text to tokenize. " * 40)
    folder = datalib.prepare(str(src), tok, str(cache))
    open(os.path.join(folder, "train.bin.tmp"), "wb").write(b"\0" * 1000)  # a killed run's leftover
    src.write_text("changed text, tokenized again. " * 40)
    datalib.prepare(str(src), tok, str(cache))
    assert not os.path.exists(os.path.join(folder, "train.bin.tmp"))
    os.symlink("/dev/full", os.path.join(folder, "val.bin.tmp"))  # writes there fail: no space left
    with pytest.raises(OSError) as full:
        datalib.write_split(os.path.join(folder, "val.bin"), ["text"], tok, "uint16")
    assert full.value.errno == 28 and not os.path.lexists(os.path.join(folder, "val.bin.tmp"))


def test_disk_full_is_one_line(monkeypatch, capsys):
    def fill_the_disk(argv):
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 100_000)

    monkeypatch.setattr(sys, "argv", ["x.py"])
    with pytest.raises(SystemExit) as stop:
        cli.run(fill_the_disk, "x.py")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "no space left on the device" in err and len(err.strip().splitlines()) == 1


def test_orphaned_temporary_checkpoints_are_removed_on_the_next_save(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".tmp-{int(dead.stdout)}-abc.pt"  # its writer has exited: killed mid-save
    old_style = tmp_path / ".tmp-k2j4h1.pt"
    live = tmp_path / f".tmp-{os.getpid()}-xyz.pt"  # a save in progress in a running process
    for p in (orphan, old_style, live):
        p.write_bytes(b"\0" * 1000)
    atomic_save({"format": "spkv-1"}, str(tmp_path / "ckpt.pt"))
    assert not orphan.exists() and not old_style.exists() and live.exists()
    assert "removed 2 temporary file(s)" in capsys.readouterr().out


def test_decoding_stops_at_end_of_text_and_counts_what_the_cache_holds():
    torch.manual_seed(0)
    model = GPT(tiny_config(tau=0.0)).eval()  # tau = 0 keeps every pair: density must be exactly 1
    prompt = list(range(40))
    tokens, _, _ = G.generate(model, [prompt], 10)
    eos = int(tokens[0, 3])
    stopped, _, cache = G.generate(model, [prompt], 10, eos_id=eos)
    first = tokens[0].tolist().index(eos) + 1
    assert stopped[0].tolist() == tokens[0, :first].tolist()
    held = len(prompt) + stopped.shape[1] - 1  # the last sampled token is never run through the model
    assert int(cache.ring_pos[0].max()) + 1 == held
    c = model.cfg
    rep = G.cache_report(cache, [held], 2 * c.head_dim * 4, c.n_layer, c.n_kv_head)
    assert rep["density"] == 1.0 and rep["pairs"] == rep["dense_pairs"] == held * c.n_layer * c.n_kv_head


def test_prompt_of_only_undroppable_characters_is_named(tmp_path, capsys):
    spec = byte_spec()
    spec["pieces"][4] = None  # a vocabulary without byte 0x04, like SmolLM2's
    model = GPT(tiny_config())
    save_checkpoint(str(tmp_path / "t.pt"), model, spec, source="test")
    with pytest.raises(cli.BadInput, match="only characters this vocabulary cannot encode"):
        G.main([f"--ckpt={tmp_path / 't.pt'}", "--prompt=\x04\x04", "--chat=False"])
    assert "dropped 2 character(s)" in capsys.readouterr().out
