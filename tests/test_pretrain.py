"""experiments/pretrain.py: the planted spans are copies of earlier text at the stated distances, a
run split into stages is the straight run, each stage leaves a snapshot and its bar, and a --out made
with another recipe is refused."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import harness
import measure
import pretrain
from checkpoint import load_model
from cli import BadInput
from tiny import tiny_text_dir


@given(st.integers(200, 3000), st.integers(0, 10**6), st.integers(1, 16), st.integers(0, 16), st.integers(0, 80))
def test_planted_spans_copy_earlier_text(n, seed, span_min, span_extra, dist_extra):
    o = dict(plant_every=50, span_min=span_min, span_max=span_min + span_extra, dist_min=span_min + span_extra,
             dist_max=span_min + span_extra + dist_extra)
    tokens = np.random.default_rng(seed).integers(0, 257, n).astype(np.uint16)
    rng = np.random.default_rng(seed + 1)
    out, planted = pretrain.plant_spans(tokens, rng, o)
    assert out.dtype == tokens.dtype and len(out) == n + planted
    # walk the stream: text between cuts is the original in order; each insert is an earlier span
    cuts = np.arange(max(50, o["dist_max"]), n, 50)
    replay = np.random.default_rng(seed + 1)
    lengths = replay.integers(o["span_min"], o["span_max"] + 1, len(cuts))
    dists = replay.integers(o["dist_min"], o["dist_max"] + 1, len(cuts))
    i, start, text = 0, 0, []
    for c, L, d in zip(cuts, lengths, dists):
        text.append(out[i:i + c - start])
        i += c - start
        assert np.array_equal(out[i:i + L], tokens[c - d:c - d + L]) and c - d + L <= c
        i, start = i + L, c
    text.append(out[i:])
    assert np.array_equal(np.concatenate(text), tokens)


@given(st.integers(300, 3000), st.integers(0, 10**6), st.integers(10, 40), st.integers(0, 60), st.integers(0, 60))
def test_planted_facts_are_said_twice_at_the_stated_distance(n, seed, every, dist_min, dist_extra):
    o = dict(fact_every=every, fact_dist_min=dist_min, fact_dist_max=dist_min + dist_extra)
    tokens = np.random.default_rng(seed).integers(128, 257, n).astype(np.uint16)  # no byte of a fact line (ASCII)
    out, planted = pretrain.plant_facts(tokens, np.random.default_rng(seed + 1), o)
    assert out.dtype == tokens.dtype and len(out) == n + planted
    text = out >= 128
    assert np.array_equal(out[text], tokens)  # the text, in order, between the insertions
    size = harness.FACT_LINE
    starts = np.flatnonzero(~text)[::size]  # facts are whole lines, back to back where two meet
    lines = [bytes(out[a:a + size].astype(np.uint8)) for a in starts]
    assert len(lines) == 2 * len(np.arange(every, n - o["fact_dist_max"], every)) and planted == len(lines) * size
    text_before = np.cumsum(text)  # text tokens up to and including each position
    for line in set(lines):
        first, second = [a for a, l in zip(starts, lines) if l == line]
        assert line.startswith(b"\n# ") and line.endswith(b"\n")
        assert o["fact_dist_min"] <= text_before[second] - text_before[first] <= o["fact_dist_max"]


def run(tmp_path, out, *flags):
    pretrain.main([f"--out={tmp_path / out}", "--tiny=True", f"--data={tiny_text_dir(tmp_path / 'text')}",
                   "--warmup_steps=2", "--threads=1", *flags])


def test_split_run_is_the_straight_run_and_each_stage_is_measured(tmp_path):
    run(tmp_path, "split", "--steps=6", "--stage_steps=3")
    run(tmp_path, "split", "--steps=9", "--stage_steps=3")  # go on later: one more stage
    run(tmp_path, "straight", "--steps=9", "--stage_steps=9")
    a = torch.load(tmp_path / "split" / "snapshots" / "step_000009.pt", weights_only=False)
    b = torch.load(tmp_path / "straight" / "snapshots" / "step_000009.pt", weights_only=False)
    assert "optimizer" not in a and a["step"] == 9
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    bars = sorted((tmp_path / "split").glob("bar_*.json"))
    assert [json.loads(p.read_text())["step"] for p in bars] == [3, 6, 9]
    bar = json.loads(bars[-1].read_text())["bar"]["stdlib"]
    assert bar["full"] > 0 and set(bar["w8"]) == {"window", "streaming@0.1", "h2o@0.1", "streaming@0.25", "h2o@0.25"}
    meta = json.loads((tmp_path / "split" / "data_mix" / "meta.json").read_text())
    assert meta["planted_tokens"] > 0 and meta["train_tokens"] > meta["planted_tokens"]


def test_other_recipe_in_the_same_out_is_refused(tmp_path):
    run(tmp_path, "r", "--steps=3", "--stage_steps=3")
    with pytest.raises(BadInput, match="other flags: --lr"):
        run(tmp_path, "r", "--steps=6", "--stage_steps=3", "--lr=0.01")
    with pytest.raises(BadInput, match="span_min <= --span_max"):
        pretrain.main(["--out=unused", "--span_min=200"])
    with pytest.raises(BadInput, match="fact_dist_min <= --fact_dist_max"):
        pretrain.main(["--out=unused", "--fact_every=256", "--fact_dist_min=900", "--fact_dist_max=100"])
    with pytest.raises(BadInput, match="keep it at most 986"):
        pretrain.main(["--out=unused", "--fact_every=256", "--fact_dist_max=987"])


def test_ship_copies_a_snapshot_with_its_provenance_and_never_replaces(tmp_path):
    run(tmp_path, "a", "--steps=3", "--stage_steps=3")
    run(tmp_path, "b", "--steps=3", "--stage_steps=3", f"--init_from={tmp_path / 'a' / 'snapshots' / 'step_000003.pt'}")
    dest = tmp_path / "models" / "m.pt"
    run(tmp_path, "b", "--ship=3", f"--ship_to={dest}")
    prov = json.loads(dest.with_suffix(".json").read_text())
    assert [s["step"] for s in prov["stages"]] == [3, 3] and prov["stages"][1]["recipe"]["init_from"]
    assert prov["stages"][0]["bar"]["bar"]["stdlib"]["full"] > 0
    shipped = torch.load(dest, weights_only=False)
    snap = torch.load(tmp_path / "b" / "snapshots" / "step_000003.pt", weights_only=False)
    assert all(torch.equal(shipped["model"][k], snap["model"][k]) for k in snap["model"])
    held = prov["heldout"]  # the bar's held-out sequences beside the model
    rows = torch.from_numpy(np.fromfile(dest.parent / held["file"], dtype=np.uint16).astype(np.int64)).view(2, 65)
    model = load_model(str(dest), dense=True, window=8)[0].eval()
    x, y = rows[:, :-1], rows[:, 1:]
    with torch.no_grad():
        full = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item()
        alone = measure.forward_with_masks(model, x, lambda layer, q, k, logit: measure.window_visible(64, 8))
        alone = F.cross_entropy(alone.flatten(0, 1), y.flatten()).item()
    assert held["shape"] == [2, 65]
    bar = prov["stages"][-1]["bar"]["bar"]["stdlib"]  # the same sequences as the bar's: the same figures
    assert abs(bar["full"] - full) < 1e-6 and abs(bar["w8"]["window"] - 100 * (alone / full - 1)) < 1e-6
    before = dest.read_bytes()
    with pytest.raises(BadInput, match="exists; move it away"):
        run(tmp_path, "b", "--ship=3", f"--ship_to={dest}")
    assert dest.read_bytes() == before


def test_a_shipped_model_starts_a_later_stage_and_its_provenance_goes_on(tmp_path):
    """--init_from a shipped model (its run folder gone): the next stage's ship lists the shipped
    model's stages and then its own; the shipped file says per window whether the bar is met."""
    run(tmp_path, "a", "--steps=3", "--stage_steps=3")
    first = tmp_path / "models" / "first.pt"
    run(tmp_path, "a", "--ship=3", f"--ship_to={first}")
    assert set(json.loads(first.with_suffix(".json").read_text())["needs_old_keys"]) == {"w8"}
    import shutil
    shutil.rmtree(tmp_path / "a")
    run(tmp_path, "c", "--steps=3", "--stage_steps=3", f"--init_from={first}")
    second = tmp_path / "models" / "second.pt"
    run(tmp_path, "c", "--ship=3", f"--ship_to={second}")
    prov = json.loads(second.with_suffix(".json").read_text())
    assert [s["out"] for s in prov["stages"]] == [str(tmp_path / "a"), str(tmp_path / "c")]
