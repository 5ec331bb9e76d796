"""realtext.py's plumbing at tiny sizes: both flows train through train.py, every figure of the table
is measured and written (results.json, the PNG), and finished runs are kept, never retrained."""

import json
import os

import realtext
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
        assert all(r[k] > 0 for k in ("spkv_hard", "spkv_soft", "full", "h2o", "streaming", "window"))
    assert (tmp_path / "rt" / "loss_vs_density.png").stat().st_size > 1000
    adapt = json.loads((tmp_path / "rt" / "adapt_spkv" / "final.json").read_text())["train_config"]
    assert adapt["init"] == "pretrained" and adapt["ckpt"].endswith(os.path.join("scratch_dense", "ckpt.pt"))
    capsys.readouterr()
    realtext.main(argv)  # again: the four runs are kept, only the measurements rerun
    assert capsys.readouterr().out.count("finished earlier, kept") == 4
