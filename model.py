"""A GPT whose attention layers are SP-KV: Llama-family or GPT-2 blocks, chosen by one config.

Config -> RoPE -> Attention (with its utility predictor) -> MLP -> Block -> GPT, as in nanoGPT.
The SP-KV parts (the predictor, the gate views, the bias) come from spkv.py; the attention kernels
from kernels.py. Layers listed in `dense_layers` keep plain causal attention (hybrid layouts; all
layers dense is the baseline every SP-KV number is compared against).
Shapes: B batch, T length, H query heads, Hkv KV heads, D head dim, d = n_embd model width.
"""

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import spkv

ARCHS = ("llama", "gpt2")


@dataclass
class GPTConfig:
    arch: str = "llama"  # "llama": RMSNorm, RoPE, SwiGLU, GQA; "gpt2": LayerNorm, learned positions, GELU
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3  # GQA: each KV head serves n_head // n_kv_head query heads
    n_embd: int = 576
    n_hidden: int = 1536  # MLP hidden width
    block_size: int = 8192  # longest context: RoPE table or learned position embeddings
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_factor: float = 1.0  # Llama-3 RoPE scaling factor; 1.0 means no scaling
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192  # context the scaled model was pretrained at
    qkv_bias: bool = False  # Qwen2 and GPT-2 put biases on q, k, v
    tie_embeddings: bool = True  # output head shares the token embedding
    # SP-KV (METHOD.md): the knobs of the method, all per model
    window: int = 128  # local window w: the last w keys are always visible, never gated
    tau: float = 0.5  # hard-gate threshold: an old key stays iff u >= tau
    predictor_hidden: int = 0  # predictor MLP width; 0 means n_embd // 4
    predictor_init_bias: float = 5.0  # open init: u = sigmoid(5) = 0.993 everywhere
    dense_layers: tuple = field(default_factory=tuple)  # layer indices kept as plain attention

    def __post_init__(self):
        self.dense_layers = tuple(int(i) for i in self.dense_layers)
        if self.predictor_hidden == 0:
            self.predictor_hidden = self.n_embd // 4
        problems = []
        if self.arch not in ARCHS:
            problems.append(f"arch={self.arch!r} is not supported; use one of {ARCHS}")
        if not 0.0 <= self.tau <= 1.0:
            problems.append(f"tau={self.tau} is outside [0, 1]; a gate u is a probability, pick tau in [0, 1]")
        if self.window < 1:
            problems.append(f"window={self.window} must be >= 1 (the current token is always visible)")
        if self.n_head % self.n_kv_head or self.n_embd % self.n_head:
            problems.append(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} "
                            f"and divide n_embd={self.n_embd}")
        if any(not 0 <= i < self.n_layer for i in self.dense_layers):
            problems.append(f"dense_layers={self.dense_layers} must index layers 0..{self.n_layer - 1}")
        if problems:
            raise ValueError("bad model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def spkv_layers(self) -> list:
        return [i for i in range(self.n_layer) if i not in self.dense_layers]


# ---------------------------------------------------------------------------------------------
# Positions


def rope_inv_freq(cfg: GPTConfig, device=None) -> torch.Tensor:
    """RoPE inverse frequencies (D/2,) in float64, with Llama-3 style scaling when rope_factor != 1:
    long wavelengths are slowed by `factor`, short ones kept, the band between interpolated."""
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64, device=device) / D))  # (D/2,)
    if cfg.rope_factor == 1.0:
        return inv
    wavelen = 2 * math.pi / inv
    low_wavelen = cfg.rope_original_context / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_context / cfg.rope_high_freq_factor
    smooth = (cfg.rope_original_context / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    mid = (1 - smooth) * inv / cfg.rope_factor + smooth * inv
    scaled = torch.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
    return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), mid, scaled)


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, D) in the Hugging Face "rotate half" layout: pairs are (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def make_norm(cfg: GPTConfig) -> nn.Module:
    return RMSNorm(cfg.n_embd, cfg.norm_eps) if cfg.arch == "llama" else nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)


