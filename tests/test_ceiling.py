"""experiments/ceiling.py at tiny size: every policy is measured at every window and density on a
shipped model's held-out rows, and at density 1 every keep set is full attention."""

import json

import pytest
import torch

import ceiling
from cli import BadInput
from tiny import shipped_tiny


def test_every_policy_at_every_window_and_density_and_full_attention_at_density_1(tmp_path, capsys):
    ckpt = shipped_tiny(tmp_path)
    ceiling.main([f"--ckpt={ckpt}", "--windows=4,8", "--densities=0.25,1.0", "--h2o=True", "--batch_size=2", "--threads=1",
                  f"--out={tmp_path / 'out'}"])
    (path,) = (tmp_path / "out" / "results").glob("ceiling-*.json")
    full, *rows = json.loads(path.read_text())["results"]
    assert [r["window"] for r in rows] == [4, 8]
    for r in rows:
        assert r["window_alone"] > 0 and [p["density"] for p in r["points"]] == [0.25, 1.0]
        names = ["streaming", "h2o", *ceiling.ORACLES]
        at_one = r["points"][1]
        assert all(abs(at_one[n] - full["full"]) < 1e-5 for n in names), at_one  # every key kept
        assert all(r["points"][0][n] > 0 for n in names)
    assert "oracle_sum" in capsys.readouterr().out
    png = path.with_suffix(".png")
    assert png.stat().st_size > 1000
    with pytest.raises(BadInput, match="exists"):
        ceiling.main([f"--replot={path}"])
    png.unlink()
    ceiling.main([f"--replot={path}"])
    assert png.stat().st_size > 1000


def test_bad_input_is_one_line(tmp_path):
    ckpt = shipped_tiny(tmp_path)
    with pytest.raises(BadInput, match="densities"):
        ceiling.main([f"--ckpt={ckpt}", "--densities=1.5", f"--out={tmp_path / 'o'}"])
    with pytest.raises(BadInput, match="sequence length"):
        ceiling.main([f"--ckpt={ckpt}", "--windows=48", f"--out={tmp_path / 'o'}"])
    with pytest.raises(BadInput, match="does not exist"):
        ceiling.main([f"--ckpt={tmp_path / 'none.pt'}", f"--out={tmp_path / 'o'}"])


def test_the_learned_gate_is_fitted_per_window_and_saved_to_keep_its_density_at_tau_half(tmp_path):
    """--distill_seqs: SP-KV's predictors fitted to the oracle, measured at each density, and saved
    per window with the output bias moved so that tau 0.5 keeps --save_density on training text."""
    import data as datalib
    import spkv
    from checkpoint import load_model
    from tiny import tiny_text_dir

    ckpt = shipped_tiny(tmp_path)
    text = tiny_text_dir(tmp_path / "text")
    ceiling.main([f"--ckpt={ckpt}", "--windows=8", "--densities=0.25,0.5", "--h2o=False", "--distill_seqs=4",
                  "--distill_steps=20", f"--data={text}", f"--data_cache={tmp_path / 'cache'}", "--batch_size=2",
                  "--threads=1", "--save_density=0.5", f"--out={tmp_path / 'out'}"])
    (path,) = (tmp_path / "out" / "results").glob("ceiling-*.json")
    _, row = json.loads(path.read_text())["results"]
    for p in row["points"]:
        assert p["learned"] > 0 and 0 <= p["learned_density"] <= 1 and 0 < p["learned_tau"] <= 1
    (saved,) = (tmp_path / "out" / "learned").glob("learned_w8-*.pt")
    model, tok, raw = load_model(str(saved))
    assert model.cfg.window == 8 and raw["learned_gates"]["window"] == 8
    assert all(b.attn.is_spkv for b in model.blocks)
    train = datalib.Batches(datalib.prepare(text, tok, str(tmp_path / "cache")), "train", 48)
    u = spkv.old_gate_values(model, train, 4, 2, torch.Generator().manual_seed(0))  # calibrate's batches
    assert abs((u >= 0.5).float().mean().item() - 0.5) < 0.01


def test_ship_gates_writes_one_windows_learned_gates_alone_and_never_over_a_file(tmp_path):
    from tiny import tiny_text_dir

    ckpt = shipped_tiny(tmp_path)
    text = tiny_text_dir(tmp_path / "text")
    common = [f"--ckpt={ckpt}", "--densities=0.25", "--h2o=False", "--distill_seqs=2", "--distill_steps=5",
              f"--data={text}", f"--data_cache={tmp_path / 'cache'}", "--batch_size=2", "--threads=1",
              f"--out={tmp_path / 'out'}"]
    gates = tmp_path / "gates.pt"
    with pytest.raises(BadInput, match="one --windows"):
        ceiling.main([*common, "--windows=4,8", f"--ship_gates={gates}"])
    ceiling.main([*common, "--windows=8", f"--ship_gates={gates}"])
    raw = torch.load(gates, weights_only=True)
    (full,) = (tmp_path / "out" / "learned").glob("learned_w8-*.pt")
    state = torch.load(full, weights_only=True)["model"]
    assert raw["window"] == 8 and raw["predictors"] and all(torch.equal(state[k], v) for k, v in raw["predictors"].items())
    with pytest.raises(BadInput, match="exists"):
        ceiling.main([*common, "--windows=8", f"--ship_gates={gates}"])


def test_a_model_shipped_without_rows_is_measured_on_rows_drawn_from_the_val_split(tmp_path, capsys):
    """--draw_heldout (convert.py's SmolLM2 has no bar rows): the figures are those of harness.val_rows
    on --data's val split; without it such a model is refused in one line that names the flag."""
    import baselines
    import data as datalib
    import harness
    from checkpoint import load_model
    from tiny import tiny_checkpoint, tiny_text_dir

    ckpt = tiny_checkpoint(tmp_path / "bare.pt", predictors=False)  # no .json, no rows beside it
    text = tiny_text_dir(tmp_path / "text")
    common = [f"--ckpt={ckpt}", "--windows=8", "--densities=0.25", f"--data={text}", f"--data_cache={tmp_path / 'cache'}",
              "--batch_size=2", "--threads=1", f"--out={tmp_path / 'out'}"]
    with pytest.raises(BadInput, match="--draw_heldout"):
        ceiling.main(common)
    with pytest.raises(BadInput, match="multiple of 4"):
        ceiling.main([*common, "--draw_heldout=6"])
    ceiling.main([*common, "--draw_heldout=4", "--draw_len=40"])
    assert "4 x 40 tokens drawn from the val split" in capsys.readouterr().out
    (path,) = (tmp_path / "out" / "results").glob("ceiling-*.json")
    full = json.loads(path.read_text())["results"][0]["full"]
    model, tok, _ = load_model(ckpt, dense=True)
    rows = harness.val_rows(datalib.Batches(datalib.prepare(text, tok, str(tmp_path / "cache")), "val", 40), 1, 4)
    assert rows.shape == (4, 41)
    want = ceiling.loss_of(model.eval(), rows, lambda layer, q, k, logit: baselines.causal_visible(40), 2)
    assert full == pytest.approx(want, rel=1e-6)
