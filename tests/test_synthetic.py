"""The synthetic recall task's ground truth, its evaluation harness, and the command: a few steps
run, and a run interrupted by Ctrl-C goes on when the same command is given again."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time

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


@given(st.integers(0, 10**6), st.sampled_from([128, 256, 512]), st.integers(1, 8), st.floats(0.5, 6.0))
def test_ground_truth_points_at_the_queried_facts(seed, length, n_queries, n_facts):
    seq, needed, answers = S.make_sequence(random.Random(seed), length, n_facts, n_queries)
    region = length - S.QUERY * n_queries
    assert len(seq) == length and len(answers) == n_queries and 1 <= len(needed) <= n_queries
    facts = [i for i, c in enumerate(seq) if c >= 128]
    assert 1 <= len(facts) <= len(S.KEYS) and max(facts) < region and set(needed) <= set(facts)
    assert len({(seq[i] - 128) // 10 for i in facts}) == len(facts)  # keys are distinct
    asked = set()
    for q, a in enumerate(answers):
        assert a == region + S.QUERY * q + 1
        key, digit = S.KEYS.index(seq[a - 1]), S.VALUES.index(seq[a])
        asked.add(seq.index(bytes([S.fact_byte(key, digit)])))  # the fact this query asks for
    assert asked == set(needed)
    filler = [i for i, c in enumerate(seq) if c in S.FILLER]
    assert all(seq[i + 1] == S.FILLER[(S.FILLER.index(seq[i]) + 1) % len(S.FILLER)]
               for i in filler if i + 1 in filler)  # filler is the cycled alphabet


def test_facts_are_independent_with_the_requested_mean():
    rng = random.Random(0)
    seqs = [S.make_sequence(rng, 128, 4.0, 8)[0] for _ in range(2000)]
    spots = [[i for i, c in enumerate(s) if c >= 128] for s in seqs]
    assert abs(np.mean([len(f) for f in spots]) - 4.0) < 0.2  # 4.07 expected (sequences with none redrawn)
    per_position = np.bincount([i for f in spots for i in f], minlength=96) / len(seqs)
    assert per_position[:48].mean() == pytest.approx(per_position[48:].mean(), abs=0.01)  # no place is favoured


def test_bad_task_sizes():
    for n_facts, n_queries, length in ((0.0, 2, 256), (7.0, 2, 256), (2.0, 0, 256), (4.0, 8, 40)):
        with pytest.raises(ValueError, match="need 0 < n_facts"):
            S.make_sequence(random.Random(0), length, n_facts, n_queries)


def test_prepared_windows_start_at_documents(tmp_path):
    S.prepare(str(tmp_path), 128, 20, 4, 3, 2)
    batches = S.DocumentWindows(str(tmp_path), "train", 128)
    x, y = batches.sample(16, torch.Generator().manual_seed(0))
    assert (x[:, 0] != 256).all() and (y[:, -1] == 256).all()  # whole documents, eos last
    assert np.fromfile(tmp_path / "val.bin", dtype=np.uint16).size == 4 * 129


def test_the_core_data_loader_knows_nothing_of_the_task(tmp_path):
    """data.Batches reads the task's folder as any token stream: windows start anywhere (the
    document alignment is DocumentWindows', here), drawn as DocumentWindows draws its sequences."""
    S.prepare(str(tmp_path), 128, 20, 4, 3, 2)
    plain = Batches(str(tmp_path), "train", 128)
    assert not hasattr(plain, "align")
    x, y = plain.sample(64, torch.Generator().manual_seed(0))
    assert (y[:, -1] != 256).any()  # some windows cut a document
    gen = torch.Generator().manual_seed(0)
    starts = S.DocumentWindows(str(tmp_path), "train", 128).window_starts(64, gen)
    assert all(i % 129 == 0 for i in starts) and max(starts) <= 20 * 129 - 130


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


