"""Adapt a converted pretrained model to SP-KV with next-token loss only (or train from scratch).

    python train.py                        # embedded SmolLM2-135M, stdlib source, CPU or one GPU
    python train.py --dense=True           # the same recipe with plain attention: the baseline
    python train.py --preset=gpu --seq_len=4096
    torchrun --nproc_per_node=2 train.py   # DDP, as in nanoGPT

Recipe (METHOD.md sections 4-5): start from pretrained weights with predictors open; train the
model and predictors jointly (predictor LR x5, weight decay 0.1); warmup + cosine decay; for the
last 25% of the decay freeze the predictor and anneal every gate to its hard value, so the final
checkpoint is trained under exactly the attention it will decode with.
Flags are `--key=value` for any TrainConfig field; unknown keys and wrong types are refused.
"""

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch

import cli
import data as datalib
import kernels
import spkv
from checkpoint import check_shapes, load_model, read_checkpoint, save_checkpoint
from weights import default_checkpoint
from model import GPT, GPTConfig, peak_flops
from tokenizer import Tokenizer


@dataclass
class TrainConfig:
    preset: str = "auto"  # "cpu" | "gpu" | "auto" (gpu when CUDA is present); explicit flags win
    init: str = "pretrained"  # "pretrained": a converted checkpoint; "scratch": random weights
    ckpt: str = ""  # converted checkpoint to adapt; "" = the embedded SmolLM2-135M
    out_dir: str = ""  # where ckpt.pt, log.jsonl, final.json go; "" = out/spkv, or out/dense with --dense=True
    resume: bool = False  # continue from out_dir/ckpt.pt
    dense: bool = False  # plain attention everywhere: the baseline
    data: str = ""  # "" = Python stdlib source; a text file, a folder, or prepared memmaps
    data_cache: str = ""  # where tokenized memmaps are cached; "" = data_cache/ beside train.py
    seq_len: int = 512  # tokens per training sequence
    batch_size: int = 2  # sequences per micro-step per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 60  # optimizer steps in all
    lr: float = 1e-4  # base learning rate (peak); the predictor gets lr * predictor_lr_mult
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup_steps: int = 5  # linear learning-rate warmup
    weight_decay: float = 0.0  # on the model's matrices (0: we adapt, not pretrain)
    predictor_lr_mult: float = 5.0  # the predictors learn at lr x this
    predictor_weight_decay: float = 0.1  # AdamW weight decay of the predictors
    grad_clip: float = 1.0  # clip the global gradient norm to this
    freeze_frac: float = 0.25  # last fraction of the decay: predictor frozen, gates annealed
    anneal_steps: int = 500  # soft -> hard over this many steps (capped at half the frozen phase)
    window: int = 128  # the most recent keys every query sees; older ones are gated (must be < seq_len)
    tau: float = 0.5  # hard-gate threshold: an old key is kept when its gate u >= tau
    target_density: float = 0.0  # in (0, 1]: at the freeze, tau is reset to keep this fraction of old pairs; 0 = --tau throughout
    predictor_init_bias: float = 5.0  # output bias of fresh predictors: 5 = open (METHOD.md), < 0 leans closed
    eval_every: int = 20  # steps between evaluations on the val split
    eval_batches: int = 4  # batches per evaluation
    log_every: int = 1  # steps between progress lines
    ckpt_every: int = 20  # steps between checkpoints (each one evaluated first)
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    compile: bool = True  # torch.compile the model on CUDA (ignored on CPU)
    peak_tflops: float = 0.0  # the GPU's dense bf16 peak for MFU; 0 = look the device up in model.PEAK_TFLOPS
    attn: str = "auto"  # attention path, see kernels.ATTN_IMPLS
    seed: int = 1337  # model init and data order
    n_layer: int = 4  # --init=scratch model shape; the tokenizer comes from --ckpt
    n_embd: int = 256  # --init=scratch width
    n_head: int = 4  # --init=scratch query heads
    n_kv_head: int = 2  # --init=scratch key/value heads


