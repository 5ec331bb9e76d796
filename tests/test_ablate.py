"""experiments/ablate.py at tiny size: each row is tabulated against its own dense run, at its
trained tau and at a calibrated one; an interrupted row is resumed, not retrained; every run
writes a new dated result file and never replaces an earlier one."""

import json

import pytest

import ablate
from cli import BadInput
from tiny import tiny_checkpoint, tiny_text_dir


def test_rows_are_measured_against_their_own_dense_runs_and_results_accumulate_as_files(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "bytes.pt")
    out = tmp_path / "rt"
    flags = [f"--out={out}", "--tiny=True", "--scratch_steps=2", "--eval_batches=1", "--threads=1", f"--ckpt={ckpt}",
             f"--data={tiny_text_dir(tmp_path / 'text')}"]
    ablate.main(flags + ["--rows=paper,ctx_half"])
    (first,) = (out / "results").glob("ablate-*.json")
    saved = json.loads(first.read_text())
    assert saved["commit"] and saved["flags"]["rows"] == "paper,ctx_half"
    rows = {r["row"]: r for r in saved["results"]["rows"]}
    assert list(rows) == ["paper", "ctx_half"]
    for key, dense in (("paper", "scratch_dense"), ("ctx_half", "dense_ctx_half")):
        run = json.loads((out / f"ablate_{key}" / "final.json").read_text())
        base = json.loads((out / dense / "final.json").read_text())
        assert base["train_config"]["dense"] and not run["train_config"]["dense"] and rows[key]["dense"] == dense
        r = rows[key]
        assert r["final_eval"]["val_hard"] == run["val_hard"] and r["dense_final_eval"]["val_hard"] == base["val_hard"]
        assert len(r["final_eval"]["density_per_layer"]) == 2 and r["final_eval"]["density"] == run["density"]
        assert r["density_by_eval"][-1] == [2, run["density"]]  # the last eval is the final one
        m = r["measured"]  # held out, at the trained tau and at the one calibrated for --target_density
        assert m["trained_tau"] == run["train_config"]["tau"] and 0 <= m["calibrated_tau"] <= 1
        for p in m["points"]:
            assert 0 <= p["density"] <= 1 and all(p[k] > 0 for k in ("loss", "h2o", "streaming", "with_sinks"))
        assert m["dense_full"] > 0 and m["window"] > 0 and r["why"]
    half = json.loads((out / "ablate_ctx_half" / "final.json").read_text())["train_config"]
    assert (half["seq_len"], half["batch_size"]) == (32, 4)  # half the context, the same tokens a step
    (out / "ablate_paper" / "final.json").unlink()  # as if killed after its last checkpoint
    before = first.read_bytes()
    capsys.readouterr()
    ablate.main(flags + ["--rows=paper"])
    assert "--resume=True" in capsys.readouterr().out  # continued from its checkpoint, not refused or retrained
    assert json.loads((out / "ablate_paper" / "final.json").read_text())["val_hard"] == rows["paper"]["final_eval"]["val_hard"]
    files = sorted((out / "results").glob("ablate-*.json"))
    assert len(files) == 2 and first.read_bytes() == before  # a new file; the first, with both rows, kept
    with pytest.raises(BadInput, match="unknown row 'lr7'"):
        ablate.main(flags + ["--rows=paper,lr7"])


def test_every_row_and_dense_run_has_a_reason_and_the_control_shuts_every_gate():
    table, dense = ablate.rows(ablate.harness.SHAPES[False]), ablate.dense_runs(ablate.harness.SHAPES[False])
    assert all(why for *_, why in table.values()) and all(why for _, why in dense.values())
    assert {d for _, _, d, _ in table.values()} == set(dense)
    assert table["shut"][1] == {"predictor_init_bias": -30}
    runs = ablate.plan({"tiny": False, "scratch_steps": 150, "rows": "", "data": "", "ckpt": ""})
    assert runs["scratch_dense"]["dense"] and runs["ablate_lr20"]["predictor_lr_mult"] == 20
