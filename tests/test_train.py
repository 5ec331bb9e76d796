"""train.py on tiny models: the optimizer step, the frozen/annealed phase, checkpoints that survive
kill -9 and Ctrl-C, exact resume, DDP equivalence, and clear errors for bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import data as datalib
import measure
import run
import train
from cli import BadInput
from checkpoint import load_model, read_checkpoint
from model import GPT
from tiny import tiny_checkpoint, tiny_config, tiny_text_dir
from tokenizer import Tokenizer, byte_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flags(tmp_path, ckpt, **kw) -> list:
    base = dict(ckpt=ckpt, data=tiny_text_dir(tmp_path / "text"), data_cache=str(tmp_path / "cache"),
                out_dir=str(tmp_path / "out"), preset="cpu", gates="", seq_len=64, batch_size=2, max_steps=8,
                warmup_steps=1, eval_every=4, eval_batches=2, ckpt_every=4, window=8, lr=3e-3,
                device="cpu")  # the CPU even on a GPU machine: tiny heads (D=8) are below CUDA flex's minimum
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def read_log(out_dir) -> list:
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def fixed_batch(T=48):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 257, (2, T), generator=g), torch.randint(0, 257, (2, T), generator=g)


def test_one_step_lowers_loss_and_trains_predictor():
    torch.manual_seed(0)
    model = GPT(tiny_config(window=4))
    cfg = train.TrainConfig(lr=1e-3)
    opt = train.make_optimizer(model, cfg, fused=False)
    x, y = fixed_batch()
    _, loss0 = model(x, y, a=0.0)
    loss0.backward()
    proj_grads = [m.attn.predictor.proj.weight.grad for m in model.blocks]
    assert all(g is not None and g.abs().sum() > 0 for g in proj_grads)
    opt.step()
    _, loss1 = model(x, y, a=0.0)
    assert loss1.item() < loss0.item()


def test_frozen_phase_leaves_predictor_unchanged():
    torch.manual_seed(0)
    model = GPT(tiny_config(window=4))
    opt = train.make_optimizer(model, train.TrainConfig(lr=1e-3), fused=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for a in (0.0, 0.5, 1.0):
        _, loss = model(*fixed_batch(), a=a, frozen=True)
        loss.backward()
        assert all(p.grad is None for p in model.predictor_parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        same = torch.equal(p, before[n])
        assert same if ".predictor." in n else not same, n


def test_schedule_ends_fully_hard():
    cfg = train.TrainConfig(max_steps=100, warmup_steps=10, anneal_steps=500, freeze_frac=0.25)
    freeze, length = train.gate_schedule(cfg)
    assert freeze == 78 and length == 11  # capped at half the frozen phase
    assert train.gates_at(freeze - 1, cfg) == (0.0, False)
    assert train.gates_at(freeze, cfg) == (1 / 11, True)
    assert train.gates_at(99, cfg) == (1.0, True)


def test_after_anneal_the_gap_is_closed(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    train.main(flags(tmp_path, ckpt))
    log = read_log(tmp_path / "out")
    assert log[-1]["frozen"] and log[-1]["anneal"] == 1.0
    model, _, _ = load_model(str(tmp_path / "out" / "ckpt.pt"))
    x, y = fixed_batch()
    with torch.no_grad():
        trained_view = model(x, y, a=1.0, frozen=True)[1]
        hard = model(x, y, a=1.0)[1]
    assert torch.equal(trained_view, hard)  # trained under exactly the attention it decodes with
    final = json.load(open(tmp_path / "out" / "final.json"))
    assert 0 <= final["density"] <= 1 and set(final["density_per_layer"]) == {"0", "1"}


def test_dense_baseline_has_no_predictor(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    train.main(flags(tmp_path, ckpt, dense=True, max_steps=2, eval_every=2))
    model, _, raw = load_model(str(tmp_path / "out" / "ckpt.pt"))
    assert not any(".predictor." in k for k in raw["model"])
    assert read_log(tmp_path / "out")[-1]["val_soft"] == read_log(tmp_path / "out")[-1]["val_hard"]


def test_predictor_init_bias_sets_fresh_predictors_and_never_replaces_stored_ones(tmp_path):
    """Converted weights store no predictors: --predictor_init_bias sets the fresh ones. A checkpoint
    that stores its own loads them as stored, and asking it for another init bias is refused."""
    bare = tiny_checkpoint(tmp_path / "bare.pt", predictors=False)
    assert not any(".predictor." in k for k in read_checkpoint(bare)["model"])
    cfg, _ = train.parse_flags([f"--ckpt={bare}", "--device=cpu", "--gates=", "--predictor_init_bias=0", "--seq_len=64", "--window=8"])
    model = train.build_model(cfg, "cpu")[0]
    biases = [model.blocks[i].attn.predictor.proj.bias for i in model.cfg.spkv_layers()]
    assert biases and all(torch.equal(b, torch.zeros_like(b)) for b in biases)
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")  # predictors stored, made at the default bias, 5
    raw = read_checkpoint(ckpt)
    with torch.no_grad():  # make the stored predictors differ from a fresh open init
        stored = {k: v + 0.25 for k, v in raw["model"].items() if ".predictor." in k}
    raw["model"].update(stored)
    torch.save(raw, ckpt)
    cfg, _ = train.parse_flags([f"--ckpt={ckpt}", "--device=cpu", "--gates=", "--seq_len=64", "--window=8"])
    state = train.build_model(cfg, "cpu")[0].state_dict()
    assert stored and all(torch.equal(state[k], v) for k, v in stored.items())
    cfg, _ = train.parse_flags([f"--ckpt={ckpt}", "--device=cpu", "--gates=", "--predictor_init_bias=0", "--seq_len=64", "--window=8"])
    with pytest.raises(BadInput, match="stores its own"):
        train.build_model(cfg, "cpu")


def test_checkpoint_survives_kill_9_during_write(tmp_path):
    path = tmp_path / "ckpt.pt"
    writer = ("import torch; from checkpoint import atomic_save\n"
              f"i = 0\nwhile True:\n    i += 1\n"
              f"    atomic_save({{'format': 'spkv-1', 'i': i, 'w': torch.full((4_000_000,), float(i))}}, {str(path)!r})\n")
    for trial in range(4):
        proc = subprocess.Popen([sys.executable, "-c", writer], cwd=ROOT)  # the repo root: checkpoint.py
        while not path.exists():
            time.sleep(0.02)
        time.sleep(0.2 + 0.17 * trial)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = read_checkpoint(str(path))  # complete, never torn
        assert torch.equal(ckpt["w"], torch.full((4_000_000,), float(ckpt["i"])))


def test_ctrl_c_saves_and_resume_reproduces_losses_exactly(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    common = dict(max_steps=12, ckpt_every=100, eval_every=100, seq_len=128, batch_size=4)
    train.main(flags(tmp_path, ckpt, out_dir=tmp_path / "straight", **common))
    want = {r["step"]: r["loss"] for r in read_log(tmp_path / "straight")}
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "train.py", *flags(tmp_path, ckpt, out_dir=out, **common)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (out / "log.jsonl").exists() or len(read_log(out)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate()[0]
    assert proc.returncode == 130, text
    stopped_at = read_checkpoint(str(out / "ckpt.pt"))["step"]
    assert 2 <= stopped_at < 12, text
    train.main([f"--out_dir={out}", "--resume=True"])  # everything else comes from the checkpoint
    got = {r["step"]: r["loss"] for r in read_log(out)}
    assert [got[s] for s in range(stopped_at + 1, 13)] == [want[s] for s in range(stopped_at + 1, 13)]


def test_ddp_two_processes_match_one_process_through_the_freeze(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    one = flags(tmp_path, ckpt, out_dir=tmp_path / "one", batch_size=4, max_steps=6, eval_every=100)
    two = flags(tmp_path, ckpt, out_dir=tmp_path / "two", batch_size=2, max_steps=6, eval_every=100)
    train.main(one)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *two], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert b[-1]["frozen"]  # through the freeze: frozen predictors get no gradient under DDP
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5, (ra["loss"], rb["loss"])


@pytest.mark.parametrize("argv,message", [
    (["--bogus=1"], "unknown flag --bogus"),
    (["--lr=fast"], "--lr takes a float, not 'fast'"),
    (["--dense=maybe"], "--dense takes True or False"),
    (["max_steps=3"], "malformed argument 'max_steps=3'"),
    (["--preset=tpu"], "unknown preset 'tpu'"),
    (["--tau=1.5"], "--tau=1.5 must be in \\[0, 1\\]"),
    (["--lr=nan"], "--lr=nan must be a finite number"),
])
def test_bad_flags_are_refused_with_the_valid_keys(argv, message):
    with pytest.raises(BadInput, match=message):
        train.parse_flags(argv)


def test_the_cpu_preset_adapts_the_shipped_model_from_its_gates_and_explicit_flags_win():
    cfg, _ = train.parse_flags(["--preset=cpu"])
    assert cfg.ckpt == train.SHIPPED and os.path.isfile(cfg.ckpt)  # models/stdlib_bytes.pt, in the repo
    assert cfg.gates == train.SHIPPED_GATES and os.path.isfile(cfg.gates)  # fitted to it by experiments/ceiling.py
    assert (cfg.window, cfg.seq_len) == (128, 1024)  # the window its gates were fitted at
    model = train.build_model(cfg, "cpu")[0]
    raw = torch.load(cfg.gates, weights_only=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in raw["predictors"].items()) and raw["window"] == 128
    cfg, given = train.parse_flags(["--preset=cpu", "--ckpt=other.pt", "--window=8", "--gates="])
    assert (cfg.ckpt, cfg.window, cfg.seq_len, cfg.gates) == ("other.pt", 8, 1024, "")
    assert set(given) == {"preset", "ckpt", "window", "gates"}


def test_a_gates_file_starts_the_predictors_and_one_that_does_not_fit_is_refused(tmp_path):
    """train.py --gates: the predictors start as the file holds them; a file made for another window,
    another shape or other weights (the cpu preset's gates on another --ckpt among them), a missing
    file and a from-scratch run are each refused in one line."""
    from checkpoint import save_gates

    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", predictors=False)
    base = [f"--ckpt={ckpt}", "--device=cpu", "--seq_len=64"]
    donor = train.build_model(train.parse_flags([*base, "--window=8", "--gates="])[0], "cpu")[0]  # these weights
    with torch.no_grad():
        for b in donor.blocks:
            b.attn.predictor.proj.weight.normal_()
    save_gates(str(tmp_path / "g8.pt"), donor, source="test")
    cfg, _ = train.parse_flags([*base, "--window=8", f"--gates={tmp_path / 'g8.pt'}"])
    state = train.build_model(cfg, "cpu")[0].state_dict()
    donor_state = donor.state_dict()
    keys = [k for k in donor_state if ".predictor." in k]
    assert keys and all(torch.equal(state[k], donor_state[k]) for k in keys)
    refusals = [(["--window=4", f"--gates={tmp_path / 'g8.pt'}"], "fitted at window 8, not 4"),
                (["--window=8", f"--gates={tmp_path / 'none.pt'}"], "does not exist"),
                (["--window=8", f"--gates={ckpt}"], "not a gates file"),
                (["--window=8", f"--gates={tmp_path / 'g8.pt'}", "--init=scratch"], "--init=scratch")]
    save_gates(str(tmp_path / "wide.pt"), GPT(tiny_config(window=8, n_embd=64, n_hidden=128)), source="test")
    refusals.append((["--window=8", f"--gates={tmp_path / 'wide.pt'}"], "another model"))
    torch.manual_seed(1)
    save_gates(str(tmp_path / "other.pt"), GPT(tiny_config(window=8)), source="test")  # same shape, other weights
    refusals.append((["--window=8", f"--gates={tmp_path / 'other.pt'}"], "fitted to other weights"))
    refusals.append((["--window=8", "--preset=cpu"], "fitted at window 128"))  # the preset's gates, on this model
    for extra, message in refusals:
        cfg, _ = train.parse_flags([*base, *extra])
        with pytest.raises(BadInput, match=message):
            train.build_model(cfg, "cpu")


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.main(flags(tmp_path, str(tmp_path / "nope.pt")))


@pytest.mark.parametrize("content,message", [(b"", "empty"), (b"\x00\x01binary\x00" * 50, "binary file")])
def test_empty_or_binary_data_is_refused(tmp_path, content, message):
    (tmp_path / "data.txt").write_bytes(content)
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match=message):
        train.main(flags(tmp_path, ckpt, data=tmp_path / "data.txt"))


def test_seq_len_beyond_context_is_refused(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    with pytest.raises(BadInput, match="beyond the model's context of 256"):
        train.main(flags(tmp_path, ckpt, seq_len=512))


def test_nan_loss_stops_and_says_nothing_was_saved(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    raw = read_checkpoint(ckpt)
    raw["model"]["blocks.0.mlp.up_proj.weight"][0, 0] = float("nan")
    torch.save(raw, tmp_path / "poisoned.pt")
    with pytest.raises(BadInput, match="loss nan .* no checkpoint exists yet"):
        train.main(flags(tmp_path, str(tmp_path / "poisoned.pt"), max_steps=2, ckpt_every=1))
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_logs_carry_each_layers_gate_statistics(tmp_path):
    """Every eval record and final.json hold, per SP-KV layer, the mean gate u, the fraction below
    tau and the predictor's output bias; recomputed here from the saved model's own gates on the
    same held-out batches."""
    import data as datalib

    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    train.main(flags(tmp_path, ckpt))
    evals = [r for r in read_log(tmp_path / "out") if "val_hard" in r]
    assert evals and all(set(r["gates"]) == {"0", "1"} for r in evals)
    final = json.load(open(tmp_path / "out" / "final.json"))
    cfg = train.TrainConfig(**final["train_config"])
    model, tok, _ = load_model(str(tmp_path / "out" / "ckpt.pt"))
    val = datalib.Batches(datalib.prepare(cfg.data, tok, cfg.data_cache), "val", cfg.seq_len)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # evaluate's fixed batches
    us = {0: [], 1: []}
    with torch.no_grad():
        for _ in range(cfg.eval_batches):
            gates = []
            model.eval()(*val.sample(cfg.batch_size, gen), a=1.0, gates=gates)
            for layer, logit in zip(us, gates):
                us[layer].append(torch.sigmoid(logit))
    for layer, parts in us.items():
        u, rec = torch.cat(parts), final["gates"][str(layer)]
        assert abs(rec["mean_u"] - u.mean().item()) <= 1e-6
        assert abs(rec["below_tau"] - (u < cfg.tau).float().mean().item()) <= 1e-6
        assert abs(rec["bias"] - model.blocks[layer].attn.predictor.proj.bias.mean().item()) <= 1e-6


def test_sdpa_bias_of_gigabytes_is_refused_before_any_work(tmp_path):
    """--attn=sdpa with SP-KV builds a (B, Hkv, T, T) bias: a shape where it alone is gigabytes is
    refused in one line, naming the flags and FlexAttention."""
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    with pytest.raises(BadInput, match="sdpa would build a 4.3 GB attention bias"):
        train.main(flags(tmp_path, ckpt, init="scratch", n_layer=1, n_embd=32, seq_len=16384, attn="sdpa"))
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_two_processes_into_one_out_dir_exactly_one_runs(tmp_path):
    """Two real train.py processes started together into one --out_dir: one trains to the end, the
    other is refused in one line with exit status 2 (the lock, or the finished run it then finds)."""
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    argv = [sys.executable, "train.py", *flags(tmp_path, ckpt, max_steps=6)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = sorted((p.wait(timeout=300), *p.communicate()) for p in procs)
    assert [r[0] for r in results] == [0, 2], results
    refused = results[1][2].strip().splitlines()
    assert len(refused) == 1 and "Traceback" not in results[1][2], refused
    assert "is in use by process" in refused[0] or "already holds a finished run" in refused[0], refused
    assert [r["step"] for r in read_log(tmp_path / "out")] == list(range(1, 7))  # one writer's records only


def test_a_held_lock_refuses_a_run_and_a_resume_and_a_dead_holders_lock_is_taken_over(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    train.main(flags(tmp_path, ckpt, max_steps=2, ckpt_every=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with run.RunDir(str(out), master=True):  # this process holds the lock
        for extra in ([f"--out_dir={out}", "--resume=True", "--max_steps=4"], flags(tmp_path, ckpt, out_dir=out)):
            res = subprocess.run([sys.executable, "train.py", *extra], cwd=ROOT, env=env, capture_output=True, text=True)
            assert res.returncode == 2 and f"is in use by process {os.getpid()}" in res.stderr, res.stderr
    assert not (out / "lock").exists()  # released
    (out / "lock").write_text("999999999\n")  # a holder killed before it could release: no such process
    res = subprocess.run([sys.executable, "train.py", f"--out_dir={out}", "--resume=True", "--max_steps=4"], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "took over the lock of process 999999999, which is no longer running" in res.stdout


def test_a_run_that_never_saved_can_be_started_again(tmp_path, capsys):
    """A run killed before its first checkpoint leaves only log records: --resume says there is
    nothing to resume, and a fresh run says what it discards and trains."""
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0}) + "\n" for s in range(3)))
    with pytest.raises(BadInput, match="never saved one: start it again without --resume"):
        train.main([f"--out_dir={out}", "--resume=True"])
    train.main(flags(tmp_path, ckpt, max_steps=2, ckpt_every=2))
    assert f"{out} holds a run that never saved a checkpoint (log.jsonl, 3 records); discarding it" in capsys.readouterr().out
    assert [r["loss"] != 5.0 for r in read_log(out)] == [True, True]


def test_the_end_report_compares_with_the_dense_base_on_the_same_val_batches(tmp_path, capsys):
    """final.json's against_base: SP-KV's hard loss is the run's own val_hard (the same batches),
    and the base's full-attention loss is what measure.evaluate gives the base loaded dense."""
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    train.main(flags(tmp_path, ckpt))
    final = json.load(open(tmp_path / "out" / "final.json"))
    r = final["against_base"]
    assert abs(r["spkv_hard"] - final["val_hard"]) < 1e-5
    base = load_model(ckpt, dense=True, window=8)[0]
    val = tiny_val(tmp_path)
    own = measure.evaluate(base, val, 2, 2, 1338, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert abs(r["base_full"] - own["val_hard"]) < 1e-5
    assert "StreamingLLM at that density" in capsys.readouterr().out


def test_streaming_at_density_one_is_the_base_under_full_attention(tmp_path):
    base = load_model(tiny_checkpoint(tmp_path / "tiny.pt"), dense=True, window=8)[0]
    model = load_model(tiny_checkpoint(tmp_path / "spkv.pt", seed=1), window=8)[0]
    r = measure.against_base(model, base, tiny_val(tmp_path), 1.0, 2, 2, seed=3)
    assert abs(r["base_streaming"] - r["base_full"]) < 1e-5


def tiny_val(tmp_path):
    """The val split of flags()'s data, at its seq_len, from the same cache."""
    folder = datalib.prepare(tiny_text_dir(tmp_path / "text"), Tokenizer(byte_spec()), str(tmp_path / "cache"))
    return datalib.Batches(folder, "val", 64)


def test_log_console_checkpoint_and_final_count_steps_the_same_way(tmp_path, capsys):
    """Every record, print and file says "step N" for the state after N optimizer steps."""
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    train.main(flags(tmp_path, ckpt, max_steps=6, eval_every=2, ckpt_every=3))
    printed = [int(n) for n in re.findall(r"^step (\d+): train", capsys.readouterr().out, re.M)]
    log = read_log(tmp_path / "out")
    assert [r["step"] for r in log if "val_soft" in r] == printed == [2, 3, 4, 6]  # evals, and the save at 3
    assert [r["step"] for r in log] == list(range(1, 7))
    final = json.load(open(tmp_path / "out" / "final.json"))
    assert read_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["step"] == final["step"] == log[-1]["step"] == 6
