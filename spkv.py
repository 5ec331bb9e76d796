"""SP-KV, the method in one file: the utility predictor, the three gate views, the bias they put on
attention, a dense reference attention that defines correctness, density statistics, and the
calibration of tau to a target density.

Self-Pruned Key-Value attention (arXiv 2605.14037) scores every key/value pair the moment it is
written, per KV head, with u = sigmoid(mlp(x)). Keys inside a local window of `window` tokens are
always visible; an older key s is seen through its gate:

    score[t, s] = q_t . k_s / sqrt(D) + bias[t, s]
    bias[t, s]  = -inf if s > t;  0 if t - s < window;  log u_s otherwise      (training, "soft")
    bias[t, s]  = -inf if s > t;  0 if t - s < window or u_s >= tau;  -inf otherwise   ("hard")

Where the rest of the method lives (METHOD.md tells it section by section):
    model.py   predictor placement: each SP-KV Attention owns a UtilityPredictor that reads the
               attention's normalized input, and adds annealed_log_gate(...) to the scores (section 1)
    train.py   the freeze/anneal schedule: soft gates while the predictor learns, then predictor
               frozen and the anneal weight a going 0 -> 1 (gate_schedule, gates_at; section 4)
    cache.py   write-time eviction: hard_keep decides as a pair is written; a pair leaving the
               local ring goes to the paged store if kept and is dropped for good otherwise (section 6)
    kernels.py the fast attention paths, each tested against reference_attention below

Axis letters used in every shape comment of this project:
    B batch, T query length, S key length, H query heads, Hkv key/value heads (each serves G = H/Hkv
    query heads), D head dim, d model width, L layers.
Everything here is plain PyTorch; the fast paths live in kernels.py and are tested against this file.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

class UtilityPredictor(nn.Module):
    """The per-layer utility predictor: one logit per KV head from the attention's normalized input.

        logit = W2 @ silu(W1 @ x + b1) + b2        x: (B, T, d)  ->  logit: (B, T, Hkv)

    It reads only the token that writes the pair, so the keep decision is known at write time.
    Initialized "open" for adapting a pretrained model: W2 = 0 and b2 = init_bias, so every gate
    starts at sigmoid(init_bias) (0.993 for the default 5) and the model is the pretrained one up to
    a constant log(0.993) bias on old keys.
    """

    def __init__(self, n_embd: int, hidden: int, n_kv_head: int, init_bias: float):
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden)
        self.proj = nn.Linear(hidden, n_kv_head)
        self.init_bias = init_bias
        self.reset_open()

    def reset_open(self):
        """Open every gate: zero output weights, constant output bias (METHOD.md section 1)."""
        nn.init.normal_(self.fc.weight, std=1.0 / math.sqrt(self.fc.in_features))
        nn.init.zeros_(self.fc.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, self.init_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Always in fp32, whatever the dtype of x and of the weights: both are upcast, so a bf16
        model (or bf16 autocast) makes the keep decisions u >= tau of fp32 arithmetic on its weights."""
        x = x.float()
        h = F.silu(F.linear(x, self.fc.weight.float(), self.fc.bias.float()))  # (B, T, hidden)
        return F.linear(h, self.proj.weight.float(), self.proj.bias.float())  # (B, T, Hkv)


# ---------------------------------------------------------------------------------------------
# The three gate views. Each maps logits (B, Hkv, S) to the log-gate added to old keys' scores;
# the annealed one is both ends too (a = 0 soft, a = 1 hard), and the only one the model calls.


def soft_log_gate(logit: torch.Tensor) -> torch.Tensor:
    """Training view: log u, computed as logsigmoid(logit) so it never underflows to log(0)."""
    return F.logsigmoid(logit)


def hard_keep(logit: torch.Tensor, tau: float) -> torch.Tensor:
    """Inference keep decision, keep_s = u_s >= tau. The one definition every path uses (the
    cache included), always computed in fp32 so that bf16 logits do not move the threshold."""
    return torch.sigmoid(logit.float()) >= tau


def hard_log_gate(logit: torch.Tensor, tau: float) -> torch.Tensor:
    """Inference view: 0 for kept keys, -inf for dropped ones."""
    keep = hard_keep(logit, tau)
    return torch.zeros_like(logit).masked_fill(~keep, float("-inf"))


