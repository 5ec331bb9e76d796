"""realtext.py's plumbing at tiny sizes: both flows train through train.py, every figure of the table
is measured and written (results.json, the PNG), finished runs are kept, never retrained, and a
finished run made with other flags is refused; the ablation compares each row with its own dense run."""

import json
import os

import pytest

import harness
import realtext
from cli import BadInput
from tiny import tiny_checkpoint, tiny_text_dir


def test_flow_writes_every_figure_and_keeps_finished_runs(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "bytes.pt")
    argv = [f"--out={tmp_path / 'rt'}", "--tiny=True", "--scratch_steps=4", "--adapt_steps=3", "--eval_batches=1",
            f"--ckpt={ckpt}", f"--data={tiny_text_dir(tmp_path / 'text')}"]
    realtext.main(argv)
    res = json.loads((tmp_path / "rt" / "results.json").read_text())
    assert set(res) == {"scratch/stdlib", "scratch/prose", "adapt/stdlib", "adapt/prose"}
    for r in res.values():
        assert 0 <= r["density"] <= 1 and len(r["tau_sweep"]) == 5
        assert [b["density"] for b in r["budget_sweep"]] == list(realtext.BUDGETS)
        assert all(b["h2o"] > 0 and b["streaming"] > 0 for b in r["budget_sweep"])
        assert all(r[k] > 0 for k in ("spkv_hard", "spkv_soft", "full", "h2o", "streaming", "window"))
    assert (tmp_path / "rt" / "loss_vs_density.png").stat().st_size > 1000
    adapt = json.loads((tmp_path / "rt" / "adapt_spkv" / "final.json").read_text())["train_config"]
    assert adapt["init"] == "pretrained" and adapt["ckpt"].endswith(os.path.join("scratch_dense", "ckpt.pt"))
    capsys.readouterr()
    realtext.main(argv)  # again: the four runs are kept, only the measurements rerun
    assert capsys.readouterr().out.count("finished earlier, kept") == 4


def test_ablation_rows_are_tabulated_against_their_own_dense_runs(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "bytes.pt")
    out = tmp_path / "rt"
    realtext.main([f"--out={out}", "--tiny=True", "--scratch_steps=2", "--ablate=True", "--rows=paper,ctx_half",
                   f"--ckpt={ckpt}", f"--data={tiny_text_dir(tmp_path / 'text')}"])
    rows = {r["row"]: r for r in json.loads((out / "ablation.json").read_text())}
    assert set(rows) == {"paper", "ctx_half"}
    for key, dense in (("paper", "scratch_dense"), ("ctx_half", "dense_ctx_half")):
        run = json.loads((out / f"ablate_{key}" / "final.json").read_text())
        base = json.loads((out / dense / "final.json").read_text())
        assert base["train_config"]["dense"] and not run["train_config"]["dense"]
        assert rows[key]["spkv_hard"] == run["val_hard"] and rows[key]["dense"] == base["val_hard"]
        assert len(rows[key]["per_layer"]) == 2 and rows[key]["density"] == run["density"]
        assert rows[key]["density_by_eval"][-1] == [2, run["density"]]  # the last eval is the final one
        cal = rows[key]["calibrated"]  # the row at the tau calibrated for --target_density, held out
        assert 0 <= cal["tau"] <= 1 and 0 <= cal["density"] <= 1
        assert all(cal[k] > 0 for k in ("spkv_hard", "full", "h2o", "streaming"))
    half = json.loads((out / "ablate_ctx_half" / "final.json").read_text())["train_config"]
    assert (half["seq_len"], half["batch_size"]) == (32, 4)  # half the context, the same tokens a step
    (out / "ablate_paper" / "final.json").unlink()  # as if killed after its last checkpoint
    capsys.readouterr()
    realtext.main([f"--out={out}", "--tiny=True", "--scratch_steps=2", "--ablate=True", "--rows=paper",
                   f"--ckpt={ckpt}", f"--data={tiny_text_dir(tmp_path / 'text')}"])
    assert "--resume=True" in capsys.readouterr().out  # continued from its checkpoint, not refused or retrained
    assert json.loads((out / "ablate_paper" / "final.json").read_text())["val_hard"] == rows["paper"]["spkv_hard"]
    assert {r["row"] for r in json.loads((out / "ablation.json").read_text())} == {"paper", "ctx_half"}  # kept