PRESETS = {  # plain dicts of overrides, applied before explicit flags
    "cpu": dict(seq_len=512, batch_size=2, grad_accum=1, max_steps=60, warmup_steps=5, eval_every=20,
                eval_batches=4, ckpt_every=20),
    "gpu": dict(seq_len=4096, batch_size=8, grad_accum=4, max_steps=2000, warmup_steps=100, eval_every=200,
                eval_batches=20, ckpt_every=200),
}


def parse_flags(argv: list) -> tuple:
    """--key=value flags -> (TrainConfig, set of keys given explicitly)."""
    given = cli.parse(argv, TrainConfig, "train.py")
    preset = given.get("preset", "auto")
    if preset == "auto":
        preset = "gpu" if torch.cuda.is_available() and given.get("device") != "cpu" else "cpu"
    if preset not in PRESETS:
        raise cli.BadInput(f"unknown preset {preset!r}; use one of {sorted(PRESETS)} or auto")
    out_dir = given.get("out_dir") or ("out/dense" if given.get("dense") else "out/spkv")
    cfg = TrainConfig(**{**PRESETS[preset], **given, "preset": preset, "out_dir": out_dir})
    if not cfg.resume:  # a resume is checked once the saved recipe is known
        validate(cfg)
    return cfg, set(given)


