"""What a model does on held-out batches: the loss under soft and hard gates, the density the hard
gates keep (per layer and KV head), and per-layer gate statistics. train.py evaluates with it."""

import torch

import spkv
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
