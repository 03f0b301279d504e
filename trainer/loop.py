"""The training loop, written once for every stage.

Scope: `fit()` runs optimisation for any stage; a stage supplies its dataset, its
`loss_fn(model, batch) -> (loss, metrics)` and which parameters train. `fit` owns mixed precision,
gradient accumulation (DDP/FSDP sync on the last micro-step only), clipping, the schedule, data
order, evaluation, logging, NaN handling and checkpoint/resume. `--parallel fsdp` shards the model
(trainer.distributed.shard_model) before the optimizer is built and writes sharded (DCP)
checkpoints that resume at any world size.

Host syncs: none per step by default. Losses and the non-finite flag accumulate on the device and
are read every `log_every` steps and before each evaluation/checkpoint, so a diverged step is
caught before anything is saved. (`nan_policy=skip` and fp16's GradScaler read a flag every step.)
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from model.precision import resolve_precision
from trainer import checkpoint as ckpt_io
from trainer import distributed as dist
from trainer.config import ConfigError, TrainConfig
from trainer.logging import RunLogger, flops_per_token, peak_tflops
from trainer.losses import batch_weight
from trainer.optim import CosineSchedule, build_optimizer, param_groups
from trainer.rng import rng_state, seed_everything, set_rng_state
from trainer.sampler import StreamSampler
from trainer.validation import EvalHook, evaluate, to_device

# Run on the main process at each evaluation (e.g. generation accuracy): model -> {name: number}.
# Run after each optimizer step that was taken: (plain model, step number just completed).
StepHook = Callable[[nn.Module, int], object]


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf under nan_policy='stop'; the last checkpoint on disk is intact."""


@dataclass
class FitResult:
    """What a run ended with (identical on every rank)."""

    step: int
    samples_seen: int
    train_loss: float | None = None
    val: dict[str, float] = field(default_factory=dict)
    best_val_loss: float | None = None
    checkpoint: Path | None = None
    skipped_steps: int = 0


def _num_tokens(batch: Any) -> int:
    """Tokens fed to the model: every `*input_ids` tensor (DPO has chosen_ and rejected_)."""
    if not isinstance(batch, Mapping):
        return 0
    return sum(int(v.numel()) for k, v in batch.items()
               if k.endswith("input_ids") and isinstance(v, torch.Tensor))


def make_autocast(device_type: str, dtype: str) -> Callable[[], Any]:
    """A factory of autocast contexts (bf16/fp16) or null contexts (fp32). Weights stay fp32.
    `dtype` is a name or ``auto`` (resolved for `device_type` by model.precision)."""
    precision = resolve_precision(dtype, device_type)
    if precision.name == "fp32":
        return nullcontext
    return lambda: torch.autocast(device_type, dtype=precision.dtype)


def restore(state: dict[str, Any], optimizer: torch.optim.Optimizer, schedule: CosineSchedule,
            scaler: torch.amp.GradScaler, env: dist.DistEnv, global_batch: int, log: Callable) -> None:
    """Put optimizer, schedule, scaler and this rank's RNG back as they were at the checkpoint."""
    if state["global_batch"] != global_batch:
        raise ValueError(f"resume: global batch was {state['global_batch']}, now {global_batch}; "
                         "keep batch_size * grad_accum * world_size unchanged for an exact resume")
    if "optimizer" in state:        # a sharded checkpoint's optimizer came back through DCP
        optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    if len(rngs) != env.world_size:
        log(f"[train] checkpoint has {len(rngs)} ranks' RNG states, now {env.world_size}: "
            "every rank takes rank 0's (data order is unaffected)")
    set_rng_state(rngs[env.rank] if len(rngs) == env.world_size else rngs[0])
    if state["schedule"]["max_steps"] != schedule.max_steps:
        log(f"[train] warning: max_steps was {state['schedule']['max_steps']}, now "
            f"{schedule.max_steps}: the lr schedule changes from here on")


