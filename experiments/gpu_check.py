"""Check and measure the GPU paths in one prepared command of about 8 minutes, and write a short
report (markdown + JSON): what a session lent a GPU for a quarter of an hour runs once.

    python experiments/gpu_check.py --out=$OUT               # tests, decode, train: about 8 min on one GPU
    python experiments/gpu_check.py --parts=decode           # some parts (each part is one --parts name)
    python experiments/gpu_check.py --parts=dynamics,generate  # the longer extras, not in the default run
    python experiments/gpu_check.py --dry=True               # tiny shapes on the CPU, no compile: CI runs it (tests/test_gpu_check.py)

Parts, in order, each run in its own process with its own time limit (LIMITS, capped by
--limit_s), so one failure or hang never ends the report (its row says FAILED or TIMEOUT and the
tail of what it printed); the environment (torch, triton, device) heads the report:
  tests     the CUDA-only, compiled and graph tests with the GPU visible
  decode    bench_decode.py: batch 16, bf16, contexts 8k and 32k, densities 10% and 25%: the
            static step recorded as a CUDA graph on both sides (static_graph: SP-KV and the dense
            cache, no host sync, no compile), and today's eager paged step beside it, with the
            bytes ideal
  train     one training step at the gpu preset's shape (SmolLM2-135M shape, random weights, batch 8
            x 4096, bf16, blocks compiled): dense, SP-KV (flex_compiled), and SP-KV with the gate
            gradient computed outside the kernel (flex_gategrad); MFU, graphs, graph breaks
  dynamics  (extra) a short train.py run from scratch on stdlib source (byte-level model) through
            soft, anneal and hard gates
  generate  (extra) generate.py end to end with the dynamics checkpoint on every decode path
Needs nothing but this folder: random weights, a byte-level tokenizer, the interpreter's stdlib.
Each run writes into a folder of its own under --out, named by the date and the commit
(--out/<date>-<commit>, -2, -3 ... on a second run that day): report.md, report.json and each
part's log (5 files for the default parts; the parts' checkpoints, data and figures go to its
work/ folder, or to --scratch), so no earlier run's results are ever replaced. On a lent GPU, where
at most 8 files come back from $OUT:

    python experiments/gpu_check.py --out=$OUT --scratch=/tmp/gpu_check_work

The
exit status is 1 when every part failed or timed out, 0 when at least one part reported its figures.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: python experiments/<name>.py

import cli

PARTS = ("tests", "decode", "train", "dynamics", "generate")
DEFAULT_PARTS = ("tests", "decode", "train")  # about 8 minutes in all on one H200, startup included
LIMITS = {"tests": 150, "decode": 150, "train": 170, "dynamics": 540, "generate": 300}  # seconds per part


@dataclass
class Flags:
    parts: str = ",".join(DEFAULT_PARTS)  # comma list of parts to run, in this order
    out: str = "runs/gpu_check"  # each run writes report.md, report.json and the parts' logs to a new folder in it
    scratch: str = ""  # where the parts keep checkpoints, data and their figures; "" = <the run's folder>/work
    dry: bool = False  # tiny shapes on the CPU (CI): checks the plumbing, measures nothing
    limit_s: int = 600  # the most any one part may take, seconds (each part's own limit is LIMITS)
    part: str = ""  # internal: run one part in this process, into --out as it is


# ---------------------------------------------------------------------------------------------
# The parts. Each returns a dict of figures (JSON-able); raising marks the part FAILED.


def part_tests(dry: bool) -> dict:
    # on the GPU, the CUDA-only tests (the CPU suite is what CI runs); dry, a few flex tests on the CPU
    args = ["tests/test_spkv.py::test_flex_eager_forward_matches_reference_fp32"] if dry else ["tests", "-k", "cuda or compiled or graph"]
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", *args],
                         env={**os.environ, "CI": "true"}, capture_output=True, text=True)
    summary = [line for line in res.stdout.splitlines() if " passed" in line or " failed" in line]
    failed = [line for line in res.stdout.splitlines() if line.startswith("FAILED")]
    print(res.stdout[-4000:])
    if res.returncode != 0:
        raise RuntimeError(f"pytest exit {res.returncode}: {summary[-1:] or res.stdout[-500:]} {failed}")
    return {"summary": summary[-1] if summary else "", "failed": failed}


def train_shape(dry: bool):
    from model import GPTConfig

    if dry:
        return GPTConfig(vocab_size=257, n_layer=2, n_head=6, n_kv_head=2, n_embd=96, n_hidden=192, block_size=128,
                         window=16), 2, 64
    return GPTConfig(), 8, 4096  # SmolLM2-135M shape; the gpu preset's micro-batch


def part_train(dry: bool) -> dict:
    """Time a training micro-step (forward, backward, AdamW) of the three variants."""
    import torch
    from torch._dynamo.utils import counters

    from model import GPT

    device = "cpu" if dry else "cuda"
    cfg, B, T = train_shape(dry)
    steps = 2 if dry else 8
    out = {"shape": f"{cfg.n_layer} layers, d={cfg.n_embd}, {cfg.n_head}/{cfg.n_kv_head} heads, batch {B} x {T}"}
    for name, dense, impl in [("dense", True, "flex_compiled"), ("spkv", False, "flex_compiled"),
                              ("spkv_gategrad", False, "flex_gategrad")]:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        c = dataclasses.replace(cfg, dense_layers=tuple(range(cfg.n_layer)) if dense else ())
        model = GPT(c, attn_impl="sdpa" if dry and impl == "flex_compiled" else impl).to(device)
        if not dry:
            model.compile_blocks()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not dry)
        x = torch.randint(0, c.vocab_size, (B, T), device=device)
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=not dry)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        t_first = time.perf_counter()
        for i in range(2 + steps):
            if i == 2:
                sync()
                t0 = time.perf_counter()
            with autocast:
                loss = model(x, x, a=0.0)[1]  # soft gates: the predictor learns
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i == 0:
                sync()
                first = time.perf_counter() - t_first
        sync()
        dt = (time.perf_counter() - t0) / steps
        mfu = model.flops_per_token(T) * B * T / dt / 989e12  # H100 SXM dense bf16 peak
        out[name] = {"step_ms": 1000 * dt, "tokens_per_s": B * T / dt, "mfu_h100": mfu, "first_step_s": first,
                     "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
                     "max_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0}
        print(name, out[name], flush=True)
        del model, opt
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    out["spkv_over_dense"] = out["spkv"]["step_ms"] / out["dense"]["step_ms"]
    out["spkv_gategrad_over_dense"] = out["spkv_gategrad"]["step_ms"] / out["dense"]["step_ms"]
    return out


def part_dynamics(dry: bool, out: str) -> dict:
    """train.py from scratch (byte-level, stdlib source) through soft, anneal and hard gates."""
    folder = os.path.join(out, "dynamics")
    os.makedirs(out, exist_ok=True)
    tok_ckpt = os.path.join(out, "bytes.pt")
    if not os.path.exists(tok_ckpt):
        import harness  # torch, only once this part runs

        harness.byte_checkpoint(tok_ckpt)
    shape = (["--n_layer=2", "--n_embd=64", "--seq_len=128", "--window=16", "--batch_size=2", "--max_steps=6",
              "--eval_every=3", "--device=cpu", "--preset=cpu"] if dry else
             ["--n_layer=4", "--n_embd=256", "--seq_len=2048", "--window=64", "--batch_size=16", "--grad_accum=1",
              "--max_steps=600", "--eval_every=200", "--eval_batches=4", "--ckpt_every=200", "--preset=gpu"])
    flags = [*shape, "--init=scratch", f"--ckpt={tok_ckpt}", "--gates=", "--lr=2e-3", "--warmup_steps=2" if dry else "--warmup_steps=50",
             "--weight_decay=0.1", f"--out_dir={folder}", f"--data_cache={os.path.join(out, 'data_cache')}"]
    res = subprocess.run([sys.executable, "train.py", *flags], capture_output=True, text=True)
    print(res.stdout[-3000:], res.stderr[-3000:])
    if res.returncode != 0:
        raise RuntimeError(f"train.py exit {res.returncode}: {res.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(folder, "final.json")) as f:
        final = json.load(f)
    with open(os.path.join(folder, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    speed = [r["tokens_per_s"] for r in log if "tokens_per_s" in r][5:] or [0.0]
    return {"flags": " ".join(flags), "val_soft": final["val_soft"], "val_hard": final["val_hard"],
            "density": final.get("density"), "density_per_layer": final.get("density_per_layer"),
            "views": sorted({"anneal" if r["frozen"] else "soft" for r in log if "frozen" in r}), "tokens_per_s_median": sorted(speed)[len(speed) // 2]}


def part_decode(dry: bool, out: str) -> dict:
    """bench_decode.py, one process per path so that one failing path leaves the others' rows."""
    tiny = ["--contexts=64", "--batch=2", "--densities=0.25", "--steps=1", "--repeats=1", "--device=cpu",
            f"--ckpt={tiny_checkpoint(out) if dry else ''}"]
    args = (tiny if dry else
            ["--contexts=8192,32768", "--batch=16", "--densities=0.1,0.25", "--steps=8", "--repeats=2",
             "--dtype=bfloat16", "--device=cuda"])
    rows, problems = [], []
    for impl in ("paged", "static") if dry else ("static_graph", "paged"):  # dry: no compile, no CUDA graph
        res = subprocess.run([sys.executable, "experiments/bench_decode.py", *args, f"--impl={impl}"], capture_output=True, text=True)
        print(res.stdout[-3000:], res.stderr[-2000:])
        rows += [line for line in res.stdout.splitlines() if line.strip()[:1].isdigit() and impl in line.split()]
        if res.returncode != 0:
            problems.append(f"{impl}: exit {res.returncode}: {res.stderr.strip().splitlines()[-1:]}")
    if problems and not rows:
        raise RuntimeError("; ".join(problems))
    header = "context density path dense_tok/s spkv_tok/s speedup ideal of_ideal ideal(t) of_it dense_KV_MB spkv_KV_MB compress"
    return {"columns": header.split(), "rows": [r.split() for r in rows], "problems": problems}