def validate(cfg: TrainConfig):
    """Refuse values that cannot train, naming the flag and the fix."""
    problems = [f"--{k}={getattr(cfg, k)} must be >= 1" for k in
                ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "log_every",
                 "ckpt_every", "anneal_steps") if getattr(cfg, k) < 1]
    problems += [f"--{k}={getattr(cfg, k)} must be a finite number > 0" for k in ("lr", "predictor_lr_mult",
                 "grad_clip") if not (math.isfinite(getattr(cfg, k)) and getattr(cfg, k) > 0)]
    if not (math.isfinite(cfg.peak_tflops) and cfg.peak_tflops >= 0):
        problems.append(f"--peak_tflops={cfg.peak_tflops} must be a finite number >= 0 (0 = look the GPU up)")
    if not math.isfinite(cfg.predictor_init_bias):
        problems.append(f"--predictor_init_bias={cfg.predictor_init_bias} must be a finite number")
    problems += [f"--{k}={getattr(cfg, k)} must be in [0, 1]" for k in ("min_lr_frac", "freeze_frac", "tau", "target_density")
                 if not 0 <= getattr(cfg, k) <= 1]
    if cfg.dense and cfg.target_density:
        problems.append(f"--target_density={cfg.target_density} sets SP-KV's tau; a --dense=True run has no gates, drop it")
    if cfg.warmup_steps >= cfg.max_steps:
        problems.append(f"--warmup_steps={cfg.warmup_steps} must be below --max_steps={cfg.max_steps}")
    if not 1 <= cfg.window < cfg.seq_len:
        problems.append(f"--window={cfg.window} must be in [1, --seq_len={cfg.seq_len}): older keys are what SP-KV prunes")
    problems += [f"--{k}={getattr(cfg, k)!r} is not one of {choices}" for k, choices in
                 (("device", ("auto", "cpu", "cuda")), ("init", ("pretrained", "scratch")),
                  ("attn", ("auto", *kernels.ATTN_IMPLS))) if getattr(cfg, k) not in choices]
    if problems:
        raise cli.BadInput("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Setup: processes, device, model, optimizer.


@dataclass
class Proc:
    """This process's place in the run, decided once in main()."""
    rank: int  # 0 .. world - 1; rank 0 evaluates, logs and saves
    world: int  # processes in the run (DDP under torchrun), 1 otherwise
    device: torch.device
    autocast: object  # bf16 autocast on CUDA, a disabled autocast on CPU (fp32)


def setup_processes(cfg: TrainConfig):
    """(rank, world size, device, reason). Under torchrun, one process per device joins DDP."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise cli.BadInput("--device=cuda but no CUDA device is visible; use --device=cpu")
    reason = "CUDA is available" if want == "cuda" else "no CUDA device (or --device=cpu)"
    device = torch.device(want)
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if want == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if want == "cuda" else "gloo")
        reason += f"; DDP rank {rank}/{world}"
    return rank, world, device, reason


def build_model(cfg: TrainConfig, device):
    """(model, tokenizer, where the weights came from). Pretrained: predictors start open."""
    path = cfg.ckpt or default_checkpoint()
    spkv_knobs = dict(window=cfg.window, tau=cfg.tau, predictor_init_bias=cfg.predictor_init_bias)
    if cfg.init == "scratch":  # only the tokenizer and vocabulary size come from the checkpoint
        ckpt = read_checkpoint(path)
        if not ckpt.get("tokenizer"):
            raise cli.BadInput(f"checkpoint {path} has no tokenizer; convert it with its tokenizer.json")
        mc = GPTConfig(vocab_size=ckpt["config"]["vocab_size"], n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                       n_kv_head=cfg.n_kv_head, n_hidden=4 * cfg.n_embd, block_size=max(cfg.seq_len, 1024),
                       **spkv_knobs, dense_layers=tuple(range(cfg.n_layer)) if cfg.dense else ())
        return GPT(mc).to(device), Tokenizer(ckpt["tokenizer"]), "scratch"
    model, tok, ckpt = load_model(path, dense=cfg.dense, dense_layers=(), **spkv_knobs)  # every layer adapted
    if tok is None:
        raise cli.BadInput(f"checkpoint {path} has no tokenizer; convert it with its tokenizer.json")
    stored = ckpt["config"].get("predictor_init_bias")
    holds_predictors = any(".predictor." in k for k in ckpt["model"])  # a converted or an SP-KV checkpoint
    if not cfg.dense and holds_predictors and stored != cfg.predictor_init_bias:  # made for another init
        for layer in model.cfg.spkv_layers():
            predictor = model.blocks[layer].attn.predictor
            predictor.init_bias = cfg.predictor_init_bias
            predictor.reset_open()
        print(f"predictors: fresh at init bias {cfg.predictor_init_bias:g} (--predictor_init_bias; the checkpoint's "
              f"were made at {stored})")
    return model.to(device), tok, path


def make_optimizer(model: GPT, cfg: TrainConfig, fused: bool):
    """AdamW with three groups: model matrices (weight_decay), model vectors (no decay), and the
    predictors (lr x predictor_lr_mult, predictor_weight_decay). Each group keeps its lr multiplier."""
    pred = {id(p) for p in model.predictor_parameters()}
    params = [p for p in model.parameters() if id(p) not in pred]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay, lr_mult=1.0),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0, lr_mult=1.0),
              dict(params=model.predictor_parameters(), weight_decay=cfg.predictor_weight_decay,
                   lr_mult=cfg.predictor_lr_mult)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


# ---------------------------------------------------------------------------------------------
# Schedules: learning rate, and the gate view (soft, then frozen + annealed, then hard).


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def gate_schedule(cfg: TrainConfig) -> tuple:
    """(step the predictor freezes at, number of steps the anneal takes)."""
    freeze = cfg.warmup_steps + round((1 - cfg.freeze_frac) * (cfg.max_steps - cfg.warmup_steps))
    return freeze, max(1, min(cfg.anneal_steps, (cfg.max_steps - freeze) // 2))


def gate_view_at(step: int, cfg: TrainConfig) -> tuple:
    """("soft", 0) while the predictor learns; ("anneal", a) with a: 0 -> 1 once it is frozen.
    Freezing is done by the forward pass: under "anneal" train_step passes frozen=True, model.py
    detaches the gate logits, so predictor parameters get no gradient and AdamW skips them (their
    weight decay included)."""
    freeze, length = gate_schedule(cfg)
    if cfg.dense or step < freeze:
        return "soft", 0.0
    return "anneal", min(1.0, (step - freeze + 1) / length)


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: GPT, val: datalib.Batches, cfg: TrainConfig, proc: Proc) -> dict:
    """Val loss under soft and hard gates on fixed batches, and hard-gate density."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same batches at every eval
    soft = hard = 0.0
    keeps = {layer: [] for layer in model.cfg.spkv_layers()}
    us = {layer: [] for layer in keeps}  # gate values u (B, Hkv, T) per SP-KV layer
    for _ in range(cfg.eval_batches):
        x, y = (t.to(proc.device) for t in val.sample(cfg.batch_size, gen))
        gates = []
        with proc.autocast:
            soft += model(x, y, a=0.0)[1].item() / cfg.eval_batches
            hard += model(x, y, a=1.0, gates=gates)[1].item() / cfg.eval_batches
        for layer, logit in zip(keeps, gates):
            keeps[layer].append(spkv.hard_keep(logit, model.cfg.tau).cpu())
            us[layer].append(torch.sigmoid(logit.float()).cpu())
    model.train()
    out = {"val_soft": soft, "val_hard": hard}
    if keeps:
        out["tau"] = model.cfg.tau  # the threshold of val_hard and density (--target_density moves it)
        out["gates"] = gate_stats(model, {k: torch.cat(v) for k, v in us.items()})
        stats = spkv.density_stats({k: torch.cat(v) for k, v in keeps.items()}, model.cfg.window)
        out.update(density=stats["overall"], density_per_layer=stats["per_layer"],
                   density_per_head=stats["per_head"])
    return out


def gate_stats(model: GPT, us: dict) -> dict:
    """Per SP-KV layer, what the gates do: the mean u over every position, the fraction of
    positions below tau (dropped once old), and the mean output bias b2 of the predictor (where
    the gates started: b2 = predictor_init_bias). us: {layer: (B, Hkv, T) gate values}."""
    return {layer: {"mean_u": u.mean().item(), "below_tau": (u < model.cfg.tau).float().mean().item(),
                    "bias": model.blocks[layer].attn.predictor.proj.bias.mean().item()}
            for layer, u in us.items()}


def report_density(stats: dict):
    """Print per layer x KV head density as a table."""
    if "density_per_head" not in stats:
        return
    print(f"density per layer x KV head (overall {stats['density']:.3f}):")
    for layer, heads in stats["density_per_head"].items():
        print(f"  layer {layer:2d}: " + " ".join(f"{d:.3f}" for d in heads) + f"   | {stats['density_per_layer'][layer]:.3f}")


# ---------------------------------------------------------------------------------------------
# Checkpoints and logs


RUN_FILES = ("ckpt.pt", "log.jsonl", "final.json")  # what a run leaves in its out_dir
DIVERGED_NATS = 1.0  # a val loss this far above the run's best is a diverged model
WEIGHT_GROWTH = 1000.0  # weights this many times larger than at the start are a diverged model


def check_fresh_out_dir(out_dir: str):
    """A new run never replaces an earlier one's files."""
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]
    if found:
        raise cli.BadInput(f"--out_dir={out_dir} already holds a run ({', '.join(found)}); continue it with "
                           f"--resume=True, or give a fresh --out_dir")


