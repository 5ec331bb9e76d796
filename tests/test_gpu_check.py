"""gpu_check.py's dry run (tiny shapes on the CPU): every part runs and reports its figures, so the
GPU check cannot rot between the rare sessions that have a GPU; a failing part is reported, not fatal."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    res = subprocess.run([sys.executable, "experiments/gpu_check.py", "--dry=True", f"--out={out}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    with open(out / "report.json") as f:
        return json.load(f), out


def test_every_part_runs_and_reports(report):
    rep, out = report
    parts = rep["parts"]
    assert list(parts) == ["tests", "train", "dynamics", "decode", "generate"]
    assert all(p["status"] == "ok" for p in parts.values()), {k: p.get("tail") for k, p in parts.items()}
    train = parts["train"]["figures"]
    assert {"dense", "spkv", "spkv_no_gate_grad"} <= set(train) and train["spkv_over_dense"] > 0
    dyn = parts["dynamics"]["figures"]
    assert dyn["views"] == ["anneal", "soft"] and 0 <= dyn["density"] <= 1
    assert {r[2] for r in parts["decode"]["figures"]["rows"]} == {"paged", "paged_flex"}
    assert parts["generate"]["figures"]["same_text_on_every_path"]
    assert (out / "report.md").read_text().count("## ") == 5


def test_a_failing_part_is_reported_and_the_rest_still_run(tmp_path):
    """generate needs the dynamics checkpoint: alone it fails, and the report says so."""
    res = subprocess.run([sys.executable, "experiments/gpu_check.py", "--dry=True", f"--out={tmp_path}", "--parts=generate,train"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "report.json").read_text())["parts"]
    assert rep["generate"]["status"] == "FAILED" and "dynamics" in rep["generate"]["tail"]
    assert rep["train"]["status"] == "ok"


def test_unknown_part_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "experiments/gpu_check.py", "--parts=tests,bogus", f"--out={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "unknown part 'bogus'" in res.stderr and "Traceback" not in res.stderr
