"""Adapt a converted pretrained model to SP-KV with next-token loss only (or train from scratch).

    python train.py                        # CPU: the shipped byte model; one GPU: the embedded SmolLM2-135M
    python train.py --gates=               # CPU: the same from open predictors, the paper's init
    python train.py --ckpt=my.pt --gates=  # another model: the preset's gates fit only the shipped one
    python train.py --dense=True           # the same recipe with plain attention: the baseline
    python train.py --preset=gpu --seq_len=4096
    torchrun --nproc_per_node=2 train.py   # DDP, as in nanoGPT

Recipe (METHOD.md sections 4-5): start from pretrained weights with predictors open (the cpu
preset starts them from --gates, fitted to the model's attention by experiments/ceiling.py); train the
model and predictors jointly (predictor LR x5, weight decay 0.1); warmup + cosine decay; for the
last 25% of the decay freeze the predictor and anneal every gate to its hard value, so the final
checkpoint is trained under exactly the attention it will decode with. The run folder (lock,
resume, log, Ctrl-C, guarded saves, final.json) is run.RunDir's; evaluation is measure.py's.
Flags are `--key=value` for any TrainConfig field; unknown keys and wrong types are refused.
"""

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch

import cli
import data as datalib
import kernels
import measure
from checkpoint import load_gates, load_model, read_checkpoint
from model import GPT, GPTConfig, peak_flops
from run import RunDir, progress
from tokenizer import Tokenizer
from weights import default_checkpoint


@dataclass
class TrainConfig:
    preset: str = "auto"  # "cpu" | "gpu" | "auto" (gpu when CUDA is present); explicit flags win
    init: str = "pretrained"  # "pretrained": a converted checkpoint; "scratch": random weights
    ckpt: str = ""  # converted checkpoint to adapt; "" = the embedded SmolLM2-135M (the cpu preset: SHIPPED)
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
    predictor_init_bias: float = 5.0  # output bias of fresh predictors: 5 = open (METHOD.md), < 0 leans closed
    gates: str = ""  # start the predictors from this gates file (experiments/ceiling.py --ship_gates); "" = fresh, open
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


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "stdlib_bytes.pt")
SHIPPED_GATES = os.path.join(os.path.dirname(SHIPPED), "stdlib_bytes_gates_w128.pt")  # fitted to SHIPPED's attention

PRESETS = {  # plain dicts of overrides, applied before explicit flags
    # CPU: the shipped byte model (experiments/pretrain.py) adapted on 2 cores within 15 minutes: 300 steps of
    # 4 x 1024 bytes at window 128, the paper's predictor recipe, but the predictors start from gates fitted to the
    # model's own attention (experiments/ceiling.py), not open: on this budget open gates never close
    # (experiments/mainflow.py), and at window 128 a gate of SP-KV's form beats StreamingLLM (at 32 none does)
    "cpu": dict(ckpt=SHIPPED, gates=SHIPPED_GATES, seq_len=1024, window=128, batch_size=4, grad_accum=1, max_steps=300,
                warmup_steps=20, lr=5e-4, weight_decay=0.1, eval_every=50, eval_batches=2, ckpt_every=50),
    "gpu": dict(seq_len=4096, batch_size=8, grad_accum=4, max_steps=2000, warmup_steps=100, eval_every=200,
                eval_batches=20, ckpt_every=200),
}


def parse_flags(argv: list) -> tuple:
    """--key=value flags -> (TrainConfig, the flags given explicitly: {key: value})."""
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
    return cfg, {k: getattr(cfg, k) for k in given}  # a preset of "auto" as resolved


