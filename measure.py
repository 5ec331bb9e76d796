"""What a model does on held-out batches: the loss under soft and hard gates, the density the hard
gates keep (per layer and KV head), and per-layer gate statistics; and, beside it, what its dense
base loses under StreamingLLM (sinks + recency) at the same density, the baseline SP-KV must beat.
train.py evaluates with it; experiments/baselines.py builds its other policies on the masks here."""

import torch
import torch.nn.functional as F

import cli
import kernels
import spkv
from checkpoint import load_model
from model import GPT


@torch.no_grad()
def evaluate(model: GPT, batches, n_batches: int, batch_size: int, seed: int, device, autocast) -> dict:
    """Loss under soft and hard gates on n_batches batches drawn with `seed` (the same batches at
    every call), and, for an SP-KV model, its tau, gate statistics and hard-gate density."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    soft = hard = 0.0
    keeps = {layer: [] for layer in model.cfg.spkv_layers()}
    us = {layer: [] for layer in keeps}  # gate values u (B, Hkv, T) per SP-KV layer
    for _ in range(n_batches):
        x, y = (t.to(device) for t in batches.sample(batch_size, gen))
        gates = []
        with autocast:
            soft += model(x, y, a=0.0)[1].item() / n_batches
            hard += model(x, y, a=1.0, gates=gates)[1].item() / n_batches
        for layer, logit in zip(keeps, gates):
            keeps[layer].append(spkv.hard_keep(logit, model.cfg.tau).cpu())
            us[layer].append(torch.sigmoid(logit.float()).cpu())
    model.train()
    out = {"val_soft": soft, "val_hard": hard}
    if keeps:
        out["tau"] = model.cfg.tau  # the threshold of val_hard and density
        out["gates"] = gate_stats(model, {k: torch.cat(v) for k, v in us.items()})
        stats = spkv.density_stats({k: torch.cat(v) for k, v in keeps.items()}, model.cfg.window)
        out.update(density=stats["overall"], density_per_layer=stats["per_layer"],
                   density_per_head=stats["per_head"])
    return out


def gate_stats(model: GPT, us: dict) -> dict:
    """Per SP-KV layer, what the gates do: the mean u over every position, the fraction of
    positions below tau (dropped once old), and the mean output bias b2 of the predictor (where
    the gates started: b2 = predictor_init_bias). us: {layer: (B, Hkv, T) gate values}."""
    return {layer: {"mean_u": u.mean().item(), "below_tau": (u < model.cfg.tau).float().mean().item(),
                    "bias": model.blocks[layer].attn.predictor.proj.bias.mean().item()}
            for layer, u in us.items()}


def report_density(stats: dict):
    """Print per layer x KV head density as a table."""
    if "density_per_head" not in stats:
        return
    print(f"density per layer x KV head (overall {stats['density']:.3f}):")
    for layer, heads in stats["density_per_head"].items():
        print(f"  layer {layer:2d}: " + " ".join(f"{d:.3f}" for d in heads) + f"   | {stats['density_per_layer'][layer]:.3f}")


# ---------------------------------------------------------------------------------------------
# Attention through an explicit visibility mask: the baselines SP-KV is measured against


def old_budget(T: int, window: int, density: float, device=None) -> torch.Tensor:
    """(T,) how many keys older than the window query t may see. A fixed cache, as H2O and
    StreamingLLM run: budget b = round(density * n_old(T - 1)), the old keys at the last query;
    query t sees min(n_old(t), b), so nothing is evicted before the cache is full and the kept
    fraction at the end of the sequence is `density` (the quantity spkv.density_stats measures)."""
    if not 0.0 <= density <= 1.0:
        raise cli.BadInput(f"density {density} must be in [0, 1]")
    n_old = (torch.arange(T, device=device) - window + 1).clamp(min=0)
    return n_old.clamp(max=int(density * max(0, T - window) + 0.5))


def causal_visible(T: int, device=None) -> torch.Tensor:
    """(T, T): key s visible to query t iff s <= t."""
    pos = torch.arange(T, device=device)
    return pos[:, None] >= pos[None, :]


def window_visible(T: int, window: int, device=None) -> torch.Tensor:
    """(T, T): only the local window, t - window < s <= t (the floor every policy shares)."""
    pos = torch.arange(T, device=device)
    rel = pos[:, None] - pos[None, :]
    return (rel >= 0) & (rel < window)


def spkv_visible(logit: torch.Tensor, window: int, tau: float) -> torch.Tensor:
    """(B, Hkv, T, T) SP-KV under hard gates: the window, plus old keys with u >= tau."""
    T = logit.shape[-1]
    keep = spkv.hard_keep(logit, tau)[:, :, None, :]  # (B, Hkv, 1, S)
    return window_visible(T, window, logit.device) | (causal_visible(T, logit.device) & keep)


def streaming_visible(T: int, window: int, density: float, n_sink: int = 4, device=None) -> torch.Tensor:
    """(T, T) StreamingLLM at a budget: of the old keys, the first min(n_sink, budget) (sinks) and
    the most recent ones up to the budget. Same for every head and every sequence."""
    budget = old_budget(T, window, density, device)[:, None]  # (T, 1)
    pos = torch.arange(T, device=device)
    t, s = pos[:, None], pos[None, :]
    old = t - s >= window
    sinks = torch.minimum(budget, torch.tensor(n_sink, device=device))
    recency = (t - window) - s  # 0 for the newest old key
    keep_old = old & ((s < sinks) | (recency < budget - sinks))
    return window_visible(T, window, device) | keep_old


def masked_attention(q, k, v, visible) -> torch.Tensor:
    """Attention where query t sees exactly the keys visible[..., t, :]: kernels.cached_attention
    (GQA folded into the query axis) with the mask as a 0 / -inf bias. q (B, H, T, D); k, v
    (B, Hkv, T, D); visible broadcasting to (B, Hkv, T, T)."""
    B, Hkv, T = k.shape[0], k.shape[1], q.shape[2]
    bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
    return kernels.cached_attention(q, k, v, bias.expand(B, Hkv, T, T), "sdpa")


class MaskedAttention:
    """Answers GPT.forward's cache call (update_and_attend) with masked attention over the whole
    sequence: visible(layer, q, k, logit) -> mask. Nothing is stored; it is a cache only in shape."""

    def __init__(self, visible):
        self.visible = visible

    def update_and_attend(self, layer, q, k, v, logit, pos):
        return masked_attention(q, k, v, self.visible(layer, q, k, logit))


def forward_with_masks(model, idx, visible) -> torch.Tensor:
    """Logits (B, T, V) with layer `layer` attending through visible(layer, q, k, logit)'s mask."""
    return model(idx, cache=MaskedAttention(visible))[0]


