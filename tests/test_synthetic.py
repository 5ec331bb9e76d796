"""The synthetic recall task's ground truth and its evaluation harness."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import synthetic as S
from data import Batches
from checkpoint import save_checkpoint
from model import GPT
from tiny import tiny_config
from tokenizer import byte_spec


@given(st.integers(0, 10**6), st.sampled_from([256, 512]), st.integers(1, 6), st.integers(0, 6))
def test_ground_truth_points_at_the_queried_facts(seed, length, n_queries, extra_facts):
    n_facts = n_queries + extra_facts
    seq, needed, answers = S.make_sequence(random.Random(seed), length, n_facts, n_queries)
    assert len(seq) == length and len(needed) == n_queries == len(answers)
    facts = [i for i, c in enumerate(seq) if c >= 128]
    assert len(facts) == n_facts and set(needed) <= set(facts)
    for a in answers:
        key, digit = S.KEYS.index(seq[a - 1]), S.VALUES.index(seq[a])
        fact = seq.index(bytes([S.fact_byte(key, digit)]))  # the fact this query asks for
        assert fact in needed
        assert a - fact > 64  # beyond the default window of 32 (and of 64)
    filler = [i for i, c in enumerate(seq) if c in S.FILLER]
    assert all(seq[i + 1] == S.FILLER[(S.FILLER.index(seq[i]) + 1) % len(S.FILLER)]
               for i in filler if i + 1 in filler)  # filler is the cycled alphabet


def test_bad_task_sizes():
    with pytest.raises(ValueError, match="n_queries <= n_facts"):
        S.make_sequence(random.Random(0), 256, 13, 2)
    with pytest.raises(ValueError, match="n_queries <= n_facts"):
        S.make_sequence(random.Random(0), 256, 2, 3)


def test_prepared_windows_start_at_documents(tmp_path):
    S.prepare(str(tmp_path), 128, 20, 4, 3, 2)
    batches = Batches(str(tmp_path), "train", 128)
    x, y = batches.sample(16, torch.Generator().manual_seed(0))
    assert (x[:, 0] != 256).all() and (y[:, -1] == 256).all()  # whole documents, eos last
    assert np.fromfile(tmp_path / "val.bin", dtype=np.uint16).size == 4 * 129


def test_evaluate_reports_bounded_figures(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config(window=16, block_size=512))
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.predictor.proj.weight, std=1.0)
    save_checkpoint(str(tmp_path / "m.pt"), model, byte_spec(), source="test")
    r = S.evaluate(str(tmp_path / "m.pt"), 256, 4, 2, n_seqs=4)
    assert all(0.0 <= r[k] <= 1.0 for k in ("accuracy", "density", "recall", "precision"))
    assert 0.0 < r["density"] < 1.0  # random gates keep some and drop some
    closed = S.evaluate(str(tmp_path / "m.pt"), 256, 4, 2, n_seqs=4, policy="window")
    assert closed["density"] == 0.0 and closed["recall"] == 0.0
    full = S.evaluate(str(tmp_path / "m.pt"), 256, 4, 2, n_seqs=4, policy="full")
    assert full["density"] == 1.0 and full["recall"] == 1.0
    h2o = S.evaluate(str(tmp_path / "m.pt"), 256, 4, 2, n_seqs=4, policy="h2o", density=0.25)
    assert abs(h2o["density"] - 0.25) < 0.01


def test_probe_layer_hides_old_filler_in_that_layer_only(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config(window=8, block_size=512)).eval()
    for block in model.blocks:  # every gate open: own gates are plain causal attention
        block.attn.predictor.proj.bias.data.fill_(30.0)
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model, byte_spec(), source="test")
    probe0, probe1 = (S.probe_layer(path, layer, 64, 4, 2, n_seqs=4) for layer in (0, 1))
    rng = random.Random(7)  # the probe's default seed: the same 4 sequences
    x = torch.tensor([list(S.make_sequence(rng, 64, 4, 2)[0]) for _ in range(4)])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x)[0][:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
    t = torch.arange(1, 64)
    assert abs(probe0["own gates"]["other filler"] - loss[:, (t % 4 != 0) & (t < 56)].mean().item()) < 1e-5
    assert probe0["own gates"] == probe1["own gates"]
    hidden0, hidden1 = probe0["layer 0 sees old facts only"], probe1["layer 1 sees old facts only"]
    assert hidden0 != probe0["own gates"] and hidden1 != probe1["own gates"] and hidden0 != hidden1
    with pytest.raises(ValueError, match="has layers 0..1"):
        S.probe_layer(path, 2, 64, 4, 2)