def annealed_log_gate(logit: torch.Tensor, tau: float, a: torch.Tensor) -> torch.Tensor:
    """The log-gate of anneal weight a, the one the model uses (METHOD.md section 4): log u_tilde with
        u_tilde = (1 - a) * u + a * 1[u >= tau],   a going 0 -> 1 over the last steps of training.
    a is a 0-dim tensor in [0, 1] (GPT.forward makes it once per pass, so torch.compile never
    recompiles as a changes): 0 is exactly the soft view, 1 exactly the hard view. Kept keys take
    logaddexp(log(1 - a) + log u, log a); dropped keys log(1 - a) + log u, which is -inf at a = 1,
    so no branch on a and no logaddexp(-inf, -inf), whose gradient would be NaN.
    """
    a = torch.as_tensor(a, dtype=logit.dtype, device=logit.device)
    dropped = torch.log1p(-a) + F.logsigmoid(logit)  # log((1 - a) u)
    return torch.where(hard_keep(logit, tau), torch.logaddexp(dropped, torch.log(a)), dropped)


# ---------------------------------------------------------------------------------------------
# The bias over (query t, key s) and the dense reference attention.


def gate_bias(lg: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Materialize bias[t, s] for every query/key pair.

    lg: (B, Hkv, S) log-gates of the keys; q_pos: (T,) and k_pos: (S,) absolute positions (or
    anything broadcasting to (B, Hkv, T) and (B, Hkv, S): a cache gives each head its own keys).
    Returns (B, Hkv, T, S): -inf where s > t (causal), 0 inside the window (t - s < window, which
    includes s = t, so no row is ever fully masked), lg[s] for keys older than the window.
    """
    rel = q_pos[..., :, None] - k_pos[..., None, :]  # (..., T, S) distance t - s
    old = rel >= window  # keys the gate applies to
    bias = torch.where(old, lg[..., None, :], torch.zeros((), dtype=lg.dtype, device=lg.device))
    return bias.masked_fill(rel < 0, float("-inf"))  # (B, Hkv, T, S)


def reference_attention(q, k, v, lg, window):
    """Dense, materialized SP-KV attention over a full sequence: the definition every fast path is
    tested against. q: (B, H, T, D); k, v: (B, Hkv, T, D); lg: (B, Hkv, T) log-gates, or None for
    plain causal attention. One gate per KV head is shared by the G = H / Hkv query heads of its
    group (GQA).
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    pos = torch.arange(T, device=q.device)
    if lg is None:  # plain causal attention: no key is older than a window of T
        lg, window = torch.zeros(B, Hkv, T, dtype=q.dtype, device=q.device), T
    qg = q.view(B, Hkv, G, T, D)  # (B, Hkv, G, T, D) query heads grouped by their KV head
    scores = qg @ k.unsqueeze(2).transpose(-1, -2) / math.sqrt(D)  # (B, Hkv, G, T, T)
    scores = scores + gate_bias(lg, pos, pos, window).unsqueeze(2).to(scores.dtype)
    out = scores.softmax(dim=-1) @ v.unsqueeze(2)  # (B, Hkv, G, T, D)
    return out.reshape(B, H, T, D)


def reference_gate_grad(q, k, v, lg, window, dout):
    """The gradient of a loss w.r.t. the log-gates lg (B, Hkv, T), given the gradient dout
    (B, H, T, D) of reference_attention's output, in plain tensor ops (the oracle of the gate pass
    in kernels.py):

        dlg_s = sum_{h in group} sum_{t >= s + window} P_h[t, s] (dO_ht . v_s - Delta_ht),
        Delta_ht = dO_ht . O_ht,

    with P_h = softmax of head h's scores and O_h = P_h v. lg_s enters only the scores of the old
    pairs (t - s >= window) of the G query heads that read KV head h // G, each with coefficient
    1, and softmax's backward gives a score the gradient dS[t, s] = P[t, s] (dO_t . v_s - Delta_t).
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    pos = torch.arange(T, device=q.device)
    qg = q.view(B, Hkv, G, T, D)  # (B, Hkv, G, T, D) query heads grouped by their KV head
    scores = qg @ k.unsqueeze(2).transpose(-1, -2) / math.sqrt(D)  # (B, Hkv, G, T, S)
    p = (scores + gate_bias(lg, pos, pos, window).unsqueeze(2).to(scores.dtype)).softmax(dim=-1)
    do = dout.reshape(B, Hkv, G, T, D)
    delta = (do * (p @ v.unsqueeze(2))).sum(-1, keepdim=True)  # (B, Hkv, G, T, 1)
    ds = p * (do @ v.unsqueeze(2).transpose(-1, -2) - delta)  # (B, Hkv, G, T, S) score gradient
    old = (pos[:, None] - pos[None, :]) >= window  # (T, S) the pairs the gate applies to
    return (ds * old).sum(dim=(2, 3))  # (B, Hkv, S)


# ---------------------------------------------------------------------------------------------
# Density: the fraction of pairs older than the window that the hard gates keep.


def kept_counts(keep: torch.Tensor, window: int, lengths=None):
    """Count (kept, total) pairs older than the window, per KV head, at the end of each sequence.

    keep: (B, Hkv, S) booleans; lengths: (B,) valid lengths (default S for every row). A pair at
    position s of a row of length n is "old" when n - 1 - s >= window: it has left the local ring
    and lives in the long-term store only if kept. Returns two (Hkv,) integer tensors.
    """
    B, Hkv, S = keep.shape
    n = torch.full((B,), S, device=keep.device) if lengths is None else lengths.to(keep.device)
    old = torch.arange(S, device=keep.device)[None, :] <= (n[:, None] - 1 - window)  # (B, S)
    old = old[:, None, :].expand(B, Hkv, S)
    return (keep & old).sum(dim=(0, 2)), old.sum(dim=(0, 2))


def density_stats(keeps, window: int, lengths=None) -> dict:
    """Density overall, per layer and per (layer, KV head), from one keep tensor per SP-KV layer.

    keeps: dict {layer index: (B, Hkv, S) bool}. Returns plain Python numbers (nan where no pair is
    old yet, i.e. the sequence is not longer than the window):
        {"overall": float, "per_layer": {l: float}, "per_head": {l: [float] * Hkv},
         "kept": int, "old": int}
    """
    per_layer, per_head, kept_all, old_all = {}, {}, 0, 0
    for layer, keep in keeps.items():
        kept, old = kept_counts(keep, window, lengths)
        per_head[layer] = [k / o if o else float("nan") for k, o in zip(kept.tolist(), old.tolist())]
        per_layer[layer] = kept.sum().item() / old.sum().item() if old.sum() else float("nan")
        kept_all, old_all = kept_all + kept.sum().item(), old_all + old.sum().item()
    overall = kept_all / old_all if old_all else float("nan")
    return {"overall": overall, "per_layer": per_layer, "per_head": per_head, "kept": kept_all, "old": old_all}


# ---------------------------------------------------------------------------------------------
# Calibration: the tau that keeps a target fraction of old pairs (a deployment knob: generate.py's
# --target_density and experiments/tau.py use it)


def tau_for_density(u: torch.Tensor, target: float) -> float:
    """The threshold keeping a `target` fraction of gates: u (N,) pooled over layers, heads and
    old positions of a calibration set; keep = u >= tau, so tau is the (1 - target) quantile."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target density {target} must be in (0, 1]")
    ranked = u.flatten().sort().values
    return float(ranked[min(int((1.0 - target) * ranked.numel()), ranked.numel() - 1)])


@torch.no_grad()
def old_gate_values(model, batches, n_batches, batch_size, gen) -> torch.Tensor:
    """u of every pair older than the window (the ones the gate decides), pooled: (N,)."""
    values, device = [], next(model.parameters()).device
    for _ in range(n_batches):
        x, _ = batches.sample(batch_size, gen)  # (B, T), on the CPU
        gates = []
        model(x.to(device), gates=gates)
        T = x.shape[1]
        old = torch.arange(T, device=device) <= T - 1 - model.cfg.window  # (T,)
        values += [torch.sigmoid(g[..., old].float()).flatten().cpu() for g in gates]
    return torch.cat(values)


def calibrate(model, batches, target, n_batches=4, batch_size=2, seed=0) -> float:
    """tau for `target` density on calibration batches drawn with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return tau_for_density(old_gate_values(model, batches, n_batches, batch_size, gen), target)