def validate(cfg: TrainConfig):
    """Refuse values that cannot train, naming the flag and the fix."""
    v = dataclasses.asdict(cfg)
    shape = ("n_layer", "n_embd", "n_head", "n_kv_head") if cfg.init == "scratch" else ()
    problems = [f"--{k}={v[k]} must be >= 1" for k in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every",
                "eval_batches", "log_every", "ckpt_every", "anneal_steps", *shape) if v[k] < 1]
    problems += [f"--{k}={v[k]} must be a finite number > 0" for k in ("lr", "predictor_lr_mult", "grad_clip")
                 if not (math.isfinite(v[k]) and v[k] > 0)]
    problems += [f"--{k}={v[k]} must be a finite number >= 0" for k in ("weight_decay", "predictor_weight_decay",
                 "peak_tflops", "warmup_steps", "seed") if not (math.isfinite(v[k]) and v[k] >= 0)]
    if not math.isfinite(cfg.predictor_init_bias):
        problems.append(f"--predictor_init_bias={cfg.predictor_init_bias} must be a finite number")
    problems += [f"--{k}={v[k]} must be in [0, 1]" for k in ("min_lr_frac", "freeze_frac", "tau") if not 0 <= v[k] <= 1]
    if cfg.seed >= 2 ** 63:
        problems.append(f"--seed={cfg.seed} must be below 2**63")
    if cfg.warmup_steps >= cfg.max_steps:
        problems.append(f"--warmup_steps={cfg.warmup_steps} must be below --max_steps={cfg.max_steps}")
    if not 1 <= cfg.window < cfg.seq_len:
        problems.append(f"--window={cfg.window} must be in [1, --seq_len={cfg.seq_len}): older keys are what SP-KV prunes")
    problems += [f"--{k}={v[k]!r} is not one of {choices}" for k, choices in (("device", ("auto", "cpu", "cuda")),
                 ("init", ("pretrained", "scratch")), ("attn", ("auto", *kernels.ATTN_IMPLS))) if v[k] not in choices]
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
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if want == "cuda" and world > 1 else torch.device(want)
    if world > 1:
        torch.cuda.set_device(device) if want == "cuda" else None
        torch.distributed.init_process_group(backend="nccl" if want == "cuda" else "gloo")
        reason += f"; DDP rank {rank}/{world}"
    return rank, world, device, reason


def build_model(cfg: TrainConfig, device):
    """(model, tokenizer, where the weights came from). Pretrained: predictors start open."""
    path = cfg.ckpt or default_checkpoint()
    knobs = dict(window=cfg.window, tau=cfg.tau, predictor_init_bias=cfg.predictor_init_bias)
    if cfg.init == "scratch":  # only the tokenizer and vocabulary size come from the checkpoint
        ckpt = read_checkpoint(path)
        try:
            mc = GPTConfig(vocab_size=ckpt["config"]["vocab_size"], n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                           n_kv_head=cfg.n_kv_head, n_hidden=4 * cfg.n_embd, block_size=max(cfg.seq_len, 1024), **knobs,
                           dense_layers=tuple(range(cfg.n_layer)) if cfg.dense else ())
        except ValueError as e:  # the shape flags of --init=scratch
            raise cli.BadInput(f"--init=scratch: {e}") from None
        model, tok = GPT(mc), Tokenizer(ckpt["tokenizer"]) if ckpt.get("tokenizer") else None
    else:
        model, tok, ckpt = load_model(path, dense=cfg.dense, dense_layers=(), **knobs)  # every layer adapted
    if tok is None:
        raise cli.BadInput(f"checkpoint {path} has no tokenizer; convert it with its tokenizer.json")
    if cfg.seq_len > model.cfg.block_size:
        raise cli.BadInput(f"--seq_len={cfg.seq_len} is beyond the model's context of {model.cfg.block_size}")
    stored = ckpt["config"].get("predictor_init_bias")
    if cfg.gates and not cfg.dense:
        if cfg.init != "pretrained":
            raise cli.BadInput(f"--gates={cfg.gates} were fitted to a pretrained model's attention; give --gates= "
                               "with --init=scratch")
        load_gates(cfg.gates, model)
    elif cfg.init == "pretrained" and not cfg.dense and any(".predictor." in k for k in ckpt["model"]) \
            and stored != cfg.predictor_init_bias:
        raise cli.BadInput(f"--predictor_init_bias={cfg.predictor_init_bias:g} sets fresh predictors, but {path} stores "
                           f"its own (made at init bias {stored}); adapt weights without predictors (convert.py's "
                           f"output; convert again if yours is older), or drop the flag")
    return model.to(device), tok, "scratch" if cfg.init == "scratch" else path


