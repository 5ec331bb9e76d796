"""experiments/realtext.py at tiny size: both flows train through train.py, every figure is measured
and written as a new dated result file (JSON and PNG) stamped with the commit, a second run keeps
the finished runs and the first result, --tiny=True has its own out folder, and train.py's refusal
comes back as one line."""

import json
import os

import pytest

import realtext
from cli import BadInput
from tiny import tiny_checkpoint, tiny_text_dir


def test_flows_write_every_figure_to_a_new_file_and_keep_finished_runs(tmp_path, monkeypatch, capsys):
    ckpt = tiny_checkpoint(tmp_path / "bytes.pt")
    monkeypatch.chdir(tmp_path)  # no --out: the tiny default, out/realtext_tiny, lands here
    argv = ["--tiny=True", "--scratch_steps=4", "--adapt_steps=3", "--eval_batches=1", "--threads=1",
            f"--ckpt={ckpt}", f"--data={tiny_text_dir(tmp_path / 'text')}"]
    realtext.main(argv)
    out = tmp_path / "out" / "realtext_tiny"
    (first,) = (out / "results").glob("realtext-*.json")
    assert first.with_suffix(".png").stat().st_size > 1000 and not (tmp_path / "out" / "realtext").exists()
    saved = json.loads(first.read_text())
    assert saved["commit"] and saved["date"] in first.name and saved["flags"]["tiny"]
    res = saved["results"]
    assert [(r["flow"], r["text"]) for r in res["measured"]] == [
        ("scratch", "stdlib"), ("scratch", "prose"), ("adapt", "stdlib"), ("adapt", "prose")]
    for r in res["measured"]:
        m = r["measured"]
        assert [p["tau"] for p in m["points"]] == sorted({0.5, *realtext.TAUS})
        assert all(0 <= p["density"] <= 1 and p["loss"] > 0 and p["h2o"] > 0 and p["streaming"] > 0
                   and 0 <= p["first_token_kept"] <= 1 for p in m["points"])
        assert [b["density"] for b in m["budgets"]] == list(realtext.BUDGETS)
        assert all(b["h2o"] > 0 and b["streaming"] > 0 for b in m["budgets"])
        assert all(m[k] > 0 for k in ("dense_full", "window", "spkv_soft"))
    assert set(res["runs"]) == set(realtext.RUNS) and all(r["why"] for r in res["runs"].values())
    assert res["runs"]["scratch_spkv"]["final_eval"]["density"] >= 0
    adapt = json.loads((out / "adapt_spkv" / "final.json").read_text())["train_config"]
    assert adapt["init"] == "pretrained" and adapt["ckpt"].endswith(os.path.join("scratch_dense", "ckpt.pt"))
    assert adapt["predictor_lr_mult"] == 100
    before = first.read_bytes()
    capsys.readouterr()
    realtext.main(argv + ["--eval_only=True"])  # again: the four runs are kept, only the measurements rerun
    assert capsys.readouterr().out.count("finished earlier, kept") == 4
    assert len(list((out / "results").glob("realtext-*.json"))) == 2 and first.read_bytes() == before


def test_a_refusal_of_train_py_comes_back_as_one_line(tmp_path):
    with pytest.raises(BadInput, match=r"train.py into .*scratch_dense stopped with exit status 2: \S") as refused:
        realtext.main([f"--out={tmp_path / 'rt'}", "--tiny=True", f"--ckpt={tiny_checkpoint(tmp_path / 'b.pt')}",
                       f"--data={tmp_path / 'no_such_text'}", "--threads=1"])
    assert "\n" not in str(refused.value)
    with pytest.raises(BadInput, match="--out is empty"):  # runs would land in the working directory
        realtext.main(["--out=", "--tiny=True"])
    with pytest.raises(BadInput, match="no finished run"):
        realtext.main([f"--out={tmp_path / 'empty'}", "--tiny=True", "--eval_only=True"])


def test_the_figure_has_one_legend_and_a_colour_and_marker_per_policy():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = {"points": [{"density": 0.5, "loss": 5.0, "h2o": 5.2, "streaming": 5.1}],
         "budgets": [{"density": 0.1, "h2o": 5.4, "streaming": 5.2}], "window": 5.3, "dense_full": 5.05}
    results = [{"flow": flow, "text": text, "measured": m} for flow in realtext.FLOWS for text in ("stdlib", "prose")]
    fig = realtext.loss_density_figure(plt, results)
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)  # one, for the whole figure
    assert len(fig.legends[0].get_texts()) == 5
    for ax in fig.axes:
        styles = [(line.get_color(), line.get_marker()) for line in ax.lines if line.get_marker() != "None"]
        assert len(styles) == 4 and len({c for c, _ in styles}) == 4 and len({mk for _, mk in styles}) == 4
    plt.close(fig)
