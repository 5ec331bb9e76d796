"""experiments/mainflow.py at tiny size: SP-KV and its dense twin train through train.py, every
figure is measured at every tau on both, finished runs are kept, and each result is a new file."""

import json

import pytest
import torch

import mainflow
from checkpoint import load_model
from cli import BadInput
from tiny import tiny_checkpoint, tiny_text_dir


def test_flow_measures_every_tau_and_never_replaces_results(tmp_path, capsys):
    base = tiny_checkpoint(tmp_path / "base.pt", dense_layers=(0, 1))
    argv = [f"--out={tmp_path / 'mf'}", "--tiny=True", f"--base={base}", f"--data={tiny_text_dir(tmp_path / 'text')}",
            "--steps=4", "--window=8", "--batch_size=2", "--eval_batches=1", "--eval_batch_size=2", "--threads=1",
            "--taus=0.3,0.9"]
    mainflow.main(argv)
    first = sorted((tmp_path / "mf" / "results").glob("mainflow-*.json"))
    assert len(first) == 1 and first[0].with_suffix(".png").stat().st_size > 1000
    res = json.loads(first[0].read_text())
    (r,) = res["results"]
    assert r["run"] == "spkv_paper_s1337" and r["dense"] == "dense_s1337" and res["commit"]
    m = r["measured"]["stdlib"]
    assert [p["tau"] for p in m["points"]] == sorted({0.5, m["calibrated_tau"], 0.3, 0.9})
    assert 0 < m["calibrated_tau"] <= 1  # the tau that keeps --target_density of old pairs on training text
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
    with pytest.raises(BadInput, match="target_density"):
        mainflow.main(argv + ["--target_density=0"])
    with pytest.raises(BadInput, match="each tau must be in"):
        mainflow.main(argv[:-1] + ["--taus=0.5,1"])


def test_the_from_scratch_flow_trains_spkv_from_step_0_and_its_last_leg_starts_from_it(tmp_path):
    """pretrain.py --spkv_window: the curriculum with SP-KV from scratch, soft gates in every stage,
    each stage measured under hard gates; mainflow.py --spkv_base then runs its last leg (the
    freeze-and-anneal) from that snapshot, against the dense twin from the dense pretraining."""
    import pretrain
    text = tiny_text_dir(tmp_path / "text")
    common = ["--tiny=True", f"--data={text}", "--warmup_steps=2", "--threads=1", "--steps=3", "--stage_steps=3"]
    pretrain.main([f"--out={tmp_path / 'dense'}", *common])
    pretrain.main([f"--out={tmp_path / 'spkv'}", "--spkv_window=8", *common])
    stage = json.loads((tmp_path / "spkv" / "bar_000003.json").read_text())["bar"]["stdlib"]
    assert 0 <= stage["density"] <= 1 and stage["val_hard"] > 0
    snap = tmp_path / "spkv" / "snapshots" / "step_000003.pt"
    run = json.loads((tmp_path / "spkv" / "run" / "final.json").read_text())["train_config"]
    assert not run["dense"] and run["window"] == 8 and run["freeze_frac"] == 0.0 and run["init"] == "scratch"
    trained = load_model(str(snap))[0]
    biases = [b.attn.predictor.proj.bias for b in trained.blocks]
    assert all(not torch.equal(b, torch.full_like(b, 5.0)) for b in biases)  # the predictors learned in the stage
    base = tmp_path / "dense" / "snapshots" / "step_000003.pt"
    mainflow.main([f"--out={tmp_path / 'mf'}", "--tiny=True", f"--base={base}", f"--spkv_base={snap}", f"--data={text}",
                   "--steps=4", "--window=8", "--batch_size=2", "--eval_batches=1", "--eval_batch_size=2", "--threads=1"])
    cfg = {r: json.loads((tmp_path / "mf" / r / "final.json").read_text())["train_config"]
           for r in ("dense_s1337", "spkv_paper_from_step_000003_s1337")}
    assert cfg["dense_s1337"]["ckpt"] == str(base) and cfg["spkv_paper_from_step_000003_s1337"]["ckpt"] == str(snap)
    with pytest.raises(BadInput, match="--ship ships a dense pretraining"):
        pretrain.main([f"--out={tmp_path / 'spkv'}", "--spkv_window=8", "--ship=3", *common])
