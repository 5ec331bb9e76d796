"""experiments/smollm2.py at tiny size: each recipe adapts the given checkpoint against one dense
run, measured at its trained tau and a calibrated one with the sink diagnostic; every run writes a
new dated result file and never replaces an earlier one."""

import json

import pytest

import smollm2
from cli import BadInput
from tiny import tiny_checkpoint, tiny_text_dir


def test_recipes_adapt_the_checkpoint_against_dense_and_each_run_writes_a_new_file(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "bytes.pt", predictors=False)  # pretrained weights, as convert.py stores them
    out = tmp_path / "rt"
    flags = [f"--out={out}", "--tiny=True", "--steps=2", "--eval_batches=1", "--threads=1",
             "--target_density=0.5", f"--ckpt={ckpt}", f"--data={tiny_text_dir(tmp_path / 'text')}"]
    smollm2.main(flags + ["--recipes=x100,wd10"])
    (first,) = (out / "results").glob("smollm2-*.json")
    before = first.read_bytes()
    assert not (out / "smollm2_spkv_neutral").exists()
    smollm2.main(flags + ["--recipes=neutral"])  # one more recipe: a file of its own, the first kept
    files = sorted((out / "results").glob("smollm2-*.json"))
    assert len(files) == 2 and first.read_bytes() == before
    results = {r["recipe"]: r for f in files for r in json.loads(f.read_text())["results"]["recipes"]}
    assert set(results) == {"x100", "wd10", "neutral"}
    dense = json.loads((out / "smollm2_dense" / "final.json").read_text())
    assert dense["train_config"]["dense"]
    fulls = set()
    for name, res in results.items():
        spkv = json.loads((out / f"smollm2_spkv_{name}" / "final.json").read_text())
        assert spkv["train_config"]["ckpt"] == dense["train_config"]["ckpt"] == ckpt  # all start from it
        m = res["measured"]
        assert m["trained_tau"] == spkv["train_config"]["tau"] and 0 <= m["calibrated_tau"] <= 1
        assert res["final_eval"]["density_per_layer"] == spkv["density_per_layer"] and res["why"]
        for p in m["points"]:
            assert 0 <= p["density"] <= 1 and 0 <= p["first_token_kept"] <= 1
            assert all(p[k] > 0 for k in ("loss", "h2o", "streaming", "with_sinks"))
        assert m["window"] > 0
        fulls.add(m["dense_full"])
    assert len(fulls) == 1  # one dense reference for every recipe
    for name, decay, bias in (("x100", 0.1, 5), ("wd10", 10, 5), ("neutral", 0.1, 0)):
        saved = json.loads((out / f"smollm2_spkv_{name}" / "final.json").read_text())["train_config"]
        assert (saved["predictor_lr_mult"], saved["predictor_weight_decay"], saved["predictor_init_bias"]) == (100, decay, bias)
    with pytest.raises(BadInput, match="unknown recipe 'x5'"):
        smollm2.main(flags + ["--recipes=x5"])


def test_spkv_base_starts_the_spkv_runs_from_fitted_gates_beside_the_same_dense_run(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "bytes.pt", predictors=False)
    fitted = tiny_checkpoint(tmp_path / "learned_w8.pt", seed=1)  # stands for ceiling.py's learned-gates checkpoint
    out = tmp_path / "rt"
    flags = [f"--out={out}", "--tiny=True", "--steps=2", "--eval_batches=1", "--threads=1", "--recipes=paper",
             f"--ckpt={ckpt}", f"--data={tiny_text_dir(tmp_path / 'text')}"]
    with pytest.raises(BadInput, match="--spkv_base=.*does not exist"):
        smollm2.main(flags + [f"--spkv_base={tmp_path / 'none.pt'}"])
    smollm2.main(flags + [f"--spkv_base={fitted}"])
    run = out / "smollm2_spkv_paper_from_learned_w8"
    spkv = json.loads((run / "final.json").read_text())["train_config"]
    dense = json.loads((out / "smollm2_dense" / "final.json").read_text())["train_config"]
    assert spkv["ckpt"] == fitted and dense["ckpt"] == ckpt and spkv["predictor_lr_mult"] == 5
    (path,) = (out / "results").glob("smollm2-*.json")
    (res,) = json.loads(path.read_text())["results"]["recipes"]
    assert res["run"] == run.name and res["recipe"] == "paper"
    with pytest.raises(BadInput, match="--tau=1.0 must be in"):
        smollm2.main(flags + [f"--spkv_base={fitted}", "--tau=1.0"])
    smollm2.main(flags + [f"--spkv_base={fitted}", "--tau=0.3"])  # another tau: a run of its own, the first kept
    cut = json.loads((out / f"{run.name}_tau0.3" / "final.json").read_text())["train_config"]
    assert cut["tau"] == 0.3 and spkv["tau"] == 0.5 and cut["ckpt"] == fitted


def test_another_seed_trains_a_dense_run_and_spkv_runs_of_its_own(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "bytes.pt", predictors=False)
    out = tmp_path / "rt"
    flags = [f"--out={out}", "--tiny=True", "--steps=2", "--eval_batches=1", "--threads=1", "--recipes=neutral",
             f"--ckpt={ckpt}", f"--data={tiny_text_dir(tmp_path / 'text')}"]
    with pytest.raises(BadInput, match="--seed=-1 must be in"):
        smollm2.main(flags + ["--seed=-1"])
    smollm2.main(flags)
    first = (out / "smollm2_dense" / "final.json").read_bytes()
    smollm2.main(flags + ["--seed=7"])
    assert (out / "smollm2_dense" / "final.json").read_bytes() == first  # the default seed's runs are kept
    for run in ("smollm2_dense_s7", "smollm2_spkv_neutral_s7"):
        assert json.loads((out / run / "final.json").read_text())["train_config"]["seed"] == 7
    assert json.loads(first)["train_config"]["seed"] == 1337
    newest = max((out / "results").glob("smollm2-*.json"), key=lambda p: p.stat().st_mtime_ns)
    (res,) = json.loads(newest.read_text())["results"]["recipes"]
    assert (res["run"], res["dense"]) == ("smollm2_spkv_neutral_s7", "smollm2_dense_s7")