@torch.no_grad()
def against_base(model: GPT, base: GPT, batches, density: float, n_batches: int, batch_size: int, seed: int,
                 n_sink: int = 4) -> dict:
    """On the same n_batches val batches (drawn with `seed`): the SP-KV model under hard gates, its
    dense base under full attention, and the base under StreamingLLM (n_sink sinks + recency) at
    `density` of old pairs, in fp32 on the model's device; returns the three losses."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval(), base.eval()
    out = {"spkv_hard": 0.0, "base_full": 0.0, "base_streaming": 0.0}
    for _ in range(n_batches):
        x, y = (t.to(device) for t in batches.sample(batch_size, gen))
        vis = streaming_visible(x.shape[1], base.cfg.window, density, n_sink, device)  # (T, T)
        out["spkv_hard"] += model(x, y, a=1.0)[1].item() / n_batches
        out["base_full"] += base(x, y)[1].item() / n_batches
        logits = forward_with_masks(base, x, lambda layer, q, k, logit: vis)
        out["base_streaming"] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item() / n_batches
    model.train(was_training)
    return out


def report_against_base(r: dict, density: float, label: str):
    """One line per comparison, in % over the base's full attention."""
    pct = lambda k: 100 * (r[k] / r["base_full"] - 1)
    print(f"against {label} (dense, same val batches): full attention {r['base_full']:.4f}; "
          f"SP-KV hard {r['spkv_hard']:.4f} ({pct('spkv_hard'):+.2f}%) at density {density:.3f}; "
          f"StreamingLLM at that density {r['base_streaming']:.4f} ({pct('base_streaming'):+.2f}%)")


def compare_with_base(model: GPT, base_path: str, batches, density: float, n_batches: int, batch_size: int,
                      seed: int) -> dict:
    """against_base with the dense model at base_path (loaded at model's window, on its device),
    printed; returns the three losses."""
    device = next(model.parameters()).device
    base = load_model(base_path, dense=True, window=model.cfg.window)[0].to(device)
    r = against_base(model, base, batches, density, n_batches, batch_size, seed)
    report_against_base(r, density, f"the model it was adapted from ({base_path})")
    return r
