"""The run folder of one training run: train.py's bookkeeping, in one object, so its loop reads alone.

    with RunDir(out_dir, master) as run:      # locks out_dir (a lock file holding the pid)
        saved = run.open(resume)              # fresh or resume: refuses to replace a run's results
        step = run.restore(model, opt, gen, max_steps)   # a resume: model, optimizer, data position; the log cut back
        run.begin(model, start_eval)          # the save guard's baseline
        ... run.log(rec); run.save(...); run.stop_requested; run.interrupted(step)
        run.finish(record)                    # final.json, atomically

What it guarantees:
  - one writer: a second process into the same out_dir gets one line and exit 2. The lock is
    lockfile.py's on out_dir/lock, which the kernel releases when its holder dies (kill -9
    included); the pid a dead holder left in the file is reported as a stale lock taken over.
  - nothing is lost: a fresh run never replaces a run that saved a checkpoint; a folder whose run
    never saved one (killed, or stopped before its first save) holds no result, and starting again
    says what it discards.
  - a diverged state never replaces the last good checkpoint (SaveGuard), and every write is atomic.
  - Ctrl-C: the first asks the loop to stop at the end of the current step and save; a second
    interrupts at once.
Only rank 0 (master) writes; other DDP ranks get the same object, which reads but never writes.
"""

import json
import math
import os
import signal
import sys
import time

import torch

import cli
import lockfile
from checkpoint import check_shapes, read_checkpoint, save_checkpoint

DIVERGED_NATS = 1.0  # a val loss this far above the run's best is a diverged model
WEIGHT_GROWTH = 1000.0  # weights this many times larger than at the start are a diverged model


def strict_json(obj):
    """obj with every non-finite float as None (null): strict JSON parsers reject a bare NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def log_line(path: str, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")


def log_records(path: str) -> list:
    """The lines of log.jsonl, each a record dict or None for a line torn by a kill. A line that is
    valid JSON but no train.py record is refused: the file is not this program's to cut."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            records.append(None)
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("step"), int)):
            raise cli.BadInput(f"{path} line {n} is not a train.py record ({line[:40]!r}); remove that line, "
                               "or give another --out_dir")
        records.append(rec)
    return records


def steps_done(records: list) -> tuple:
    """(records with "step" as steps done, whether they were renumbered). Every record says step N
    for the state after N optimizer steps, so the first is step 1; a log whose first record is
    step 0 was written by an older train.py, which logged the step's index: each is renumbered."""
    first = next((rec for rec in records if rec is not None), None)
    if first is None or first["step"] != 0:
        return records, False
    return [None if rec is None else {**rec, "step": rec["step"] + 1} for rec in records], True


def progress(step: int, total: int, t0: float, start: int, text: str):
    """One progress line after `step` of `total` steps (in place on a terminal), with an ETA."""
    eta = (time.time() - t0) / max(step - start, 1) * (total - step)
    line = f"[{'#' * int(20 * step / total):<20}] {step}/{total} {text} eta {eta / 60:5.1f}m"
    print("\r" + line, end="", flush=True) if sys.stdout.isatty() else print(line, flush=True)


def any_rank(flag: bool, world: int, device) -> bool:
    """True if any process has the flag set."""
    if world == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def max_abs_weight(model) -> float:
    return max(p.detach().abs().max().item() for p in model.parameters())


