"""experiments/reach.py at tiny size: the per-position loss (harness.position_losses) averages to
the model's own loss, a window as long as the sequence is full attention, and repeats are found at
the distance they were planted."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import harness
import measure
import reach
from checkpoint import load_model
from cli import BadInput
from tiny import shipped_tiny


def test_position_losses_average_to_the_models_own_loss(tmp_path):
    ckpt = shipped_tiny(tmp_path, T=32, n=3)
    model = load_model(ckpt, dense=True)[0].eval()
    rows = torch.from_numpy(np.fromfile(tmp_path / "m_heldout.bin", dtype=np.uint16).astype(np.int64)).view(3, 33)
    per_pos = harness.position_losses(model, rows, lambda layer, q, k, logit: measure.causal_visible(32), batch_size=2)  # (T,)
    with torch.no_grad():
        logits, _ = model(rows[:, :-1], rows[:, 1:])
    expect = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
    assert per_pos.shape == (32,) and torch.allclose(per_pos.mean(), expect, atol=1e-5)


def test_repeats_are_found_at_the_distance_they_recur():
    rng = np.random.default_rng(0)
    row = rng.integers(0, 257, size=61)
    row[40:60] = row[0:20]  # 20 tokens recur 40 positions later: 16-grams ending at 55..59 recur at distance 40
    shares = reach.repeat_distances(torch.from_numpy(row)[None], 16, [32, 64])
    total = 60 - 15  # query positions with 16 tokens behind them
    assert shares == {"1-32": 0.0, "32-64": 5 / total, ">=64": 0.0, "none": (total - 5) / total}


def test_full_reach_costs_nothing_and_a_short_window_costs_something(tmp_path, capsys):
    ckpt = shipped_tiny(tmp_path, T=32, n=3)
    reach.main([f"--ckpt={ckpt}", "--windows=1,32", "--streaming_window=4", "--densities=1.0", "--buckets=2",
                "--ngram=2", "--batch_size=2", "--threads=1", f"--out={tmp_path / 'out'}"])
    (path,) = (tmp_path / "out" / "results").glob("reach-*.json")
    res = json.loads(path.read_text())["results"]
    assert set(res["window 32"]) == {"all", "0-16", "16-32"}
    assert all(abs(v) < 1e-4 for v in res["window 32"].values())  # a window as long as the row: full attention
    assert all(abs(v) < 1e-4 for v in res["streaming@1 w4"].values())  # every old key kept
    assert res["window 1"]["16-32"] != 0  # a window of one hides keys the model reads
    assert abs(sum(res["repeats"].values()) - 1) < 1e-9
    assert "window 32" in capsys.readouterr().out


@pytest.mark.parametrize("flag, match", [("--windows=0", ">= 1"), ("--windows=33", "at most the sequence length"),
                                         ("--densities=1.5", r"in \[0, 1\]")])
def test_bad_input_is_one_line(tmp_path, flag, match):
    ckpt = shipped_tiny(tmp_path, T=32, n=3)
    with pytest.raises(BadInput, match=match):
        reach.main([f"--ckpt={ckpt}", flag, f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()