def setup_device(model: GPT, cfg: TrainConfig, rank: int, world: int, device) -> tuple:
    """(Proc, reason): the attention path checked against device and bias size; bf16 autocast on CUDA, else fp32."""
    cuda = device.type == "cuda"
    if not cuda and cfg.attn in ("flex", "flex_compiled"):
        raise cli.BadInput(f"--attn={cfg.attn} has no backward on the CPU; use --attn=sdpa (or auto) to train here")
    impl, why = kernels.choose_attention(device, cfg.attn)
    model.attn_impl = impl
    if impl == "sdpa" and not cfg.dense:
        kernels.check_bias_size(cfg.batch_size, model.cfg.n_kv_head, cfg.seq_len, dtype_bytes=2 if cuda else 4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    return Proc(rank, world, device, autocast), why


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
# Schedules: learning rate, and the gates (soft, then predictor frozen while a goes 0 -> 1, then hard).


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def gate_schedule(cfg: TrainConfig) -> tuple:
    """(step the predictor freezes at, number of steps the anneal takes)."""
    freeze = cfg.warmup_steps + round((1 - cfg.freeze_frac) * (cfg.max_steps - cfg.warmup_steps))
    return freeze, max(1, min(cfg.anneal_steps, (cfg.max_steps - freeze) // 2))


def gates_at(step: int, cfg: TrainConfig) -> tuple:
    """(anneal weight a, frozen): (0.0, False) while the predictor learns; from the freeze, frozen with a going
    0 -> 1, then 1 (hard). Frozen, the gate logits are detached: no gradient, and AdamW skips (and never decays) them."""
    freeze, length = gate_schedule(cfg)
    if cfg.dense or step < freeze:
        return 0.0, False
    return min(1.0, (step - freeze + 1) / length), True


def evaluate(model: GPT, val: datalib.Batches, cfg: TrainConfig, proc: Proc) -> dict:
    """measure.evaluate on the same --eval_batches val batches at every call."""
    return measure.evaluate(model, val, cfg.eval_batches, cfg.batch_size, cfg.seed + 1, proc.device, proc.autocast)


# ---------------------------------------------------------------------------------------------
# One step, and the pieces of the loop


def train_step(fwd, model, opt, batch, lr: float, cfg: TrainConfig, proc: Proc, a: float, frozen: bool) -> tuple:
    """Forward/backward over the micro-batches of one global batch at learning rate lr; returns (mean loss, grad
    norm), the update left to the caller. The global batch (grad_accum, world * batch_size, T) is the same on every
    rank; rank r takes columns r * batch_size ..., so N processes see what one with N x the batch sees."""
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_mult"]
    world = proc.world
    x_all, y_all = (t.view(cfg.grad_accum, world * cfg.batch_size, cfg.seq_len) for t in batch)
    cols = slice(proc.rank * cfg.batch_size, (proc.rank + 1) * cfg.batch_size)
    loss_sum = torch.zeros((), device=proc.device)
    for micro in range(cfg.grad_accum):
        if world > 1:  # all-reduce gradients only on the last micro-batch
            fwd.require_backward_grad_sync = micro == cfg.grad_accum - 1
        with proc.autocast:
            _, loss = fwd(x_all[micro, cols].to(proc.device), y_all[micro, cols].to(proc.device), a=a, frozen=frozen)
        (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach() / cfg.grad_accum
    if world > 1:
        torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    return loss_sum.item(), norm.item()


def resumed_config(saved: dict, given: dict) -> TrainConfig:
    """The saved recipe with the flags given now on top (e.g. a longer --max_steps), validated."""
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise cli.BadInput(f"the run to resume was made by another version of train.py (unknown settings "
                           f"{unknown[:3]}); resume it with that version, or start a new --out_dir")
    cfg = TrainConfig(**{**saved, **given, "resume": True})
    validate(cfg)
    return cfg


def prepare_forward(model: GPT, cfg: TrainConfig, proc: Proc):
    """What the loop calls: the model with its blocks compiled on CUDA, wrapped in DDP under torchrun."""
    if proc.device.type == "cuda" and cfg.compile:
        model.compile_blocks()
    return model if proc.world == 1 else torch.nn.parallel.DistributedDataParallel(  # frozen predictors: "unused"
        model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None, find_unused_parameters=not cfg.dense)


def report_setup(cfg: TrainConfig, proc: Proc, model: GPT, source: str, why: list):
    cuda = proc.device.type == "cuda"
    print(f"device: {proc.device} ({why[0]}); dtype: {'bf16 autocast' if cuda else 'fp32'}; "
          f"compile: {cuda and cfg.compile}")
    print(f"attention: {model.attn_impl} ({why[1]}); MFU: {why[2]}")
    print(f"model: {source}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{'dense baseline' if cfg.dense else f'SP-KV window={cfg.window} tau={model.cfg.tau}'}")
    if not cfg.dense:
        print(f"predictors: from {cfg.gates}, gates fitted to the model's attention (experiments/ceiling.py); "
              "--gates= starts them fresh and open, the paper's init" if cfg.gates else
              f"predictors: as {source} stores them, else fresh at output bias {cfg.predictor_init_bias:g} "
              f"(u = {1 / (1 + math.exp(-cfg.predictor_init_bias)):.3f})")
        freeze, length = gate_schedule(cfg)
        print(f"schedule: soft gates to step {freeze}, then predictor frozen and gates annealed to hard over "
              f"{length} steps (hard from step {freeze + length})")


def report_end(final: dict, cfg: TrainConfig, proc: Proc, ckpt: str, model: GPT, val: datalib.Batches, source: str):
    """Val losses and densities; an adaptation also gets its dense base's full attention and
    StreamingLLM at SP-KV's density, on the same val batches (measure.against_base)."""
    print(f"\ndone: val loss soft {final['val_soft']:.4f}, hard {final['val_hard']:.4f} -> {ckpt}")
    measure.report_density(final)
    if cfg.dense or cfg.init != "pretrained":
        return
    final["against_base"] = measure.compare_with_base(model, source, val, final["density"], cfg.eval_batches,
                                                      cfg.batch_size, cfg.seed + 1)
    if final["density"] > 0.95:
        print(f"note: this run kept (almost) every old pair in {cfg.max_steps} steps (predictor LR x"
              f"{cfg.predictor_lr_mult:g}): on a CPU budget the next-token loss keeps gates open, even at x100 "
              f"or from shut gates (experiments/README.md, mainflow.py)")


# ---------------------------------------------------------------------------------------------
# The loop


def main(argv, batches=datalib.Batches):
    """train.py's command line; `batches` draws the windows (a data.Batches subclass may choose their starts)."""
    cfg, given = parse_flags(argv)
    rank, world, device, why_device = setup_processes(cfg)
    master = rank == 0
    with RunDir(cfg.out_dir, master) as run:
        saved = run.open(cfg.resume)  # the run to continue, or None once the folder may take a new one
        cfg = resumed_config(saved, given) if cfg.resume else cfg
        torch.manual_seed(cfg.seed)
        model, tok, source = build_model(cfg, device)
        proc, why_attn = setup_device(model, cfg, rank, world, device)
        peak, why_peak = peak_flops(device, cfg.peak_tflops)
        folder = datalib.prepare(cfg.data, tok, cfg.data_cache or datalib.DEFAULT_CACHE)
        train, val = batches(folder, "train", cfg.seq_len), batches(folder, "val", cfg.seq_len)
        opt = make_optimizer(model, cfg, fused=device.type == "cuda")
        gen = torch.Generator().manual_seed(cfg.seed)  # the data position: saved and restored
        step = run.restore(model, opt, gen, cfg.max_steps) if cfg.resume else 0
        fwd = prepare_forward(model, cfg, proc)
        if master:
            report_setup(cfg, proc, model, source, [why_device, why_attn, why_peak])
            run.begin(model, evaluate(model, val, cfg, proc))
        tokens_per_step = cfg.batch_size * cfg.grad_accum * world * cfg.seq_len
        t0, first = time.time(), step
        while step < cfg.max_steps:
            a, frozen = gates_at(step, cfg)
            lr, t_step = lr_at(step, cfg), time.time()
            batch = train.sample(cfg.grad_accum * world * cfg.batch_size, gen)
            loss, norm = train_step(fwd, model, opt, batch, lr, cfg, proc, a, frozen)
            run.check_finite(loss, norm, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1  # steps done: what log.jsonl, the console, ckpt.pt and final.json all call the step
            rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "frozen": frozen, "anneal": a,
                   "tokens_per_s": tokens_per_step / (time.time() - t_step)}
            if peak:
                rec["mfu"] = model.flops_per_token(cfg.seq_len) * rec["tokens_per_s"] / world / peak
            stopping = run.stopping(world, device)  # the same step on every rank
            saving = step % cfg.ckpt_every == 0 or step == cfg.max_steps or stopping
            if master and (step % cfg.eval_every == 0 or step == cfg.max_steps or saving):  # a save is judged by its eval
                rec.update(evaluate(model, val, cfg, proc))
                print(f"\nstep {step}: train {loss:.4f} val soft {rec['val_soft']:.4f} hard {rec['val_hard']:.4f}"
                      + (f" density {rec['density']:.3f}" if "density" in rec else ""))
            run.log(rec)
            if master and step % cfg.log_every == 0:
                phase = "hard" if a == 1.0 else f"anneal a={a:.2f}" if frozen else "soft"
                progress(step, cfg.max_steps, t0, first, f"loss {loss:.4f} {phase} {rec['tokens_per_s']:.0f} tok/s")
            if saving:
                run.save(step, model, rec, tok.spec, source, optimizer=opt.state_dict(), data_rng=gen.get_state(),
                         train_config=dataclasses.asdict(cfg))
            if stopping:
                run.interrupted(step)
        if master:
            final = evaluate(model, val, cfg, proc)
            report_end(final, cfg, proc, run.ckpt, model, val, source)
            run.finish({"step": step, **final, "train_config": dataclasses.asdict(cfg)})
    if world > 1:  # every rank waits for rank 0's last eval and save, then all leave the group together
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli.run(main, "train.py")