class RunDir:
    """Owns one out_dir: the lock, fresh-or-resume, the log, Ctrl-C, the guarded save, final.json."""

    def __init__(self, out_dir: str, master: bool):
        self.dir, self.master = out_dir, master
        self.ckpt, self.log_path, self.final = (os.path.join(out_dir, f) for f in ("ckpt.pt", "log.jsonl", "final.json"))
        self.lock_fd, self.made_dir = None, False
        self.saved_step, self.best, self.start_weight = None, math.inf, None  # the save guard's state
        self.stop_requested = False

    def __enter__(self):
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise cli.BadInput(f"--out_dir={self.dir} is a file; give a folder")
        if self.master:
            self.lock()
        self.old_handler = signal.signal(signal.SIGINT, self.request_stop)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.old_handler)
        if self.lock_fd is not None:
            lockfile.release(self.lock_fd, os.path.join(self.dir, "lock"))
            if self.made_dir and not os.listdir(self.dir):  # a refused first run leaves no empty folder
                os.rmdir(self.dir)

    # -- the lock ------------------------------------------------------------------------------

    def lock(self):
        """Lock out_dir/lock (lockfile.py) with our pid in it; refuse if a live process holds it."""
        self.made_dir = not os.path.isdir(self.dir)
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, "lock")
        try:
            self.lock_fd, stale = lockfile.acquire(path)
        except lockfile.Busy as busy:
            raise cli.BadInput(f"--out_dir={self.dir} is in use by process {busy.holder} (its lock {path}); wait for "
                               "it to end, or give another --out_dir") from None
        if stale:  # the kernel released the lock, so its holder is gone: killed before it could unlink
            print(f"{self.dir}: took over the lock of process {stale}, which is no longer running")

    # -- fresh or resume -----------------------------------------------------------------------

    def open(self, resume: bool):
        """A resume: the saved run's train_config (dict). A fresh run: None, once the folder is known
        to hold nothing worth keeping; the log of a run that never saved a checkpoint is discarded."""
        if resume:
            return self.saved_config()
        if os.path.exists(self.final):
            with open(self.final) as f:
                step = json.load(f).get("step", "?")
            raise cli.BadInput(f"--out_dir={self.dir} already holds a finished run (step {step}, final.json); give "
                               f"a new --out_dir, or train it further with --resume=True --max_steps=N (N > {step})")
        if os.path.exists(self.ckpt):
            raise cli.BadInput(f"--out_dir={self.dir} already holds a run (ckpt.pt); continue it with --resume=True, "
                               "or give a new --out_dir")
        if self.master and os.path.exists(self.log_path):
            n = len(log_records(self.log_path))
            print(f"{self.dir} holds a run that never saved a checkpoint (log.jsonl, {n} records); discarding it")
            os.remove(self.log_path)
        return None

    def saved_config(self) -> dict:
        """The recipe of the run a --resume=True continues."""
        if not os.path.isfile(self.ckpt):
            never = " (its run never saved one: start it again without --resume)" if os.path.exists(self.log_path) else ""
            raise cli.BadInput(f"--resume=True but {self.ckpt} does not exist{never}; drop --resume to start a new run")
        ckpt = read_checkpoint(self.ckpt)
        if "train_config" not in ckpt:
            raise cli.BadInput(f"{self.ckpt} is a converted checkpoint, not a training run, so there is nothing to "
                               f"resume; adapt it with --ckpt={self.ckpt} and a new --out_dir")
        return ckpt["train_config"]

    def restore(self, model, opt, gen, max_steps: int) -> int:
        """Load the saved run into model, opt and gen, cut the log back to it; returns its step.
        A run past max_steps, or finished at it, is refused: going on would only rewrite its final
        record. (At max_steps without final.json it was stopped before writing one: that is written.)"""
        ckpt = read_checkpoint(self.ckpt)
        if ckpt["step"] > max_steps or (ckpt["step"] == max_steps and os.path.exists(self.final)):
            raise cli.BadInput(f"{self.ckpt} is at step {ckpt['step']}: nothing to do at --max_steps={max_steps}; "
                               "raise --max_steps to train further")
        check_shapes(model, ckpt["model"], self.ckpt)
        missing = model.state_dict().keys() - ckpt["model"].keys()
        unexpected = ckpt["model"].keys() - model.state_dict().keys()
        if missing or unexpected:
            raise cli.BadInput(f"{self.ckpt} does not fit this model (missing {sorted(missing)[:3]}, unexpected "
                               f"{sorted(unexpected)[:3]}); resume with the flags it was trained with")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["data_rng"])
        self.saved_step = ckpt["step"]
        if self.master:
            dropped = self.truncate_log(self.saved_step)
            print(f"resumed from step {self.saved_step} of {self.ckpt}"
                  + (f"; dropped {dropped} log records past it" if dropped else ""))
        return ckpt["step"]

    def truncate_log(self, step: int) -> int:
        """Drop the records past step (steps done), which a resume writes again, and a line torn by a
        kill. An older train.py's log, counted from 0, is renumbered first (steps_done)."""
        records, renumbered = steps_done(log_records(self.log_path))
        with open(self.log_path) as f:
            lines = f.read().splitlines()
        if renumbered:
            lines = [line if rec is None else json.dumps(rec, allow_nan=False) for line, rec in zip(lines, records)]
            print(f"{self.log_path} counted steps from 0 (an older train.py); renumbered to count steps done")
        keep = [line for line, rec in zip(lines, records) if rec is not None and rec["step"] <= step]
        if renumbered or len(keep) < len(lines):
            with open(self.log_path + ".tmp", "w") as f:
                f.write("".join(line + "\n" for line in keep))
            os.replace(self.log_path + ".tmp", self.log_path)
        return len(lines) - len(keep)

    # -- during the run ------------------------------------------------------------------------

    def begin(self, model, start_eval: dict):
        """The save guard's baseline: the weights' size and the val loss at the start."""
        self.start_weight = max_abs_weight(model)
        self.seen(start_eval)
        print(f"start: val soft {start_eval['val_soft']:.4f} hard {start_eval['val_hard']:.4f}")

    def seen(self, ev: dict):
        if math.isfinite(ev.get("val_soft", math.nan)):
            self.best = min(self.best, ev["val_soft"])

    def log(self, rec: dict):
        if self.master:
            self.seen(rec)
            log_line(self.log_path, rec)

    def request_stop(self, signum, frame):
        self.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nCtrl-C: finishing this step, then saving (press again to abort without saving)", flush=True)

    def stopping(self, world: int, device) -> bool:
        """Whether Ctrl-C reached any rank, so that every rank stops (and saves) after the same step."""
        return any_rank(self.stop_requested, world, device)

    def holds(self) -> str:
        if self.saved_step is None:
            return f"no checkpoint exists yet at {self.ckpt}"
        return f"{self.ckpt} still holds step {self.saved_step}"

    def check_finite(self, loss: float, norm: float, step: int):
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise cli.BadInput(f"loss {loss} / grad norm {norm} at step {step}; stopped before the update, "
                               f"{self.holds() if self.master else 'see rank 0'}. Lower --lr or check the data.")

    def problem(self, model, ev: dict) -> str:
        """Why this state must not be saved ("" when it may): non-finite or exploded weights, a
        non-finite val loss, or one over DIVERGED_NATS above the best of this run."""
        w, v = max_abs_weight(model), ev["val_soft"]
        if not math.isfinite(w):
            return "non-finite weights"
        if w > WEIGHT_GROWTH * max(self.start_weight, 1.0):
            return f"weights grew to {w:.3g} (largest {self.start_weight:.3g} at the start)"
        if not (math.isfinite(v) and math.isfinite(ev["val_hard"])):
            return f"val loss {v} (soft) / {ev['val_hard']} (hard)"
        if v > self.best + DIVERGED_NATS:
            return f"val loss {v:.4f} is over {DIVERGED_NATS} above the best {self.best:.4f}: diverged"
        return ""

    def save(self, step: int, model, ev: dict, tokenizer_spec, source: str, **state):
        """Atomically replace ckpt.pt with this state, unless the guard finds it diverged (then stop)."""
        if not self.master:
            return
        problem = self.problem(model, ev)
        if problem:
            raise cli.BadInput(f"step {step}: {problem}; not saved, {self.holds()}. Lower --lr or check the data")
        save_checkpoint(self.ckpt, model, tokenizer_spec, source, step=step, **state)
        self.saved_step = step

    def interrupted(self, step: int):
        if self.master:
            print(f"\ninterrupted: saved step {step} to {self.ckpt}; continue with --resume=True --out_dir={self.dir}")
        sys.exit(130)

    def finish(self, record: dict):
        """final.json, atomically: a kill mid-write leaves no torn file."""
        with open(self.final + ".tmp", "w") as f:
            json.dump(strict_json(record), f, indent=1, allow_nan=False)
        os.replace(self.final + ".tmp", self.final)
