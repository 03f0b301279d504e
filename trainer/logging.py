"""Run logging: JSONL metrics, optional wandb, a tqdm bar, throughput/MFU, the run's PNG.

Scope: everything the loop reports, on the main rank only. The PNG and the progress bar show
what the stage optimises, chosen by the metrics it logged (`PANELS`): loss for pretraining and
SFT; reward, rollout accuracy, KL and response length for RL; the reward margin and preference
accuracy for DPO; the teacher-student KL for distillation; validation curves beside them.
wandb and matplotlib are imported lazily, so neither is needed unless used. MFU follows the PaLM/nanoGPT accounting:
FLOPs per trained token = 6·N (N = parameters active per token, embeddings of a tied model counted
once) + 12·L·d·S for attention scores (L layers, d model width, S sequence length); a frozen base
(LoRA) still costs about the same forward+backward FLOPs, so this is an upper-bound estimate there.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.atomic import atomic_path, atomic_write_text
from common.errors import writing

# Dense peak TFLOP/s (bf16/fp16 tensor cores; fp32 without TF32) of common GPUs, from vendor sheets.
GPU_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    # name fragment: (bf16/fp16, fp32)
    "H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "A10": (125.0, 31.2),
    "L40": (181.0, 90.5), "L4": (121.0, 30.3), "4090": (165.0, 82.6), "3090": (71.0, 35.6),
    "V100": (125.0, 15.7), "T4": (65.0, 8.1),
}


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), see module docstring."""
    cfg = getattr(model, "config", None)
    n_params = None
    if cfg is not None and hasattr(cfg, "num_parameters"):
        try:
            n_params = float(cfg.num_parameters(active=True))
        except TypeError:
            n_params = float(cfg.num_parameters())
    if n_params is None:
        n_params = float(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    width = getattr(cfg, "hidden_size", 0) or 0
    return 6.0 * n_params + 12.0 * layers * width * seq_len


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 1024,
                          seconds: float = 0.3) -> float:
    """Achievable matmul TFLOP/s on this device (a CPU has no data-sheet peak to look up)."""
    # A generator of its own: the loop measures right after restoring the RNG state on resume,
    # and drawing from the global generator here would shift every later dropout mask.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e12


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float = 0.0) -> tuple[float, str]:
    """(peak TFLOP/s, where it came from) for the MFU denominator."""
    if override > 0:
        return override, "--peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for frag, (half, single) in GPU_PEAK_TFLOPS.items():
            if frag in name:
                return (single if dtype == torch.float32 else half), f"data sheet ({name})"
    return measure_matmul_tflops(device, dtype), "measured matmul probe"


@dataclass(frozen=True)
class Panel:
    """One panel of the run's PNG: the metrics it draws (fnmatch patterns over metrics.jsonl
    keys, one line each) and their short progress-bar labels ("" or missing = not on the bar).
    `with_key` / `without_key`: drawn only when that metric is / is not logged too (one name,
    two meanings: GRPO's kl is to its reference, distillation's to the teacher)."""

    title: str
    keys: tuple[str, ...]
    bar: tuple[str, ...] = ()
    with_key: str = ""
    without_key: str = ""

    def matches(self, logged: set[str]) -> list[str]:
        """The logged metric names this panel draws, in pattern order ([] = no panel)."""
        if (self.with_key and self.with_key not in logged) or self.without_key in logged:
            return []
        return list(dict.fromkeys(k for pat in self.keys for k in sorted(logged) if fnmatchcase(k, pat)))


# What each stage optimises, most telling first (the names TRL and wandb users know). A run gets
# the panels whose metrics it logged; the loss, with its validation curves, comes last because
# an RL surrogate loss says little about learning.
PANELS = (
    Panel("reward (mean over rollouts)", ("reward",), ("reward",)),
    Panel("accuracy: rollouts, held-out greedy", ("accuracy", "val_gen_accuracy"), ("acc", "val_acc")),
    Panel("KL(policy || reference)", ("kl",), ("kl",), with_key="reward"),
    Panel("response length (tokens)", ("response_len",), ("len",)),
    Panel("reward parts, unweighted", ("reward/*",)),
    Panel("entropy of the policy (nats / token)", ("entropy",)),
    Panel("reward margin (chosen - rejected)", ("rewards/margins", "val/*/rewards/margins"),
          ("margin", "val_margin")),
    Panel("preference accuracy", ("rewards/accuracies", "val/*/rewards/accuracies"),
          ("pref_acc", "val_pref_acc")),
    Panel("implicit rewards beta*log(pi/pi_ref)", ("rewards/chosen", "rewards/rejected")),
    Panel("teacher-student KL", ("kl", "val/*/kl"), ("kl", "val_kl"), without_key="reward"),
    Panel("loss", ("loss", "val/*/loss"), ("loss", "val")),
)
# after the stage's own figures on the bar; a throughput of 0 (nothing counted) is not shown
BAR_TAIL = (("lr", "lr"), ("tok/s", "tokens_per_s"), ("gen tok/s", "rollout_tok_s"), ("mfu", "mfu"))


