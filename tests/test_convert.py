"""Conversion: tiny Hugging Face checkpoints written by the test give the same logits through our
loader as through the `transformers` implementation; bad checkpoints get clear errors."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import weights  # noqa: E402
from checkpoint import load_model, save_checkpoint  # noqa: E402
from model import GPTConfig  # noqa: E402

V = 300


def tiny_hf(family: str):
    """A tiny random transformers model of one family, as (model, dims)."""
    common = dict(vocab_size=V, num_hidden_layers=2, max_position_embeddings=256)
    if family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                       num_key_value_heads=2, tie_word_embeddings=False, rope_theta=5000.0, **common)
        return transformers.LlamaForCausalLM(cfg)
    if family == "llama3-scaled":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
                                       tie_word_embeddings=True, rope_theta=500000.0, **common,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        return transformers.LlamaForCausalLM(cfg)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                       num_key_value_heads=2, tie_word_embeddings=True, **common)
        return transformers.Qwen2ForCausalLM(cfg)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return transformers.GPT2LMHeadModel(cfg)


def perturb(model):
    """Random, non-trivial values everywhere (biases and norms too), so no term can hide."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def write_bpe_tokenizer(folder, vocab_size=V - 4):
    """A real byte-level BPE tokenizer.json, trained by `tokenizers` on stdlib text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([open(json.__file__).read()], trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}, f)
    return tok


@pytest.mark.parametrize("family", ["llama", "llama3-scaled", "qwen2", "gpt2"])
def test_hf_checkpoint_logits_match_transformers(tmp_path, family):
    hf = perturb(tiny_hf(family)).eval()
    hf.save_pretrained(tmp_path)
    cfg, sd, spec = weights.from_hf_dir(str(tmp_path))
    assert spec is None  # no tokenizer.json written
    idx = torch.randint(0, V, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(idx).logits
        for dense, window in ((True, 128), (False, 200)):  # SP-KV with a window covering T is dense
            cfg_i = GPTConfig(**{**cfg.__dict__, "window": window,
                                 "dense_layers": tuple(range(cfg.n_layer)) if dense else ()})
            ours = weights.build_model(cfg_i, sd).eval()
            got, _ = ours(idx)
            assert (got - want).abs().max().item() <= 1e-4, family


def test_hf_tokenizer_json_round_trip_matches_tokenizers(tmp_path):
    hf_tok = write_bpe_tokenizer(tmp_path)
    perturb(tiny_hf("llama")).save_pretrained(tmp_path)
    out = weights.convert(str(tmp_path), "hf", str(tmp_path / "ckpt.pt"))
    _, tok, raw = load_model(out)
    assert not any(".predictor." in k for k in raw["model"])  # never trained: made fresh where they are used
    texts = [open(os.__file__).read()[:3000], "x  =  1234\n\n\tdef f(a):  return 'it''s'", "héllo wörld 😀"]
    for t in texts:
        assert tok.encode(t) == hf_tok.encode(t).ids
        assert tok.decode(tok.encode(t)) == t
    assert tok.eos_id == hf_tok.token_to_id("<|endoftext|>")


def test_unsupported_architecture_is_refused(tmp_path):
    perturb(tiny_hf("llama")).save_pretrained(tmp_path)
    c = json.load(open(tmp_path / "config.json"))
    c["architectures"] = ["MambaForCausalLM"]
    json.dump(c, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="unsupported architecture 'MambaForCausalLM'"):
        weights.from_hf_dir(str(tmp_path))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json and \\*.safetensors"):
        weights.from_hf_dir(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.from_gguf(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="convert one first"):
        load_model(str(tmp_path / "missing.pt"))


def test_foreign_checkpoint_file_is_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable spkv checkpoint"):
        load_model(str(tmp_path / "junk.pt"))


def test_vocab_embedding_mismatch_is_refused(tmp_path):
    write_bpe_tokenizer(tmp_path, vocab_size=V + 50)  # more tokens than embedding rows
    perturb(tiny_hf("llama")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocab/embedding size mismatch"):
        weights.from_hf_dir(str(tmp_path))


@pytest.mark.parametrize("field,value,message", [("tau", 1.5, "tau=1.5 is outside \\[0, 1\\]"),
                                                 ("tau", -0.1, "outside \\[0, 1\\]"),
                                                 ("window", 0, "window=0 must be >= 1"),
                                                 ("arch", "mamba", "arch='mamba' is not supported")])
def test_bad_config_values_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, **{field: value})


def test_load_time_tau_override_is_validated(tmp_path):
    from model import GPT

    model = GPT(GPTConfig(vocab_size=V, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, n_hidden=64, block_size=64))
    save_checkpoint(str(tmp_path / "m.pt"), model, None, source="test")
    with pytest.raises(ValueError, match="tau=2.0 is outside"):
        load_model(str(tmp_path / "m.pt"), tau=2.0)
    m2, tok, _ = load_model(str(tmp_path / "m.pt"), tau=0.7)
    assert m2.cfg.tau == 0.7 and tok is None


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TOGETHER = """
import os, runpy, sys, time
sys.path.insert(0, os.getcwd())
import convert  # torch and the readers first, so that both processes start converting together
ready, go, *argv = sys.argv[1:]
open(os.path.join(ready, str(os.getpid())), "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
sys.argv = ["convert.py", *argv]
runpy.run_path("convert.py", run_name="__main__")
"""


def test_two_processes_into_one_out_exactly_one_writes(tmp_path):
    """Two real convert.py processes into one --out, released at the same moment: one writes it,
    the other is refused in one line with exit status 2 (the lock, or the file it then finds)."""
    import subprocess
    import sys
    import time

    perturb(tiny_hf("llama")).save_pretrained(tmp_path / "hf")
    out, ready, go = tmp_path / "c.pt", tmp_path / "ready", tmp_path / "go"
    os.makedirs(ready)
    argv = [sys.executable, "-c", START_TOGETHER, str(ready), str(go), f"--hf_dir={tmp_path / 'hf'}", f"--out={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    deadline = time.time() + 120
    while len(os.listdir(ready)) < 2 and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    go.touch()
    results = sorted((p.wait(timeout=120), *p.communicate()) for p in procs)
    assert [r[0] for r in results] == [0, 2], results
    refused = results[1][2].strip().splitlines()
    assert len(refused) == 1 and "Traceback" not in results[1][2], refused
    assert "is being written by process" in refused[0] or "already exists" in refused[0], refused
    assert sum("convert: hf" in r[1] for r in results) == 1  # exactly one wrote it
    assert not os.path.exists(f"{out}.lock")
    load_model(str(out))