@dataclass
class Run:
    """Everything one fit() call works on: set up once by `setup`, advanced by `train_step`,
    read by `log_window`, `evaluate_now` and `save`."""

    cfg: TrainConfig
    env: dist.DistEnv
    model: nn.Module                 # the plain module (evaluation, hooks, checkpoints)
    train_model: nn.Module           # what the step runs: DDP-wrapped and/or compiled
    loss_fn: Callable
    collate_fn: Callable
    eval_sets: dict[str, Dataset]
    eval_hooks: Sequence[EvalHook]
    after_step: Sequence[StepHook]
    on_save: Callable[[nn.Module, int], dict[str, bytes] | None] | None
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: CosineSchedule
    scaler: torch.amp.GradScaler
    autocast: Callable[[], Any]
    batches: Iterator[Any]
    logger: RunLogger
    max_steps: int
    global_batch: int
    epoch_len: int
    flops_tok: float
    peak: float
    result: FitResult
    last_saved: Path | None
    # since the last log line: device-side sums (no per-step sync) and host-side counts
    loss_sum: torch.Tensor
    first_bad: torch.Tensor          # first non-finite step, -1 = none
    gnorm: torch.Tensor
    base_dir: str | None = None      # frozen base folder: checkpoints reference it, not copy it
    sharded: bool = False            # --parallel fsdp: sharded (DCP) checkpoints
    lr: float = 0.0
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    weight_sum: float = 0.0
    tokens: int = 0
    steps_since: int = 0
    t_last: float = field(default_factory=time.perf_counter)

    @property
    def step(self) -> int:
        return self.result.step


def setup(model: nn.Module, train_data: Dataset, loss_fn: Callable, cfg: TrainConfig,
          eval_data: Dataset | Mapping[str, Dataset] | None, trainable: list[nn.Parameter] | None,
          collate_fn: Callable | None, on_save: Callable | None, eval_hooks: Sequence[EvalHook],
          after_step: Sequence[StepHook]) -> Run:
    """Validate, move the model, build optimizer / schedule / scaler, resume if asked, wrap
    (DDP, compile) and start the data stream and the logger."""
    eval_sets = {"val": eval_data} if isinstance(eval_data, Dataset) else dict(eval_data or {})
    cfg.validate(bool(eval_sets or eval_hooks), model_config=getattr(model, "config", None))
    if cfg.eval_gen_data and not eval_hooks:
        raise ConfigError("eval_gen_data is set but this stage passes no eval_hooks to fit "
                          "(build them with trainer.stage.generation_hooks)")
    env = dist.init_distributed(cfg.device)
    log = print if env.is_main else (lambda *_: None)
    model.to(env.device)
    if trainable is not None:
        chosen = {id(p) for p in trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
    if cfg.activation_checkpointing:
        dist.apply_activation_checkpointing(model)
    precision = resolve_precision(cfg.dtype, env.device)
    sharded = cfg.parallel == "fsdp"
    if sharded:   # before the optimizer: fully_shard swaps the parameters for DTensor shards
        dist.shard_model(model, env, precision.dtype if precision.name == "bf16" else None,
                         cfg.reshard_after_forward)
        if trainable is not None:
            trainable = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, trainable, cfg.weight_decay)
    optimizer = build_optimizer(groups, cfg.lr, cfg.betas, cfg.eps, env.device.type)
    global_batch = cfg.batch_size * cfg.grad_accum * env.world_size
    max_steps = cfg.max_steps or math.ceil(cfg.epochs * len(train_data) / global_batch)
    schedule = CosineSchedule(optimizer, max_steps, cfg.warmup_steps, cfg.min_lr_ratio)
    log(f"[train] {precision.describe()}")
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision.name == "fp16")

    # A stage that trains a subset (LoRA) of a base loaded from init_from: the frozen rest is
    # that folder's weights, so checkpoints refer to it instead of writing a copy every save.
    frozen = any(not p.requires_grad for p in model.parameters())
    base_dir = cfg.init_from if trainable is not None and cfg.init_from and frozen else None
    step, samples, best_val, wandb_id = 0, 0, None, None
    seed_everything(cfg.seed + env.rank)   # different dropout masks per rank, same data order
    resume_from = dist.broadcast_object(ckpt_io.resolve_resume(cfg.resume, cfg.out_dir, log)
                                        if env.is_main else None)
    if resume_from is not None:
        base = base_dir or cfg.init_from or None
        if ckpt_io.is_sharded_checkpoint(resume_from):    # any world size, ddp or fsdp
            state = ckpt_io.read_sharded_state(resume_from, base, verify_base=env.is_main)
            dist.load_sharded(ckpt_io.shards_dir(resume_from), model, optimizer,
                              frozen=base_dir is not None)
        elif dist.is_sharded(model):
            raise ConfigError(f"resume: {resume_from} was written by --parallel ddp (optimizer "
                              "state by index, not by name); resume it with --parallel ddp")
        else:
            state = ckpt_io.load_checkpoint(resume_from, model, verify=False,  # main verified it
                                            base_dir=base, verify_base=env.is_main)
        restore(state, optimizer, schedule, scaler, env, global_batch, log)
        step, samples = state["step"], state["samples"]
        best_val, wandb_id = state["best_val_loss"], state["wandb_id"]

    train_model = model if sharded else dist.wrap_model(model, env)
    if cfg.compile:
        train_model = torch.compile(train_model)
    sampler = StreamSampler(len(train_data), cfg.batch_size, cfg.grad_accum, env.rank, env.world_size,
                            cfg.seed, start=samples, num_steps=max_steps - step)
    # own generator: creating the iterator must not draw from the global RNG (exact resume)
    loader = DataLoader(train_data, batch_sampler=sampler, collate_fn=collate_fn or default_collate,
                        num_workers=cfg.num_workers, pin_memory=env.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed + step))
    logger = RunLogger(cfg.out_dir, env.is_main, max_steps, step, cfg.to_dict(), cfg.wandb,
                       cfg.wandb_project, cfg.run_name or Path(cfg.out_dir).name, wandb_id, cfg.progress)
    peak, peak_src = (peak_tflops(env.device, precision.dtype, cfg.peak_tflops) if env.is_main
                      else (0.0, ""))
    params = [p for g in groups for p in g["params"]]
    logger.message(f"[train] {max_steps} steps x {global_batch} samples, world {env.world_size}, "
                   f"{sum(p.numel() for p in params):,} trainable params, "
                   f"peak {peak:.1f} TFLOP/s ({peak_src})")
    dev = env.device
    return Run(cfg, env, model, train_model, loss_fn, collate_fn or default_collate, eval_sets,
               eval_hooks, after_step, on_save, params, optimizer, schedule, scaler,
               make_autocast(dev.type, precision.name), iter(loader), logger, max_steps,
               global_batch, len(train_data), flops_per_token(model, cfg.seq_len), peak,
               FitResult(step=step, samples_seen=samples, best_val_loss=best_val), resume_from,
               loss_sum=torch.zeros((), device=dev),
               first_bad=torch.full((), -1, device=dev, dtype=torch.long),
               gnorm=torch.zeros((), device=dev), base_dir=base_dir, sharded=sharded)


