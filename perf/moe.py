"""MoE expert backends, one layer: tokens/s and resident memory, training or inference.

Scope: the routed experts of one ``MoEFeedForward`` layer with LoRA (rank 8) on every expert
projection and frozen base weights — the LoRA-SFT setting kt-kernel is built for — run by:
``kt`` (kt-kernel, ``kt_mode`` auto: AMXBF16_SFT where the CPU variant has it, else its
forward-only bf16 kernel), ``kt-inf`` (the forward-only kernel, AMXBF16_MOE / AVX2BF16_MOE),
``kt-mxfp4`` (MXFP4_SFT: 4-bit base + LoRA), ``cpu`` (torch grouped dispatch in CPU memory),
``torch`` (grouped dispatch, the default) and ``naive`` (MiniMind's per-expert masking loop).
``--mode train`` times the experts call plus ``autograd.grad`` for the input, the routing weights
and every LoRA tensor; ``--mode inference`` times a no-grad forward of T tokens (prefill) and of
one token (decode, ms). ``KT_KERNEL_CPU_VARIANT=avx2`` runs kt's AVX2 build on a bigger CPU.

Each (shape, backend) runs in its own subprocess so resident memory (RSS) belongs to that backend
alone and a kt-kernel crash cannot take the table down. RSS is reported after the timed steps,
and as Δ over the same process before the layer was built. Note that ``kt`` keeps the fp32
expert weights in torch (state dict, merge, fallback) beside the kernel's bf16 copy.

Usage: ``python scripts/bench_moe.py [--quick] [--mode train|inference] [--backends kt,cpu,...]
[--json out]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPES = {
    # name: (experts E, top-k K, hidden D, expert FFN I, tokens T)
    "small E8 top2 D256 I704": (8, 2, 256, 704, 256),
    "large E64 top6 D2048 I1408": (64, 6, 2048, 1408, 256),
}
BACKENDS = {"train": ("kt", "kt-mxfp4", "cpu", "torch", "naive"),
            "inference": ("kt", "kt-inf", "kt-mxfp4", "cpu", "torch", "naive")}
KT_VARIANTS = {"kt": {}, "kt-inf": {"kt_mode": "inference"}, "kt-mxfp4": {"kt_backend": "MXFP4"}}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(shape: str, backend: str, repeat: int, threads: int, mode: str = "train") -> dict:
    """Builds one layer on one backend, times it, returns a row (runs in a subprocess)."""
    import torch

    from model.config import MiniMindConfig
    from model.lora import apply_lora
    from model.moe import MoEFeedForward, naive_experts_forward
    from offload.experts import offload_experts

    torch.set_num_threads(threads)
    if backend.startswith("kt"):
        import kt_kernel  # noqa: F401  (imported before the baseline: its ~100 MB is not the layer)
    E, K, D, I, T = SHAPES[shape]
    base_rss = rss_mib()
    torch.manual_seed(0)
    cfg = MiniMindConfig.from_preset("tiny-moe", hidden_size=D, num_attention_heads=8,
                                     num_experts=E, num_experts_per_tok=K,
                                     moe_intermediate_size=I, n_shared_experts=0)
    layer = MoEFeedForward(cfg)  # nn.Linear's default init: U(±1/√fan_in), one pass over 2 GB
    apply_lora(layer, "gate_proj,up_proj,down_proj", rank=8, alpha=16)
    if backend == "cpu":
        offload_experts(layer, "cpu")
    elif backend.startswith("kt"):
        offload_experts(layer, "kt", kt_num_threads=threads, kt_chunk_tokens=T,
                        **KT_VARIANTS[backend])
    x = torch.randn(T, D)
    _, ids, w = layer.route(x)
    w = w.detach()
    grad_y = torch.randn(T, D)
    lora = [p for n, p in layer.named_parameters() if "lora" in n]

    def experts(x_, ids_, w_):
        if backend == "naive":
            return naive_experts_forward(layer.experts, x_, ids_, w_)
        return layer.experts(x_, ids_, w_)

    def step() -> None:
        if mode == "inference":
            with torch.no_grad():
                experts(x, ids, w)
            return
        x_, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.autograd.grad(experts(x_, ids, w_), [x_, w_, *lora], grad_y)

    from perf.common import best_time

    step()  # warm-up (and kt's kernel build)
    best = best_time(step, repeat, warmup=0)
    row = dict(shape=shape, backend=backend, mode=mode, tokens=T, seconds=best,
               tokens_per_s=T / best)
    if mode == "inference":
        def decode() -> None:
            with torch.no_grad():
                experts(x[:1], ids[:1], w[:1])
        row["decode_ms"] = 1e3 * best_time(decode, 5 * repeat, warmup=0)
    return dict(row, rss_mib=rss_mib(), layer_rss_mib=rss_mib() - base_rss)


def run_one(shape: str, backend: str, repeat: int, threads: int, mode: str) -> dict:
    cmd = [sys.executable, "-m", "perf.moe", "--worker", shape, backend,
           "--repeat", str(repeat), "--threads", str(threads), "--mode", mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_ROW ")]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return dict(shape=shape, backend=backend, error=f"rc={proc.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1].removeprefix("BENCH_ROW "))


def print_table(rows: list[dict]) -> None:
    inference = rows and rows[0].get("mode") == "inference"
    print(f"{'shape':28s} {'backend':8s} {'fwd s' if inference else 'fwd+bwd s':>9s} "
          f"{'tok/s':>8s} {'vs torch':>8s} {'RSS MiB':>8s} {'ΔRSS MiB':>9s}"
          + (f" {'decode ms':>9s}" if inference else ""))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape]
        ref = next((r for r in group if r["backend"] == "torch" and "error" not in r), None)
        for r in group:
            if "error" in r:
                print(f"{shape:28s} {r['backend']:8s} FAILED {r['error']}")
                continue
            ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
            print(f"{shape:28s} {r['backend']:8s} {r['seconds']:9.3f} {r['tokens_per_s']:8.0f} "
                  f"{ratio:>8s} {r['rss_mib']:8.0f} {r['layer_rss_mib']:9.0f}"
                  + (f" {r['decode_ms']:9.2f}" if "decode_ms" in r else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shape only")
    ap.add_argument("--mode", choices=tuple(BACKENDS), default="train",
                    help="train: forward + backward; inference: no-grad prefill and decode")
    ap.add_argument("--backends", help="comma-separated (default: every backend of --mode)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeat", type=int, default=0, 
                    help="timed steps after one warm-up (0 = 5 small / 1 large)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--worker", nargs=2, metavar=("SHAPE", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        row = worker(*args.worker, repeat=args.repeat or 3, threads=args.threads, mode=args.mode)
        print("BENCH_ROW " + json.dumps(row), flush=True)
        return
    rows = []
    shapes = list(SHAPES)[:1] if args.quick else list(SHAPES)
    for shape in shapes:
        repeat = args.repeat or (5 if shape.startswith("small") else 1)
        for backend in (args.backends.split(",") if args.backends else BACKENDS[args.mode]):
            rows.append(run_one(shape, backend, repeat, args.threads, args.mode))
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":  # the --worker subprocess runs this module
    from common.errors import run_cli
    run_cli(main)
