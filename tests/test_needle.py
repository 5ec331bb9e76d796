"""experiments/needle.py at tiny size: the fact is said twice at the stated depth in otherwise
untouched text, the value's loss is the model's own loss there, and SP-KV keeping every pair is
full attention, and SP-KV's density at each tau is that of the model's own forward at that tau."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import harness
import measure
import needle
import spkv
from checkpoint import load_model, save_checkpoint
from cli import BadInput
from tiny import shipped_tiny, tiny_checkpoint
from tokenizer import byte_spec


def test_the_fact_is_said_twice_at_the_depth_and_the_text_is_kept():
    rows = torch.from_numpy(np.random.default_rng(0).integers(128, 257, size=(3, 97)))  # no ASCII: facts stand out
    seqs, first, second = needle.haystacks(rows, 30, 2, np.random.default_rng(1))
    line = harness.FACT_LINE
    assert seqs.shape == (6, 97)
    for i, seq in enumerate(seqs.numpy()):
        fact = np.flatnonzero(seq < 128)
        a, b = fact[0], fact[line]  # the two sayings
        assert len(fact) == 2 * line and np.array_equal(seq[a:a + line], seq[b:b + line]) and b + line == 97
        assert b - (a + line) == 30  # depth: haystack text between the sayings
        assert np.array_equal(seq[seq >= 128], rows[i // 2, :97 - 2 * line].numpy())  # the row's text, in order
        n = harness.FACT_VALUE
        assert bytes(seq[first[i]:first[i] + n].astype(np.uint8)).isalnum() and seq[first[i] - 2] == ord(":")
        assert second[i] - first[i] == b - a


def test_value_loss_is_the_models_own_loss_at_the_value(tmp_path):
    ckpt = shipped_tiny(tmp_path, T=96, n=3)
    model = load_model(ckpt, dense=True)[0].eval()
    rows = torch.from_numpy(np.fromfile(tmp_path / "m_heldout.bin", dtype=np.uint16).astype(np.int64)).view(3, 97)
    seqs, _, second = needle.haystacks(rows, 20, 2, np.random.default_rng(0))
    got = needle.value_scores(model, seqs, second, lambda layer, q, k, logit: measure.causal_visible(96), 4)
    with torch.no_grad():
        logits = model(seqs[:, :-1])[0]  # (6, 96, V)
    at = second[:, None] - 1 + torch.arange(harness.FACT_VALUE)  # (6, n)
    pred = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))
    target = seqs.gather(1, at + 1)
    assert got["loss"] == pytest.approx(F.cross_entropy(pred.transpose(1, 2), target).item(), rel=1e-5)
    assert got["retrieved"] == (pred.argmax(-1) == target).all(1).float().mean().item()


def test_spkv_keeping_everything_is_full_attention_and_the_policies_run_at_its_density(tmp_path):
    shipped_tiny(tmp_path, T=96, n=3)
    spkv_ckpt = tiny_checkpoint(tmp_path / "s.pt", window=8)
    (tmp_path / "s.json").write_text((tmp_path / "m.json").read_text())  # its held-out rows: m's
    needle.main([f"--dense={spkv_ckpt}", f"--spkv={spkv_ckpt}", f"--heldout={tmp_path / 'm_heldout.bin'}",
                 "--depths=10,40", "--taus=0.000001,0.5", "--batch_size=4", "--threads=1", f"--out={tmp_path / 'o'}"])
    (path,) = (tmp_path / "o" / "results").glob("needle-*.json")
    res = json.loads(path.read_text())["results"]
    assert path.with_suffix(".png").stat().st_size > 0
    for rows in res.values():
        by = {(r["policy"], r.get("tau")): r for r in rows}
        keep_all = by[("spkv", 0.000001)]
        assert keep_all["density"] == 1.0 and keep_all["value_kept"] == 1.0
        assert keep_all["loss"] == pytest.approx(by[("full", None)]["loss"], rel=1e-5)
        densities = [r["density"] for r in rows if r["policy"] == "spkv"]
        assert sorted(r["density"] for r in rows if r["policy"] == "streaming") == sorted(densities)
        assert by[("window", None)]["loss"] != by[("full", None)]["loss"]


def test_spkv_density_at_each_tau_is_the_models_own_at_that_tau(tmp_path):
    """A later layer's gates read the output of earlier layers, which depends on tau: the density
    reported at each tau must come from that tau's forward, not from one forward at another tau."""
    shipped_tiny(tmp_path, T=96, n=3)
    model = load_model(tiny_checkpoint(tmp_path / "s0.pt", window=8))[0]
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:  # gates that vary by token around u = 0.5, so that the taus below split them
            torch.nn.init.normal_(block.attn.predictor.proj.weight)
            block.attn.predictor.proj.bias.zero_()
    save_checkpoint(str(tmp_path / "s.pt"), model, byte_spec(), source="test")
    (tmp_path / "s.json").write_text((tmp_path / "m.json").read_text())
    taus, depths = (0.45, 0.5, 0.55), (10, 40)
    needle.main([f"--dense={tmp_path / 's.pt'}", f"--spkv={tmp_path / 's.pt'}", f"--heldout={tmp_path / 'm_heldout.bin'}",
                 f"--depths={depths[0]},{depths[1]}", "--taus=0.45,0.5,0.55", "--batch_size=4", "--threads=1",
                 f"--out={tmp_path / 'o'}"])
    (path,) = (tmp_path / "o" / "results").glob("needle-*.json")
    res = json.loads(path.read_text())["results"]
    rows = torch.from_numpy(np.fromfile(tmp_path / "m_heldout.bin", dtype=np.uint16).astype(np.int64)).view(3, 97)
    rng, model = np.random.default_rng(0), model.eval()  # needle.py's facts: seed 0, depth after depth
    for depth in depths:
        seqs, _, _ = needle.haystacks(rows, depth, 2, rng)
        got = {r["tau"]: r["density"] for r in res[str(depth)] if r["policy"] == "spkv"}
        for tau in taus:
            gates = []
            with torch.no_grad():
                model.retune(tau=tau)(seqs[:, :-1], a=1.0, gates=gates)  # each (6, Hkv, T)
            keeps = {layer: spkv.hard_keep(g, tau) for layer, g in zip(model.cfg.spkv_layers(), gates)}
            assert got[tau] == pytest.approx(spkv.density_stats(keeps, 8)["overall"], abs=1e-6)
        assert len(set(got.values())) == len(taus)  # the taus do split the gates


def test_a_depth_that_does_not_fit_is_one_line(tmp_path):
    ckpt = shipped_tiny(tmp_path, T=96, n=3)
    with pytest.raises(BadInput, match="keep each depth at most 59"):
        needle.main([f"--dense={ckpt}", "--depths=60", f"--out={tmp_path / 'o'}"])
    assert not (tmp_path / "o").exists()