def test_loss_by_kind_hides_old_filler_in_one_layer_only(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config(window=8, block_size=512)).eval()
    for block in model.blocks:  # every gate open: own gates are plain causal attention
        block.attn.predictor.proj.bias.data.fill_(30.0)
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model, byte_spec(), source="test")
    own = S.loss_by_kind(path, 64, 2.0, 2, n_seqs=4)
    rng = random.Random(7)  # loss_by_kind's default seed: the same 4 sequences
    x = torch.tensor([list(S.make_sequence(rng, 64, 2.0, 2)[0]) for _ in range(4)])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x)[0][:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
    assert own["before the queries"] == pytest.approx(loss[:, :55].mean().item(), abs=1e-5)
    assert own["query digits"] == pytest.approx(loss[:, [56, 60]].mean().item(), abs=1e-5)
    assert own == S.loss_by_kind(path, 64, 2.0, 2, n_seqs=4, policy="full")
    hidden0, hidden1 = (S.loss_by_kind(path, 64, 2.0, 2, n_seqs=4, only_facts_layer=layer) for layer in (0, 1))
    assert hidden0 != own and hidden1 != own and hidden0 != hidden1
    with pytest.raises(ValueError, match="has layers 0..1"):
        S.loss_by_kind(path, 64, 2.0, 2, only_facts_layer=2)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--seq_len=64", "--window=16", "--n_facts=2", "--n_queries=2", "--batch_size=4", "--n_layer=1", "--n_embd=32",
        "--n_head=2", "--n_kv_head=1", "--n_train=200"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def synthetic(out, *flags, **kw):
    return subprocess.run([sys.executable, "experiments/synthetic.py", f"--out={out}", *TINY, *flags], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600, **kw)


def hashes(folder) -> dict:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in os.listdir(folder)}


def test_a_few_steps_run_to_the_end(tmp_path):
    """--steps and --adapt_steps at or below the usual 30 warmup steps: the runs warm up over half."""
    res = synthetic(tmp_path, "--steps=4", "--adapt_steps=3")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert all((tmp_path / run / "final.json").exists() for run in ("pretrained", "spkv", "dense"))
    assert (tmp_path / "results.json").exists()


def test_a_run_interrupted_by_ctrl_c_goes_on_when_the_command_is_given_again(tmp_path):
    """Ctrl-C during the SP-KV run saves it; the same command again keeps the finished dense
    "pretrained" run, resumes SP-KV from its save, and trains the rest. A run killed before its
    first save (only its log) is started again."""
    flags = ["--steps=40", "--adapt_steps=400"]
    proc = subprocess.Popen([sys.executable, "experiments/synthetic.py", f"--out={tmp_path}", *TINY, *flags], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "spkv" / "log.jsonl"
    while proc.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, text[-2000:]
    assert "run the same command again to go on" in text
    assert (tmp_path / "spkv" / "ckpt.pt").exists() and not (tmp_path / "spkv" / "final.json").exists()
    pretrained = hashes(tmp_path / "pretrained")
    res = synthetic(tmp_path, *flags)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"{tmp_path / 'pretrained'}: finished earlier, kept" in res.stdout and "resumed from step" in res.stdout
    assert hashes(tmp_path / "pretrained") == pretrained
    assert all((tmp_path / run / "final.json").exists() for run in ("spkv", "dense"))
    spkv = hashes(tmp_path / "spkv")
    for name in ("ckpt.pt", "final.json"):  # the dense run killed before its first save: its log alone
        os.remove(tmp_path / "dense" / name)
    res = synthetic(tmp_path, *flags)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "holds a run that never saved a checkpoint" in res.stdout
    assert hashes(tmp_path / "spkv") == spkv and (tmp_path / "dense" / "final.json").exists()


def test_other_task_settings_into_the_same_out_are_refused(tmp_path):
    S.prepare(str(tmp_path / "data"), 64, 200, 200, 3.0, 2)  # an earlier command's data, another --n_facts
    res = synthetic(tmp_path, "--steps=4", "--adapt_steps=3")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "holds the task's data for other settings (n_facts=3.0, wanted 2.0)" in res.stderr
