"""Run logging: JSONL metrics, optional wandb, a tqdm bar, throughput/MFU, the loss-curve PNG.

Scope: everything the loop reports, on the main rank only. wandb and matplotlib are imported
lazily, so neither is needed unless used. MFU follows the PaLM/nanoGPT accounting:
FLOPs per trained token = 6·N (N = parameters active per token, embeddings of a tied model counted
once) + 12·L·d·S for attention scores (L layers, d model width, S sequence length); a frozen base
(LoRA) still costs about the same forward+backward FLOPs, so this is an upper-bound estimate there.
"""
from __future__ import annotations

import json
import os
import secrets
import time
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
            show = {"loss": "loss", "lr": "lr", "tok/s": "tokens_per_s", "mfu": "mfu"}
            post = {k: metrics[v] for k, v in show.items() if v in metrics}
            post = {k: (f"{v:.3g}" if k != "mfu" else f"{100 * v:.1f}%") for k, v in post.items()}
            if "val_loss" in metrics:
                post["val"] = f"{metrics['val_loss']:.3f}"
            self.bar.set_postfix(post, refresh=False)

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
            plot_loss_curve(self.path, self.path.with_name("loss_curve.png"))


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Train (and validation) loss against step from metrics.jsonl; None if nothing to plot."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(png_path)