def bar_fields(metrics: dict[str, Any]) -> dict[str, str]:
    """The progress bar's fields for one log record: the stage's own figures (PANELS' bar
    labels), then lr and the throughputs that are above zero."""
    logged = {k for k, v in metrics.items() if isinstance(v, (int, float))}
    out: dict[str, str] = {}
    for panel in PANELS:
        drawn = panel.matches(logged)
        for pat, label in zip(panel.keys, panel.bar):
            key = next((k for k in drawn if fnmatchcase(k, pat)), None)
            if label and key is not None:
                out[label] = f"{metrics[key]:.3g}"
    for label, key in BAR_TAIL:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and (value > 0 or key == "lr"):
            out[label] = f"{100 * value:.1f}%" if key == "mfu" else f"{value:.3g}"
    return out


class RunLogger:
    """Writes metrics.jsonl (+ wandb) and drives the progress bar; inert on non-main ranks."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool, total_steps: int, start_step: int,
                 config: dict[str, Any], wandb_mode: str = "off", wandb_project: str = "",
                 run_name: str = "", wandb_id: str | None = None, progress: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb_run = None
        self.wandb_id = wandb_id
        self.bar = None
        self.postfix: dict[str, str] = {}   # kept across records: validation stays on the bar
        if not enabled:
            return
        with writing(self.path.parent):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if wandb_mode != "off":
            self._start_wandb(out_dir, wandb_mode, wandb_project, run_name, config)
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name or "train",
                            dynamic_ncols=True, smoothing=0.1)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (they will be logged again)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:
                continue        # a half-written last line from a killed run
        atomic_write_text(self.path, "".join(line + "\n" for line in keep) if step > 0 else "")

    def _start_wandb(self, out_dir: Any, mode: str, project: str, name: str, config: dict) -> None:
        import wandb  # lazy: heavy import, optional dependency

        os.environ.setdefault("WANDB_SILENT", "true")
        # our own id (kept in the resume state) so a resumed run continues the same wandb run
        self.wandb_id = self.wandb_id or secrets.token_hex(4)
        self.wandb_run = wandb.init(project=project, name=name or None, id=self.wandb_id, mode=mode,
                                    resume="allow", dir=str(out_dir), config=config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One record: JSONL line, wandb row, progress-bar postfix for the headline numbers."""
        if not self.enabled:
            return
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with writing(self.path), open(self.path, "a", encoding="utf-8") as fh:   # disk full: one line
            fh.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.bar is not None:
            self.postfix.update(bar_fields(metrics))
            self.bar.set_postfix(self.postfix)   # now: the bar shows this record

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        """A line above the bar (main rank only)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self, plot: bool = True) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if plot and self.path.exists():
            plot_metrics(self.path, self.path.with_name("loss_curve.png"))


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and up to `window - 1` before it (a noisy RL reward's trend)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def chosen_panels(rows: list[dict[str, Any]]) -> list[tuple[Panel, list[str]]]:
    """(panel, the metric names it draws) for each of PANELS that the logged records fill."""
    logged = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    return [(p, keys) for p in PANELS if (keys := p.matches(logged))]


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """One PNG of what the run optimised: a panel per entry of PANELS whose metrics are in
    metrics.jsonl, against the optimizer step; None if there is nothing to draw. Validation
    curves (`val*` names) get markers; a training series of more than 30 points is drawn faint
    with its trailing mean over a fifteenth of the run on top."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    panels = chosen_panels(rows)
    if not panels:
        return None
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    cols = 1 if len(panels) == 1 else 2
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 3.4 * nrows), squeeze=False)
    for ax, (panel, keys) in zip(axes.flat, panels):
        for key in keys:
            steps, values = zip(*[(r["step"], r[key]) for r in rows
                                  if isinstance(r.get(key), (int, float))])
            if key.startswith("val"):
                ax.plot(steps, values, marker="o", label=key)
            elif len(values) > 30:
                line, = ax.plot(steps, values, alpha=0.3)
                window = len(values) // 15
                ax.plot(steps, trailing_mean(list(values), window), color=line.get_color(),
                        label=f"{key} (mean of {window} logs)")
            else:
                ax.plot(steps, values, label=key)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(Path(metrics_path).parent.name)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(png_path)