def test_smollm2_flow_adapts_the_given_checkpoint_against_dense_and_calibrates_tau(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "bytes.pt")
    out = tmp_path / "rt"
    flags = [f"--out={out}", "--tiny=True", "--smollm2=True", "--smollm2_steps=2", "--eval_batches=1",
             "--target_density=0.5", f"--ckpt={ckpt}", f"--data={tiny_text_dir(tmp_path / 'text')}"]
    realtext.main(flags + ["--rows=x100,wd10"])
    first = json.loads((out / "smollm2.json").read_text())
    assert set(first) == {"x100", "wd10"} and not (out / "smollm2_spkv_neutral").exists()
    realtext.main(flags + ["--rows=neutral"])  # one more recipe: the others' entries are kept as they were
    results = json.loads((out / "smollm2.json").read_text())
    assert set(results) == {"x100", "wd10", "neutral"} and results["x100"] == first["x100"]
    dense = json.loads((out / "smollm2_dense" / "final.json").read_text())
    assert dense["train_config"]["dense"]
    for name, res in results.items():
        spkv = json.loads((out / f"smollm2_spkv_{name}" / "final.json").read_text())
        assert spkv["train_config"]["ckpt"] == dense["train_config"]["ckpt"] == ckpt  # all start from it
        assert res["trained"]["tau"] == spkv["train_config"]["tau"]
        assert 0 <= res["calibrated"]["tau"] <= 1 and res["density_per_layer"] == spkv["density_per_layer"]
        for r in (res["trained"], res["calibrated"]):
            assert 0 <= r["density"] <= 1
            assert all(r[k] > 0 for k in ("spkv_hard", "full", "window", "h2o", "streaming", "spkv_with_sinks"))
            assert 0 <= r["first_kept"] <= 1
        assert res["trained"]["full"] == res["calibrated"]["full"]  # one dense reference for every row
    for name, decay, bias in (("x100", 0.1, 5), ("wd10", 10, 5), ("neutral", 0.1, 0)):
        saved = json.loads((out / f"smollm2_spkv_{name}" / "final.json").read_text())["train_config"]
        assert (saved["predictor_lr_mult"], saved["predictor_weight_decay"], saved["predictor_init_bias"]) == (100, decay, bias)
    with pytest.raises(BadInput, match="unknown row 'x5'"):
        realtext.main(flags + ["--rows=x5"])
    with pytest.raises(BadInput, match="two different experiments"):
        realtext.main([f"--out={out}", "--smollm2=True", "--ablate=True"])


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
    with pytest.raises(BadInput, match="--out is empty"):  # runs would land in the working directory
        realtext.main(["--out=", "--tiny=True"])
    with pytest.raises(BadInput, match="unknown row 'lr7'"):
        realtext.ablation_runs({"tiny": True, "scratch_steps": 2, "rows": "paper,lr7", "data": "", "ckpt": ""})


def test_sink_diagnostic_matches_the_hard_view_when_every_pair_is_kept(tmp_path):
    """At tau = 0 every gate keeps its pair, so the first token is kept everywhere and forcing the
    sinks in changes nothing: the loss equals tau.hard_loss_and_density's on the same batches. At
    tau = 1 no gate keeps its pair, so the sinks are the only old keys and the loss moves."""
    import data as datalib
    import tau as taulib
    from checkpoint import load_model
    model, tok = load_model(tiny_checkpoint(tmp_path / "bytes.pt"))[:2]
    val = datalib.Batches(datalib.prepare(tiny_text_dir(tmp_path / "text"), tok), "val", 48)
    model.retune(window=4)
    first_kept, with_sinks = realtext.sink_diagnostic(model.eval(), val, 0.0, 2, 2)
    assert first_kept == 1.0
    assert with_sinks == pytest.approx(taulib.hard_loss_and_density(model, val, 0.0, 2, 2)[0], rel=1e-5)
    first_kept, with_sinks = realtext.sink_diagnostic(model, val, 1.0, 2, 2)
    assert first_kept == 0.0
    assert with_sinks != pytest.approx(taulib.hard_loss_and_density(model, val, 1.0, 2, 2)[0], rel=1e-5)
