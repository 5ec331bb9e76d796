"""gpu_check.py's dry run (tiny shapes on the CPU): every part runs and reports its figures, so the
GPU check cannot rot between the rare sessions that have a GPU; a failing part is reported, not fatal;
each run writes a folder of its own, and a run where every part failed exits non-zero."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    res = subprocess.run([sys.executable, "experiments/gpu_check.py", "--dry=True", f"--out={out}",
                          "--parts=tests,decode,train,dynamics,generate"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    folder = run_folder(out)
    with open(folder / "report.json") as f:
        return json.load(f), folder


def run_folder(out):
    """The one folder a run made under --out."""
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def test_every_part_runs_and_reports(report):
    rep, out = report
    parts = rep["parts"]
    assert list(parts) == ["tests", "decode", "train", "dynamics", "generate"]
    assert all(p["status"] == "ok" for p in parts.values()), {k: p.get("tail") for k, p in parts.items()}
    train = parts["train"]["figures"]
    assert {"dense", "spkv", "spkv_gategrad"} <= set(train) and train["spkv_gategrad_over_dense"] > 0
    dyn = parts["dynamics"]["figures"]
    assert dyn["views"] == ["anneal", "soft"] and 0 <= dyn["density"] <= 1
    assert {r[2] for r in parts["decode"]["figures"]["rows"]} == {"paged", "static"}
    assert parts["generate"]["figures"]["same_text_on_every_path"]
    assert (out / "report.md").read_text().count("## ") == 5
    assert len([f for f in out.iterdir() if f.is_file()]) == 7  # report.md, report.json, 5 logs: what comes back
    assert (out / "work" / "train.json").exists()  # the parts' own files stay in work/ (or --scratch)


def test_the_default_run_fits_the_time_a_gpu_is_lent_for():
    """The default parts' limits add up to at most 8 minutes (a lent GPU gives 15 in all, start included)."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import gpu_check

    assert gpu_check.Flags().parts == "tests,decode,train"
    assert sum(gpu_check.LIMITS[p] for p in gpu_check.DEFAULT_PARTS) <= 480


def test_a_failing_part_is_reported_and_the_rest_still_run(tmp_path):
    """generate needs the dynamics checkpoint: alone it fails, and the report says so."""
    res = subprocess.run([sys.executable, "experiments/gpu_check.py", "--dry=True", f"--out={tmp_path}", "--parts=generate,train"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rep = json.loads((run_folder(tmp_path) / "report.json").read_text())["parts"]
    assert rep["generate"]["status"] == "FAILED" and "dynamics" in rep["generate"]["tail"]
    assert rep["train"]["status"] == "ok"


def test_unknown_part_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "experiments/gpu_check.py", "--parts=tests,bogus", f"--out={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "unknown part 'bogus'" in res.stderr and "Traceback" not in res.stderr


def test_each_run_writes_a_new_folder_and_every_part_failing_exits_non_zero(tmp_path):
    """Two runs into one --out: two folders, the first run's report untouched; generate alone fails
    (no dynamics checkpoint), so each run ends with exit status 1 and one line naming its report."""
    cmd = [sys.executable, "experiments/gpu_check.py", "--dry=True", f"--out={tmp_path}", "--parts=generate"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1 and "Traceback" not in first.stderr, first.stdout + first.stderr
    folder = run_folder(tmp_path)
    assert f"every part failed or timed out (generate); see {folder / 'report.md'}" in first.stderr
    report = (folder / "report.json").read_bytes()
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1, second.stderr
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 2 and (folder / "report.json").read_bytes() == report
    assert all((f / "report.md").exists() for f in folders)