def saved_config(ckpt_path: str) -> dict:
    """The recipe of the run a --resume=True continues."""
    if not os.path.isfile(ckpt_path):
        raise cli.BadInput(f"--resume=True but {ckpt_path} does not exist; drop --resume to start a new run")
    ckpt = read_checkpoint(ckpt_path)
    if "train_config" not in ckpt:
        raise cli.BadInput(f"{ckpt_path} is a converted checkpoint, not a training run, so there is nothing to "
                           f"resume; adapt it with --ckpt={ckpt_path} and a fresh --out_dir")
    return ckpt["train_config"]


def max_abs_weight(model: GPT) -> float:
    return max(p.detach().abs().max().item() for p in model.parameters())


class SaveGuard:
    """Decides whether a state may replace ckpt.pt, and says what ckpt.pt holds. A state is saved
    only when its weights are finite and under WEIGHT_GROWTH x their size at the start of the run,
    and its val loss is finite and within DIVERGED_NATS of the best one seen in this run."""

    def __init__(self, path: str, model: GPT, start_eval: dict, saved_step):
        self.path, self.step = path, saved_step  # saved_step: the step path holds, None if none yet
        self.start_weight = max_abs_weight(model)
        self.best = math.inf
        self.seen(start_eval)

    def seen(self, ev: dict):
        if math.isfinite(ev["val_soft"]):
            self.best = min(self.best, ev["val_soft"])

    def problem(self, model: GPT, ev: dict) -> str:
        """Why this state must not be saved ("" when it may)."""
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

    def check(self, model: GPT, ev: dict, step: int):
        """Stop the run before a diverged state is written."""
        problem = self.problem(model, ev)
        if problem:
            raise cli.BadInput(f"step {step}: {problem}; not saved, {self.holds()}. Lower --lr or check the data")

    def saved(self, step: int):
        self.step = step

    def holds(self) -> str:
        if self.step is None:
            return f"no checkpoint exists yet at {self.path}"
        return f"{self.path} still holds step {self.step}"