@dataclass
class Pass:
    """What every layer of one forward pass reads besides its input; GPT.forward builds it once.
    (One object instead of the same six arguments threaded through Block and Attention.)"""
    pos: torch.Tensor  # (T,) or (B, T) absolute positions of the tokens
    rope: tuple  # (cos, sin) at pos for RoPE; None for GPT-2 (learned positions)
    impl: str  # the kernels.py path that attends without a cache (GPT.attn_impl)
    a: torch.Tensor  # 0-dim gate anneal weight in [0, 1]: 0 soft, 1 hard (spkv.annealed_log_gate)
    frozen: bool = False  # detach the gate logits: the predictor gets no gradient (train.py's anneal phase)
    cache: object = None  # decoding: attention is cache.update_and_attend(...), see cache.py
    gates: list = None  # a list: each SP-KV layer appends its gate logits (B, Hkv, T), in layer order
    mask: object = None  # the flex paths' causal BlockMask, built once per forward outside the (compiled) blocks


class Attention(nn.Module):
    """Multi-head attention with GQA; an SP-KV layer also owns a utility predictor.
    Without a cache it attends over the whole sequence through kernels.attention (training,
    evaluation); with one, the cache stores the new pairs and answers (decoding, gpt-fast style)."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.is_spkv = layer not in cfg.dense_layers
        D, Hkv = cfg.head_dim, cfg.n_kv_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, Hkv * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, Hkv * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * D, cfg.n_embd, bias=cfg.arch == "gpt2")
        if self.is_spkv:
            self.predictor = spkv.UtilityPredictor(cfg.n_embd, cfg.predictor_hidden, Hkv, cfg.predictor_init_bias)

    def qkv(self, x, rope):
        """Project x (B, T, d) to q (B, H, T, D), k and v (B, Hkv, T, D), RoPE applied at their
        positions, and the gate logits (B, Hkv, T) (None for a dense layer)."""
        B, T, _ = x.shape
        D = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, -1, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        logit = self.gate_logits(x) if self.is_spkv else None  # (B, Hkv, T)
        return q, k, v, logit

    def gate_logits(self, x):
        """The predictor reads the same normalized x as q/k/v. It runs in fp32 even under bf16
        autocast or in a bf16 model (spkv.UtilityPredictor.forward upcasts its weights too), so
        that training sees the keep decisions (u >= tau) that decoding makes."""
        with torch.autocast(x.device.type, enabled=False):
            return self.predictor(x).transpose(1, 2)  # (B, Hkv, T)

    def forward(self, x, p: Pass):
        q, k, v, logit = self.qkv(x, p.rope)
        if logit is not None and p.frozen:  # the predictor is frozen while gates anneal: no gradient through it
            logit = logit.detach()
        if logit is not None and p.gates is not None:
            p.gates.append(logit.detach())
        if p.cache is not None:  # the cache writes what the keep rule keeps, and attends with its own kernel
            y = p.cache.update_and_attend(self.layer, q, k, v, logit, p.pos)
        else:
            lg = None if logit is None else spkv.annealed_log_gate(logit, self.cfg.tau, p.a)  # (B, Hkv, T)
            y = kernels.attention(q, k, v, lg, self.cfg.window, p.impl, p.mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class MLP(nn.Module):
    """SwiGLU for Llama-family blocks, GELU (tanh) with biases for GPT-2."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.arch = cfg.arch
        bias = cfg.arch == "gpt2"
        if cfg.arch == "llama":
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.n_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.n_hidden, bias=bias)
        self.down_proj = nn.Linear(cfg.n_hidden, cfg.n_embd, bias=bias)

    def forward(self, x):
        if self.arch == "llama":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, h, p: Pass):
        h = h + self.attn(self.attn_norm(h), p)
        return h + self.mlp(self.mlp_norm(h))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.attn_impl = attn_impl  # which kernels.py path runs attention; see kernels.choose_attention
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.arch == "gpt2":
            self.pos_embed = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)
        self.reset_predictors()  # the generic init above must not close the gates

    def reset_predictors(self):
        """Every utility predictor fresh and open at cfg.predictor_init_bias (METHOD.md section 1)."""
        for m in self.modules():
            if isinstance(m, spkv.UtilityPredictor):
                m.init_bias = self.cfg.predictor_init_bias
                m.reset_open()

    def retune(self, **knobs) -> "GPT":
        """Change SP-KV's deployment knobs (tau, window) of a built model: one new validated config,
        shared by every layer. The one place a config changes after construction; shapes never do."""
        if not set(knobs) <= {"tau", "window"}:
            raise ValueError(f"only tau and window can be retuned, not {sorted(set(knobs) - {'tau', 'window'})}")
        self.cfg = dataclasses.replace(self.cfg, **knobs)  # __post_init__ validates the new values
        for block in self.blocks:
            block.attn.cfg = self.cfg
        return self

    @staticmethod
    def _init_weights(m):
        """Random init for training from scratch (nanoGPT's); converted weights overwrite it."""
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def compile_blocks(self):
        """torch.compile each block in place (regional compilation). The blocks share one code path, so
        the compiled graph is reused across layers and compiling costs about one block's time instead
        of the whole model's (a whole-model compile of the 30-layer SmolLM2 took minutes on an H100)."""
        for block in self.blocks:
            block.compile()

    def flops_per_token(self, T: int) -> float:
        """Training FLOPs per token at sequence length T (nanoGPT's estimate: 6N plus attention)."""
        n = sum(p.numel() for p in self.parameters())
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.n_embd * T

    def predictor_parameters(self) -> list:
        return [p for n, p in self.named_parameters() if ".predictor." in n]

    def rope(self, pos, dtype):
        """cos, sin for positions pos: (T,) -> (T, D), or (B, T) -> (B, 1, T, D), in dtype. The
        angles pos * inv_freq are formed in float64 and cast only after cos/sin: in float32 an
        angle near 30,000 radians is off by up to 2e-3, an error that grows with position."""
        angles = pos.double()[..., None] * rope_inv_freq(self.cfg, pos.device)  # (..., T, D/2) float64
        angles = torch.cat((angles, angles), dim=-1)  # (..., T, D)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        return (cos, sin) if pos.dim() == 1 else (cos[:, None], sin[:, None])

    def embed_tokens(self, idx, pos):
        """Token (and, for GPT-2, position) embeddings; returns h (B, T, d) and the RoPE tables."""
        h = self.embed(idx)  # (B, T, d)
        if self.cfg.arch == "gpt2":
            return h + self.pos_embed(pos), None
        return h, self.rope(pos, torch.promote_types(h.dtype, torch.float32))  # fp32 tables, fp64 in a fp64 model

    def forward(self, idx, targets=None, *, a=0.0, frozen=False, gates=None, cache=None, pos=None, last_only=False):
        """idx (B, T) token ids -> logits (B, T, V) and the mean next-token loss if targets given.

        a: gate anneal weight, a float: 0 soft (training), 1 hard (inference), in between while
           annealing (METHOD.md section 4); frozen: detach the gate logits (the predictor learns nothing).
        gates: optional list; each SP-KV layer appends its gate logits (B, Hkv, T), in layer order.
        cache: decode through a cache.py cache (or anything with the same update_and_attend, like
           baselines.py's masks); pos (B, T) or (T,) are then the tokens' positions (default 0..T-1).
        last_only: logits (B, 1, V) of the last token only (a prefill chunk needs no others).
        """
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context "
                             f"block_size={self.cfg.block_size}; use a shorter seq_len")
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"anneal weight a={a} is outside [0, 1]")
        pos = torch.arange(T, device=idx.device) if pos is None else pos
        h, rope = self.embed_tokens(idx, pos)
        a = torch.tensor(float(a), device=idx.device)  # a tensor: compiled blocks see a value, so no recompile as a moves
        mask = kernels.causal_block_mask(T, str(idx.device)) if cache is None and self.attn_impl.startswith("flex") else None
        p = Pass(pos=pos, rope=rope, impl=self.attn_impl, a=a, frozen=frozen, cache=cache, gates=gates, mask=mask)
        for block in self.blocks:
            h = block(h, p)
        logits = self.lm_head(self.norm(h[:, -1:] if last_only else h))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss


# ---------------------------------------------------------------------------------------------
# Model FLOPs utilization: the GPU's peak, for train.py's MFU


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}  # dense bf16


def peak_flops(device: torch.device, given_tflops: float = 0.0) -> tuple:
    """(peak FLOP/s for MFU or None, how it was found): given_tflops when > 0, else the first
    PEAK_TFLOPS name inside the CUDA device's name; None (no MFU) on CPU or an unknown GPU."""
    if given_tflops > 0:
        return given_tflops * 1e12, f"given: {given_tflops} TFLOP/s"
    if device.type != "cuda":
        return None, "no MFU on CPU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{name}: {tflops:.0f} TFLOP/s bf16 (model.PEAK_TFLOPS)"
    return None, f"{name} is not in model.PEAK_TFLOPS: no MFU logged (give --peak_tflops)"
