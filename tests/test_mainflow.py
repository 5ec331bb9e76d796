"""experiments/mainflow.py at tiny size: SP-KV and its dense twin train through train.py, every
figure is measured at every tau on both, finished runs are kept, and each result is a new file."""

import json

import pytest

import mainflow
from cli import BadInput
from tiny import tiny_checkpoint, tiny_text_dir


def test_flow_measures_every_tau_and_never_replaces_results(tmp_path, capsys):
    base = tiny_checkpoint(tmp_path / "base.pt", dense_layers=(0, 1))
    argv = [f"--out={tmp_path / 'mf'}", "--tiny=True", f"--base={base}", f"--data={tiny_text_dir(tmp_path / 'text')}",
            "--steps=4", "--window=8", "--batch_size=2", "--eval_batches=1", "--eval_batch_size=2", "--threads=1"]
    mainflow.main(argv)
    first = sorted((tmp_path / "mf" / "results").glob("mainflow-*.json"))
    assert len(first) == 1 and first[0].with_suffix(".png").stat().st_size > 1000
    res = json.loads(first[0].read_text())
    (r,) = res["results"]
    assert r["run"] == "spkv_paper_s1337" and r["dense"] == "dense_s1337" and res["commit"]
    m = r["measured"]["stdlib"]
    assert [p["tau"] for p in m["points"]] == sorted({0.5, *mainflow.TAUS})
    assert all(0 <= p["density"] <= 1 and p["h2o"] > 0 and p["streaming"] > 0 and 0 <= p["first_token_kept"] <= 1
               for p in m["points"])
    assert m["dense_full"] > 0 and m["window"] > 0
    dense = json.loads((tmp_path / "mf" / "dense_s1337" / "final.json").read_text())["train_config"]
    spkv = json.loads((tmp_path / "mf" / "spkv_paper_s1337" / "final.json").read_text())["train_config"]
    assert dense["dense"] and not spkv["dense"] and dense["seed"] == spkv["seed"] == 1337
    assert (spkv["predictor_lr_mult"], spkv["predictor_init_bias"]) == (5.0, 5.0)  # the paper's recipe
    capsys.readouterr()
    mainflow.main(argv + ["--eval_only=True"])
    assert capsys.readouterr().out.count("finished earlier, kept") == 2
    assert len(list((tmp_path / "mf" / "results").glob("mainflow-*.json"))) == 2  # a new file, the first kept
    with pytest.raises(BadInput, match="unknown recipe"):
        mainflow.main(argv + ["--recipes=nope"])
