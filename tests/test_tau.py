"""tau calibration hits its target density on held-out data; the sweep's density falls with tau."""

import torch
from hypothesis import given, strategies as st

import data as datalib
import spkv
import synthetic as S
import tau as taulib
from model import GPT
from tiny import tiny_config, tiny_text_dir
from tokenizer import Tokenizer, byte_spec


@given(st.floats(0.02, 0.98), st.integers(0, 10**6))
def test_tau_for_density_hits_target_on_fresh_samples(target, seed):
    g = torch.Generator().manual_seed(seed)
    u_calib, u_fresh = torch.rand(20000, generator=g) ** 3, torch.rand(20000, generator=g) ** 3
    tau = spkv.tau_for_density(u_calib, target)
    assert abs((u_fresh >= tau).float().mean().item() - target) <= 0.02


def test_calibrated_model_density_on_held_out_data(tmp_path):
    S.prepare(str(tmp_path), 256, 40, 20, 4, 2)
    train, val = datalib.Batches(str(tmp_path), "train", 256), datalib.Batches(str(tmp_path), "val", 256)
    torch.manual_seed(0)
    # layer 0's predictor would see bare embeddings (a few distinct byte values: ties no tau can
    # split); layer 1 reads context-dependent states, as every layer of a real model mostly does
    model = GPT(tiny_config(window=16, dense_layers=(0,))).eval()
    torch.nn.init.normal_(model.blocks[1].attn.predictor.proj.weight, std=2.0)
    for target in (0.1, 0.25, 0.5):
        tau = spkv.calibrate(model, train, target, n_batches=8, batch_size=4)
        _, density = taulib.hard_loss_and_density(model, val, tau, n_batches=8, batch_size=4)
        assert abs(density - target) <= 0.02, (target, tau, density)
    densities = [taulib.hard_loss_and_density(model, val, t, 2, 4)[1] for t in (0.1, 0.5, 0.9)]
    assert densities == sorted(densities, reverse=True)


def test_windows_start_at_sequences_on_the_task_data_only(tmp_path):
    S.prepare(str(tmp_path / "task"), 128, 20, 4, 3, 2)
    x, y = taulib.windows(str(tmp_path / "task"), "train", 128).sample(16, torch.Generator().manual_seed(0))
    assert (x[:, 0] != 256).all() and (y[:, -1] == 256).all()  # whole sequences, eos last
    text = datalib.prepare(tiny_text_dir(tmp_path / "text"), Tokenizer(byte_spec()), str(tmp_path / "cache"))
    assert type(taulib.windows(text, "val", 16)) is datalib.Batches  # any other text: windows start anywhere