def forward_backward(run: Run, micro: list[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """Accumulate one optimizer step's gradients; returns (sum of loss*weight, metrics, weight)."""
    env, dev = run.env, run.env.device
    weights = [batch_weight(b) for b in micro]
    total: Any = max(sum(weights), 1e-12)
    if env.distributed:   # supervised tokens of the whole global batch, kept on device: no sync
        total = dist.all_reduce_sum(torch.tensor(sum(weights), device=dev)).clamp(min=1e-12)
    step_loss = torch.zeros((), device=dev)
    step_metrics: dict[str, torch.Tensor] = {}
    for i, (batch, w) in enumerate(zip(micro, weights)):
        batch = to_device(batch, dev)
        with dist.grad_sync(run.train_model, sync=i == len(micro) - 1):
            with run.autocast():
                loss, metrics = run.loss_fn(run.train_model, batch)
            # loss_fn gives a per-micro-batch mean; weighting by its token share makes the
            # step the mean over all supervised tokens of the global batch (see batch_weight)
            run.scaler.scale(loss * (w * env.world_size / total)).backward()
        step_loss += loss.detach().float() * w
        for k, v in metrics.items():
            step_metrics[k] = step_metrics.get(k, 0.0) + torch.as_tensor(v, device=dev).float() * w
    return step_loss, step_metrics, sum(weights)


def train_step(run: Run) -> None:
    """One optimizer step: grad_accum micro-batches, clip, the non-finite policy, the update,
    the after_step hooks."""
    cfg, opt, scaler = run.cfg, run.optimizer, run.scaler
    run.lr = run.schedule.apply(run.step)
    micro = [next(run.batches) for _ in range(cfg.grad_accum)]
    run.tokens += sum(_num_tokens(b) for b in micro)
    step_loss, step_metrics, step_weight = forward_backward(run, micro)
    scaler.unscale_(opt)
    if cfg.grad_clip > 0:
        run.gnorm = dist.clip_grad_norm(run.params, cfg.grad_clip)
    step_bad = ~torch.isfinite(step_loss)
    if not scaler.is_enabled() and cfg.grad_clip > 0:
        step_bad |= ~torch.isfinite(run.gnorm)   # fp16: inf grads are the scaler's business
    # skip: one sync per step, agreed by all ranks so none steps alone
    if cfg.nan_policy == "skip" and dist.all_reduce_max(step_bad.float()).item() > 0:
        opt.zero_grad(set_to_none=True)
        scaler.update()
        run.result.skipped_steps += 1
        run.logger.message(f"[train] step {run.step + 1}: non-finite loss, update skipped")
    else:
        # recorded on device, read at the next check: no per-step host sync
        run.first_bad = torch.where(step_bad & (run.first_bad < 0), run.step + 1, run.first_bad)
        run.loss_sum += step_loss
        run.weight_sum += step_weight
        for k, v in step_metrics.items():
            run.metric_sums[k] = run.metric_sums.get(k, 0.0) + v
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        for hook in run.after_step:
            hook(run.model, run.step + 1)
    run.result.step += 1
    run.result.samples_seen += run.global_batch
    run.steps_since += 1
    run.logger.advance()


def check_finite(run: Run) -> None:
    """One sync: stop cleanly (all ranks together) if any loss since the last check was NaN/Inf."""
    bad_step = int(dist.all_reduce_max(run.first_bad.clone()).item())
    if run.cfg.nan_policy == "stop" and bad_step >= 0:
        raise TrainingDiverged(
            f"non-finite loss/gradient at step {bad_step} (checked every {run.cfg.log_every} steps "
            "and before saving). Nothing was saved after it; last good "
            f"checkpoint: {run.last_saved or 'none'}. Try a lower lr, --dtype fp32, --grad_clip, "
            "or --nan_policy skip, then --resume.")


def log_window(run: Run) -> None:
    """Log the steps since the last log line (all-reduced over ranks) and start a new window."""
    check_finite(run)
    keys = sorted(run.metric_sums)
    host = torch.tensor([run.weight_sum, run.tokens], device=run.env.device, dtype=torch.float32)
    stats = torch.cat([run.loss_sum.view(1), host] + [run.metric_sums[k].view(1) for k in keys])
    stats = dist.all_reduce_sum(stats).tolist()
    dt = time.perf_counter() - run.t_last
    tok_s = stats[2] / max(dt, 1e-9)
    run.result.train_loss = stats[0] / max(stats[1], 1e-12)
    # A batch without input_ids (GRPO's prompt indices: its stage logs its own rollout/update
    # tokens/s) counts no tokens: no throughput is logged rather than a false 0.
    speed = {"tokens_per_s": tok_s,
             "mfu": tok_s * run.flops_tok / (run.peak * 1e12) if run.peak else 0.0} if stats[2] else {}
    run.logger.log(run.step, {
        "loss": run.result.train_loss, "lr": run.lr, "grad_norm": float(run.gnorm), **speed,
        "epoch": run.result.samples_seen / run.epoch_len, "step_time_s": dt / run.steps_since,
        **{k: v / max(stats[1], 1e-12) for k, v in zip(keys, stats[3:])}})
    run.loss_sum.zero_()
    run.metric_sums.clear()
    run.weight_sum, run.tokens, run.steps_since, run.t_last = 0.0, 0, 0, time.perf_counter()


def evaluate_now(run: Run) -> float | None:
    """Validation sets and hooks; logs them, tracks the best val loss, returns this one."""
    check_finite(run)
    t0 = time.perf_counter()
    res = run.result
    res.val = evaluate(run.model, run.eval_sets, run.loss_fn, run.cfg, run.env, run.collate_fn,
                       run.autocast, run.eval_hooks)
    val_loss = res.val.get("val_loss")
    if val_loss is not None and (res.best_val_loss is None or val_loss < res.best_val_loss):
        res.best_val_loss = val_loss
    run.logger.log(run.step, res.val)
    run.t_last += time.perf_counter() - t0    # keep tokens/s about training only
    return val_loss


def save(run: Run, val_loss: float | None) -> None:
    """A complete checkpoint (weights, optimizer, schedule, scaler, every rank's RNG, data position);
    with a frozen base (`run.base_dir`), only the trainable weights plus a reference to the base."""
    check_finite(run)
    t0 = time.perf_counter()
    rngs = dist.all_gather_object(rng_state())
    res, path = run.result, None
    state = {"step": res.step, "samples": res.samples_seen, "global_batch": run.global_batch,
             "world_size": run.env.world_size, "schedule": run.schedule.state_dict(),
             "scaler": run.scaler.state_dict(), "rng": rngs, "best_val_loss": res.best_val_loss,
             "wandb_id": run.logger.wandb_id, "config": run.cfg.to_dict()}
    if run.sharded:
        path = save_sharded(run, state, val_loss)
    elif run.env.is_main:
        state["optimizer"] = run.optimizer.state_dict()
        extra = run.on_save(run.model, res.step) if run.on_save is not None else None
        path = ckpt_io.save_checkpoint(run.cfg.out_dir, res.step, run.model, state,
                                       run.cfg.keep_last, val_loss, extra, base_dir=run.base_dir)
    if path is not None:
        run.logger.message(f"[checkpoint] saved {path}")
    dist.barrier()
    run.last_saved = run.result.checkpoint = dist.broadcast_object(path)
    run.t_last += time.perf_counter() - t0


def save_sharded(run: Run, state: dict[str, Any], val_loss: float | None) -> Path | None:
    """--parallel fsdp: every rank writes its shards of weights and optimizer state (DCP), then
    the main rank writes the rest and the COMPLETE marker last (checkpoint.save_sharded_checkpoint);
    returns the folder on the main rank. The stage's extra files (adapters) are made from the
    gathered parameters."""
    extra = None
    if run.on_save is not None:
        with dist.full_params(run.model) as plain:
            extra = run.on_save(plain, run.step) if run.env.is_main else None
    frozen = run.base_dir is not None

    def write_shards(folder: Path) -> dict[str, dict[str, Any]]:
        dist.save_sharded(folder, run.model, run.optimizer, frozen)
        digests = ckpt_io.file_digests(folder, f"__{run.env.rank}_*")   # each rank its own files
        if run.env.is_main:
            digests.update(ckpt_io.file_digests(folder, ".metadata"))
        return {k: v for part in dist.all_gather_object(digests) for k, v in part.items()}

    return ckpt_io.save_sharded_checkpoint(run.cfg.out_dir, run.step, run.model, state,
                                           run.cfg.keep_last, write_shards, run.env.is_main,
                                           dist.barrier, val_loss, extra, run.base_dir)


def fit(model: nn.Module, train_data: Dataset, loss_fn: Callable, cfg: TrainConfig,
        eval_data: Dataset | Mapping[str, Dataset] | None = None,
        trainable: list[nn.Parameter] | None = None, collate_fn: Callable | None = None,
        on_save: Callable[[nn.Module, int], dict[str, bytes] | None] | None = None,
        eval_hooks: Sequence[EvalHook] = (), after_step: Sequence[StepHook] = ()) -> FitResult:
    """Train `model` on `train_data` with `loss_fn`; see the module docstring.

    trainable: the parameters to optimise (others are frozen); None = all with requires_grad.
    eval_data: one dataset or {name: dataset}; evaluated every `eval_every` steps and at the end.
    on_save(model, step) -> {file name: bytes}: extra files (e.g. adapters) stored, checksummed,
    inside each checkpoint. eval_hooks: run on the main process at each evaluation (stage.py's
    generation accuracy for eval_gen_data). after_step(model, step): called after each optimizer
    step that was taken (e.g. the kt kernel's LoRA refresh). `model` arrives finished (weights,
    LoRA, expert offload: trainer.stage.build_model); fit only replaces its weights on resume.
    Runs under torchrun unchanged (DDP, sharded data).
    """
    # disk full / unwritable out_dir (checkpoint, metrics): one line naming what to resume from
    with ckpt_io.resume_hint_on_write_error(cfg.out_dir):
        run = setup(model, train_data, loss_fn, cfg, eval_data, trainable, collate_fn, on_save,
                    eval_hooks, after_step)
        start_step, evaluates = run.step, bool(run.eval_sets or eval_hooks)
        try:
            model.train()
            while run.step < run.max_steps:
                train_step(run)
                last = run.step == run.max_steps
                if run.step % cfg.log_every == 0 or last:
                    log_window(run)
                val_loss = None
                if evaluates and ((cfg.eval_every and run.step % cfg.eval_every == 0) or last):
                    val_loss = evaluate_now(run)
                if (cfg.save_every and run.step % cfg.save_every == 0) or last:
                    save(run, val_loss)
            if run.step == start_step and run.last_saved is not None:
                run.result.checkpoint = run.last_saved     # resumed a finished run: nothing to do
        except BaseException:
            run.logger.close(plot=False)    # no plot to write over the error that ends the run
            raise
        run.logger.close(plot=run.env.is_main and cfg.plot)
    return run.result