def tiny_checkpoint(out: str) -> str:
    """A 2-layer byte-level model with window 16 (random weights), for the dry decode part."""
    import harness  # torch, only once this part runs

    path = os.path.join(out, "tiny.pt")
    harness.byte_checkpoint(path, n_layer=2, n_head=4, n_kv_head=2, block_size=128, window=16)
    return path


def part_generate(dry: bool, out: str) -> dict:
    """generate.py with the dynamics checkpoint on each decode path: the same text on every path."""
    ckpt = os.path.join(out, "dynamics", "ckpt.pt")
    if not os.path.exists(ckpt):
        raise RuntimeError(f"{ckpt} is missing: run the dynamics part first")
    texts, speeds = {}, {}
    paths = {"reference": ["--impl=reference"], "paged": ["--impl=paged"], "paged_compiled": ["--compile=True"]}
    for impl in ("reference", "paged") if dry else ("reference", "paged", "paged_compiled"):
        res = subprocess.run([sys.executable, "generate.py", f"--ckpt={ckpt}", "--prompt=def main(argv):\n    " * 30,
                              "--max_new_tokens=8" if dry else "--max_new_tokens=256", *paths[impl], "--chat=False",
                              "--device=cpu" if dry else "--device=cuda"], capture_output=True, text=True)
        print(impl, res.stdout[-1500:], res.stderr[-1500:])
        if res.returncode != 0:
            texts[impl] = f"FAILED: {res.stderr.strip().splitlines()[-1:]}"
            continue
        lines = res.stdout.splitlines()
        texts[impl] = "\n".join(lines[1:next(i for i, line in enumerate(lines) if line.startswith("--- "))])
        speeds[impl] = next(line for line in lines if line.startswith("--- "))
    same = len({t for t in texts.values() if not t.startswith("FAILED")}) == 1
    if not speeds:
        raise RuntimeError("every path failed: " + "; ".join(texts.values()))
    return {"same_text_on_every_path": same, "speed_lines": speeds,
            "failed": {k: v for k, v in texts.items() if v.startswith("FAILED")}}