def save_state(path, model, tok, source, opt, step, gen, cfg):
    """Model + tokenizer in the shared format, plus what a resume needs: optimizer, step, data RNG.
    Callers ask SaveGuard first: a diverged state never replaces the last good one."""
    save_checkpoint(path, model, tok.spec, source, optimizer=opt.state_dict(), step=step,
                    data_rng=gen.get_state(), train_config=dataclasses.asdict(cfg))


def restore_state(path, model, opt, gen) -> tuple:
    """Load a saved run into model, opt and gen; (its step, the tau its model held)."""
    ckpt = read_checkpoint(path)
    check_shapes(model, ckpt["model"], path)
    missing, unexpected = model.state_dict().keys() - ckpt["model"].keys(), ckpt["model"].keys() - model.state_dict().keys()
    if missing or unexpected:
        raise cli.BadInput(f"{path} does not fit this model (missing {sorted(missing)[:3]}, unexpected "
                           f"{sorted(unexpected)[:3]}); resume with the flags it was trained with")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    gen.set_state(ckpt["data_rng"])
    return ckpt["step"], ckpt["config"]["tau"]


class StopFlag:
    """First Ctrl-C (SIGINT) asks the loop to stop at the end of the current step, so the state it
    saves is never half-updated; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self.request)

    def request(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nCtrl-C: finishing this step, then saving (press again to abort without saving)", flush=True)


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


def truncate_log(path: str, step: int) -> int:
    """Drop the records of steps >= step, which a resume from `step` writes again (and a line torn
    by a kill); returns how many were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    keep = [line for line in lines if is_record_before(line, step)]
    if len(keep) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.write("".join(line + "\n" for line in keep))
        os.replace(path + ".tmp", path)
    return len(lines) - len(keep)


def is_record_before(line: str, step: int) -> bool:
    try:
        return json.loads(line)["step"] < step
    except json.JSONDecodeError:  # the last line of a run killed mid-write
        return False


def progress(step, total, t0, start, text):
    done = step + 1 - start
    eta = (time.time() - t0) / max(done, 1) * (total - step - 1)
    bar = "#" * int(20 * (step + 1) / total)
    line = f"[{bar:<20}] {step + 1}/{total} {text} eta {eta / 60:5.1f}m"
    print("\r" + line, end="", flush=True) if sys.stdout.isatty() else print(line, flush=True)


# ---------------------------------------------------------------------------------------------
# The loop


