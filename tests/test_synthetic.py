"""The synthetic recall task's ground truth and its evaluation harness."""

import random

import numpy as np
import torch
from hypothesis import given, strategies as st

import synthetic as S
from data import Batches
from checkpoint import save_checkpoint
from model import GPT
from tiny import tiny_config
from tokenizer import byte_spec


@given(st.integers(0, 10**6), st.sampled_from([256, 512]), st.integers(1, 6))
def test_ground_truth_points_at_the_queried_facts(seed, length, n_queries):
    seq, needed, answers = S.make_sequence(random.Random(seed), length, 6, n_queries)
    assert len(seq) == length and len(needed) == 5 * n_queries and len(answers) == n_queries
    for (a, b), i in zip(answers, range(n_queries)):
        key, value = seq[a - 3:a - 1], seq[a:b + 1]
        fact = seq.index(b"#" + key + b"=")  # the fact this query asks for
        assert seq[fact + 4:fact + 6] == value
        assert set(range(fact + 1, fact + 6)) <= set(needed)
        assert a - fact > 64  # beyond the default window of 32 (and of 64)


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
    closed = S.evaluate(str(tmp_path / "m.pt"), 256, 4, 2, n_seqs=4, empty_store=True)
    assert closed["density"] == 0.0 and closed["recall"] == 0.0