def run_part(name: str, dry: bool, out: str) -> dict:
    fns = {"tests": lambda: part_tests(dry), "train": lambda: part_train(dry), "dynamics": lambda: part_dynamics(dry, out),
           "decode": lambda: part_decode(dry, out), "generate": lambda: part_generate(dry, out)}
    return fns[name]()


# ---------------------------------------------------------------------------------------------
# The driver: one process per part, a time limit each, a report at the end.


def drive(name: str, o: dict) -> dict:
    """Run one part in a child process; return {"status", "seconds", "figures" or "tail"}."""
    log = os.path.join(o["out"], f"{name}.log")
    result = os.path.join(o["work"], f"{name}.json")
    if os.path.exists(result):
        os.remove(result)  # a stale result must never stand in for this run's
    cmd = [sys.executable, "experiments/gpu_check.py", f"--part={name}", f"--out={o['work']}", f"--dry={o['dry']}"]
    limit = min(LIMITS[name], o["limit_s"])
    t0 = time.time()
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
            status = "ok" if code == 0 and os.path.exists(result) else "FAILED"
        except subprocess.TimeoutExpired:
            status = f"TIMEOUT after {limit} s"
    row = {"status": status, "seconds": round(time.time() - t0, 1)}
    if status == "ok":
        with open(result) as f:
            row["figures"] = json.load(f)
    else:
        with open(log) as f:
            row["tail"] = f.read()[-1500:]
    print(f"{name}: {status} in {row['seconds']} s", flush=True)
    return row


def environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "triton": triton_version,
            "python": sys.version.split()[0],
            "device": torch.cuda.get_device_name() if cuda else "cpu", "dry": not cuda}


def write_report(o: dict, env: dict, rows: dict):
    with open(os.path.join(o["out"], "report.json.tmp"), "w") as f:
        json.dump({"environment": env, "parts": rows}, f, indent=1)
    os.replace(os.path.join(o["out"], "report.json.tmp"), os.path.join(o["out"], "report.json"))
    lines = [f"# gpu_check report ({env['date']}, {env['device']}, torch {env['torch']}"
             + (", dry run: tiny shapes on the CPU, nothing measured" if o["dry"] else "") + ")", ""]
    for name, row in rows.items():
        lines += [f"## {name}: {row['status']} ({row['seconds']} s)", ""]
        body = json.dumps(row.get("figures", {}), indent=1) if row["status"] == "ok" else row["tail"]
        lines += ["```", body, "```", ""]
    with open(os.path.join(o["out"], "report.md.tmp"), "w") as f:
        f.write("\n".join(lines))
    os.replace(os.path.join(o["out"], "report.md.tmp"), os.path.join(o["out"], "report.md"))


def check_flags(o: dict) -> list:
    """The parts to run, in order; refuses a bad --parts, --part or --limit_s in one line."""
    names = [p for p in o["parts"].split(",") if p]
    if not names:
        raise cli.BadInput(f"--parts={o['parts']} names no part; give a comma list of {', '.join(PARTS)}")
    bad = [p for p in names + ([o["part"]] if o["part"] else []) if p not in PARTS]
    if bad:
        raise cli.BadInput(f"unknown part {bad[0]!r}; use a comma list of {', '.join(PARTS)}")
    twice = [p for p in PARTS if names.count(p) > 1]
    if twice:
        raise cli.BadInput(f"--parts={o['parts']} names {twice[0]} twice; name each part once")
    if not o["limit_s"] > 0:
        raise cli.BadInput(f"--limit_s={o['limit_s']} must be > 0: it is each part's time limit in seconds")
    return names


def new_run_folder(out: str) -> str:
    """out/<date>-<commit>, or -2, -3 ... after it: made here, exclusively, so never an earlier run's."""
    import harness  # torch, only in the driver

    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"{time.strftime('%Y-%m-%d')}-{harness.commit_stamp()}")
    path, n = base, 2
    while True:
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            path, n = f"{base}-{n}", n + 1


def main(argv):
    o = dataclasses.asdict(Flags())
    o.update(cli.parse(argv, Flags, "gpu_check.py"))
    names = check_flags(o)
    if o["part"]:  # child: run one part, write its figures into the driver's folder
        os.makedirs(o["out"], exist_ok=True)
        figures = run_part(o["part"], o["dry"], o["out"])
        with open(os.path.join(o["out"], f"{o['part']}.json"), "w") as f:
            json.dump(figures, f, indent=1)
        return
    import torch

    if not o["dry"] and not torch.cuda.is_available():
        raise cli.BadInput("no CUDA GPU is visible; run on a GPU machine, or --dry=True for the CPU plumbing check")
    env = environment()
    o["out"] = new_run_folder(o["out"])
    o["work"] = os.path.join(o["scratch"], os.path.basename(o["out"])) if o["scratch"] else os.path.join(o["out"], "work")
    limits = {n: min(LIMITS[n], o["limit_s"]) for n in names}
    print(f"gpu_check: {env['device']}, torch {env['torch']}, triton {env['triton']}; parts and limits {limits} "
          f"({sum(limits.values())} s at most); report in {o['out']}")
    rows = {name: drive(name, o) for name in names}
    write_report(o, env, rows)
    report = os.path.join(o["out"], "report.md")
    print(f"report: {report}")
    if not any(row["status"] == "ok" for row in rows.values()):
        raise SystemExit(f"gpu_check.py: every part failed or timed out ({', '.join(names)}); see {report}")


if __name__ == "__main__":
    cli.run(main, "gpu_check.py")