def main(argv):
    cfg, given = parse_flags(argv)
    rank, world, device, why_device = setup_processes(cfg)
    master = rank == 0
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume:  # the saved recipe, with the flags given now on top (e.g. a longer max_steps)
        saved = saved_config(ckpt_path)
        cfg = TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in given}, "resume": True})
        validate(cfg)
    else:
        check_fresh_out_dir(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    model, tok, source = build_model(cfg, device)
    if cfg.seq_len > model.cfg.block_size:
        raise cli.BadInput(f"--seq_len={cfg.seq_len} is beyond the model's context of {model.cfg.block_size}")
    cuda = device.type == "cuda"
    impl, why_attn = kernels.choose_attention(device, cfg.attn)
    model.attn_impl = impl
    if impl == "sdpa" and not cfg.dense:
        kernels.check_bias_size(cfg.batch_size, model.cfg.n_kv_head, cfg.seq_len, dtype_bytes=2 if cuda else 4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    proc = Proc(rank, world, device, autocast)
    peak, why_peak = peak_flops(device, cfg.peak_tflops)
    folder = datalib.prepare(cfg.data, tok, cfg.data_cache or datalib.DEFAULT_CACHE)
    train, val = datalib.Batches(folder, "train", cfg.seq_len), datalib.Batches(folder, "val", cfg.seq_len)
    opt = make_optimizer(model, cfg, fused=cuda)
    gen = torch.Generator().manual_seed(cfg.seed)  # the data position: saved and restored
    step, saved_tau = restore_state(ckpt_path, model, opt, gen) if cfg.resume else (0, cfg.tau)
    freeze, anneal_len = gate_schedule(cfg)
    if cfg.target_density and step > freeze:  # resumed after the cut: keep the tau it set (validate: not dense)
        model.cfg.tau = saved_tau
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if master and cfg.resume:
        dropped = truncate_log(log_path, step)
        print(f"resumed from step {step} of {ckpt_path}" + (f"; dropped {dropped} log records past it" if dropped else ""))
    fwd = model
    if cuda and cfg.compile:
        model.compile_blocks()
    if world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(  # frozen predictors get no gradient: "unused"
            fwd, device_ids=[device.index] if cuda else None, find_unused_parameters=not cfg.dense)
    if master:
        print(f"device: {device} ({why_device}); dtype: {'bf16 autocast' if cuda else 'fp32'}; "
              f"compile: {cuda and cfg.compile}")
        print(f"attention: {impl} ({why_attn}); MFU: {why_peak}")
        print(f"model: {source}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
              f"{'dense baseline' if cfg.dense else f'SP-KV window={cfg.window} tau={cfg.tau}'}")
        if not cfg.dense:
            print(f"schedule: soft gates to step {freeze}, then predictor frozen and gates annealed to hard "
                  f"over {anneal_len} steps (hard from step {freeze + anneal_len})"
                  + (f"; at step {freeze} tau is reset to keep {cfg.target_density:g} of old pairs (--target_density)"
                     if cfg.target_density else ""))
        os.makedirs(cfg.out_dir, exist_ok=True)
        start_eval = evaluate(model, val, cfg, proc)
        print(f"start: val soft {start_eval['val_soft']:.4f} hard {start_eval['val_hard']:.4f}")
        guard = SaveGuard(ckpt_path, model, start_eval, step if cfg.resume else None)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * cfg.seq_len
    t0, start, stop = time.time(), step, StopFlag()
    while step < cfg.max_steps:
        view, a = gate_view_at(step, cfg)
        if cfg.target_density and step == freeze:
            tau_for_target(model, train, cfg, proc)
            if master:
                print(f"\nstep {step}: predictor frozen; tau {model.cfg.tau:.4f} keeps {cfg.target_density:g} of "
                      f"old pairs on training text (--target_density)")
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        t_step = time.time()
        loss, norm = train_step(fwd, model, train.sample(cfg.grad_accum * world * cfg.batch_size, gen), cfg, proc,
                                view=view, a=a)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise cli.BadInput(f"loss {loss} / grad norm {norm} at step {step}; stopped before the update, "
                               f"{guard.holds() if master else 'see rank 0'}. Lower --lr or check the data.")
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "view": view, "anneal": a,
               "tokens_per_s": tokens_per_step / (time.time() - t_step)}
        if peak:
            rec["mfu"] = model.flops_per_token(cfg.seq_len) * rec["tokens_per_s"] / world / peak
        step += 1
        stopping = any_rank(stop.requested, world, device)
        saving = step % cfg.ckpt_every == 0 or step == cfg.max_steps or stopping
        if master and (step % cfg.eval_every == 0 or step == cfg.max_steps or saving):  # a save is judged by its eval
            rec.update(evaluate(model, val, cfg, proc))
            print(f"\nstep {step}: train {loss:.4f} val soft {rec['val_soft']:.4f} hard {rec['val_hard']:.4f}"
                  + (f" density {rec['density']:.3f}" if "density" in rec else ""))
            guard.seen(rec)
        if master:
            log_line(log_path, rec)
            if step % cfg.log_every == 0:
                progress(step - 1, cfg.max_steps, t0, start, f"loss {loss:.4f} {view}"
                         + ("" if view == "soft" else f" a={a:.2f}") + f" {rec['tokens_per_s']:.0f} tok/s")
            if saving:
                guard.check(model, rec, step)
                save_state(ckpt_path, model, tok, source, opt, step, gen, cfg)
                guard.saved(step)
        if stopping:
            if master:
                print(f"\ninterrupted: saved step {step} to {ckpt_path}; "
                      f"continue with --resume=True --out_dir={cfg.out_dir}")
            sys.exit(130)
    if master:
        final = evaluate(model, val, cfg, proc)
        print(f"\ndone: val loss soft {final['val_soft']:.4f}, hard {final['val_hard']:.4f} -> {ckpt_path}")
        report_density(final)
        if not cuda and not cfg.dense and final.get("density", 0.0) > 0.95:
            print(f"note: this short CPU run kept (almost) every old pair (predictor LR x{cfg.predictor_lr_mult:g}, "
                  f"{cfg.max_steps} steps): so few steps do not close gates that start open, and on SmolLM2 the loss "
                  "holds them open even at x100 (measured: `python experiments/realtext.py --smollm2=True`). "
                  "The CPU run that prunes is `python experiments/realtext.py` (a small model on stdlib source: "
                  "density 0.66 from scratch and 0.50 adapted from dense, within 0.7% of the dense loss; "
                  "experiments/README.md says what that does and does not show). "
                  "On one GPU the gpu preset trains for thousands of steps.")
        final_path = os.path.join(cfg.out_dir, "final.json")
        with open(final_path + ".tmp", "w") as f:
            json.dump(strict_json({"step": step, **final, "train_config": dataclasses.asdict(cfg)}), f, indent=1,
                      allow_nan=False)
        os.replace(final_path + ".tmp", final_path)  # atomic: a kill mid-write leaves no torn final.json
    if world > 1:
        torch.distributed.destroy_process_group()


def tau_for_target(model: GPT, train: datalib.Batches, cfg: TrainConfig, proc: Proc):
    """--target_density, at the freeze: set model.cfg.tau to the threshold that keeps that fraction
    of old pairs on training batches. spkv.calibrate draws them with its own seed, so the data
    order is untouched, and at the global batch size, so every DDP rank computes the same tau.
    From here the predictor is frozen: the anneal and the hard steps train the model under the
    cut that decoding at this tau makes. Not in the paper's recipe, which keeps tau = 0.5 and lets
    training set the density."""
    model.eval()
    with proc.autocast:  # the precision training's gates are computed in
        model.cfg.tau = spkv.calibrate(model, train, cfg.target_density, cfg.eval_batches, cfg.batch_size * proc.world)
    model.train()


def train_step(fwd, model, batch, cfg: TrainConfig, proc: Proc, *, view: str, a: float) -> tuple:
    """Forward/backward over the micro-batches of one global batch; returns (mean loss, grad norm).
    The global batch (grad_accum, world * batch_size, T) is the same on every rank; rank r takes
    columns r * batch_size ... so N processes see exactly what one process with N x the batch sees.
    view, a: gate_view_at's; "anneal" freezes the predictor (frozen=True) and passes a as a tensor,
    so torch.compile does not recompile as a changes; "soft" passes the plain 0, the soft view."""
    world = proc.world
    x_all, y_all = (t.view(cfg.grad_accum, world * cfg.batch_size, cfg.seq_len) for t in batch)
    cols = slice(proc.rank * cfg.batch_size, (proc.rank + 1) * cfg.batch_size)
    frozen = view == "anneal"
    anneal = torch.tensor(a) if frozen else 0.0
    loss_sum = torch.zeros((), device=proc.device)
    for micro in range(cfg.grad_accum):
        if world > 1:  # all-reduce gradients only on the last micro-batch
            fwd.require_backward_grad_sync = micro == cfg.grad_accum - 1
        with proc.autocast:
            _, loss = fwd(x_all[micro, cols].to(proc.device), y_all[micro, cols].to(proc.device), a=anneal, frozen=frozen)
        (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach() / cfg.grad_accum
    if world > 1:
        torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    return loss_sum.item(), norm.item()


def any_rank(flag: bool, world: int, device) -> bool:
    """True if any process has the flag set (so every rank stops at the same step)."""
    if world == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


if __name__ == "__main__":
    cli.run(main, "train.py")
