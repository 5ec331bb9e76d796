"""experiments/harness.py: a finished run of other flags is refused, results are never replaced,
--tiny=True has its own out folder, measure_against_dense retunes one model to each tau exactly as
a reload at that tau would, and the sink diagnostic matches the hard view where it must; each
experiment script prints every flag with its meaning and refuses bad input in one line."""

import importlib
import json
import os
import subprocess
import sys

import pytest

import cli
import data as datalib
import harness
import tau as taulib
from checkpoint import load_model
from cli import BadInput
from tiny import tiny_checkpoint, tiny_text_dir

SCRIPTS = ("realtext", "ablate", "smollm2", "pretrain", "mainflow", "ceiling", "reach", "needle")


def test_a_finished_run_with_other_flags_is_refused_not_reused(tmp_path):
    folder = tmp_path / "scratch_spkv"
    folder.mkdir()
    final = folder / "final.json"
    final.write_text(json.dumps({"train_config": {"predictor_lr_mult": 5.0, "max_steps": 150}}))
    before = final.read_bytes()
    assert harness.finished(str(folder), {"predictor_lr_mult": 5, "max_steps": 150})
    with pytest.raises(BadInput, match="predictor_lr_mult=5.0 \\(wanted 20\\)"):
        harness.finished(str(folder), {"predictor_lr_mult": 20, "max_steps": 150})
    assert final.read_bytes() == before
    # this run predates --gates, so it ran as --gates= (fresh predictors, or the checkpoint's own)
    assert harness.finished(str(folder), {"max_steps": 150, "gates": ""})
    with pytest.raises(BadInput, match="--gates= \\(wanted g.pt\\)"):
        harness.finished(str(folder), {"max_steps": 150, "gates": "g.pt"})


def test_results_are_new_files_and_tiny_runs_have_their_own_folder(tmp_path):
    first = harness.save_result(str(tmp_path), "x", {"a": 1}, [1], 0.0)
    second = harness.save_result(str(tmp_path), "x", {"a": 1}, [2], 0.0)
    assert first != second and json.loads(open(first).read())["results"] == [1]
    assert json.loads(open(second).read())["commit"] == harness.commit_stamp()
    assert harness.out_folder({}, "realtext") == os.path.join("out", "realtext")
    assert harness.out_folder({"tiny": True}, "realtext") == os.path.join("out", "realtext_tiny")
    assert harness.out_folder({"tiny": True, "out": "elsewhere"}, "realtext") == "elsewhere"
    with pytest.raises(BadInput, match="--out is empty"):
        harness.out_folder({"out": " "}, "realtext")
    assert harness.chosen("rows", "", {"a": 1, "b": 2}) == ["a", "b"]
    with pytest.raises(BadInput, match="--recipes: unknown recipe 'c'; recipes are a,b"):
        harness.chosen("recipes", "a,c", {"a": 1, "b": 2})


def test_measure_against_dense_retunes_one_model_as_a_reload_at_each_tau_would(tmp_path):
    spkv_path = tiny_checkpoint(tmp_path / "spkv.pt")
    dense_path = tiny_checkpoint(tmp_path / "dense.pt", seed=1, dense_layers=(0, 1))
    folder = datalib.prepare(tiny_text_dir(tmp_path / "text"), load_model(spkv_path)[1])
    train, val = datalib.Batches(folder, "train", 48), datalib.Batches(folder, "val", 48)
    m = harness.measure_against_dense(spkv_path, dense_path, val, (0.3, 0.7), 1, 2, budgets=(0.5,),
                                      target_density=0.5, calibrate_on=train, with_sinks=True)
    assert m["trained_tau"] == 0.5 and [b["density"] for b in m["budgets"]] == [0.5]
    assert [p["tau"] for p in m["points"]] == sorted({0.3, 0.5, 0.7, m["calibrated_tau"]})
    for p in m["points"]:
        reloaded = load_model(spkv_path, tau=p["tau"])[0].eval()
        assert (p["loss"], p["density"]) == taulib.hard_loss_and_density(reloaded, val, p["tau"], 1, 2)
        assert p["first_token_kept"] == harness.first_token_keep_rate(reloaded, val, p["tau"], 1, 2)
        assert p["with_sinks"] == harness.loss_with_sinks(reloaded, val, p["tau"], 1, 2)


def test_sink_diagnostic_matches_the_hard_view_when_every_pair_is_kept(tmp_path):
    """At tau = 0 every gate keeps its pair, so the first token is kept everywhere and forcing the
    sinks in changes nothing: the loss equals tau.hard_loss_and_density's on the same batches. At
    tau = 1 no gate keeps its pair, so the sinks are the only old keys and the loss moves."""
    model, tok = load_model(tiny_checkpoint(tmp_path / "bytes.pt"))[:2]
    val = datalib.Batches(datalib.prepare(tiny_text_dir(tmp_path / "text"), tok), "val", 48)
    model.retune(window=4).eval()
    assert harness.first_token_keep_rate(model, val, 0.0, 2, 2) == 1.0
    assert harness.loss_with_sinks(model, val, 0.0, 2, 2) == pytest.approx(
        taulib.hard_loss_and_density(model, val, 0.0, 2, 2)[0], rel=1e-5)
    assert harness.first_token_keep_rate(model, val, 1.0, 2, 2) == 0.0
    assert harness.loss_with_sinks(model, val, 1.0, 2, 2) != pytest.approx(
        taulib.hard_loss_and_density(model, val, 1.0, 2, 2)[0], rel=1e-5)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag_with_its_meaning(script, monkeypatch, capsys):
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    with pytest.raises(SystemExit) as stop:
        cli.run(module.main, f"{script}.py")
    out = capsys.readouterr().out
    assert stop.value.code == 0
    for name, meaning in cli.meanings(module.Flags).items():
        assert meaning and any(line.strip().startswith(f"--{name}=") and line.rstrip().endswith(meaning)
                               for line in out.splitlines()), name


@pytest.mark.parametrize("script,flag", [("ablate", "--rows=lr7"), ("smollm2", "--recipes=x5")])
def test_bad_input_is_one_line_and_exit_status_2(script, flag, tmp_path):
    res = subprocess.run([sys.executable, os.path.join(harness.ROOT, "experiments", f"{script}.py"), flag,
                          f"--out={tmp_path / 'rt'}"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "rt").exists()


def test_two_reservations_of_a_result_name_never_get_the_same_file(tmp_path):
    """new_result_path creates the file it returns, so a second caller (another process) that
    asks before the first has written gets the next name, not the same one."""
    first, second = harness.new_result_path(str(tmp_path), "x"), harness.new_result_path(str(tmp_path), "x")
    assert first != second and os.path.exists(first) and second.endswith("-2.json")
