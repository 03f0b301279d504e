"""MoE expert backends, one layer: forward + backward tokens/s and resident memory.

Scope: the routed experts of one ``MoEFeedForward`` layer with LoRA (rank 8) on every expert
projection and frozen base weights — the LoRA-SFT setting kt-kernel is built for — run by:
``kt`` (kt-kernel AMXBF16_SFT, bf16), ``cpu`` (torch grouped dispatch in CPU memory), ``torch``
(grouped dispatch, the default) and ``naive`` (MiniMind's per-expert masking loop). Timed: the
experts call plus ``autograd.grad`` for the input, the routing weights and every LoRA tensor.

Each (shape, backend) runs in its own subprocess so resident memory (RSS) belongs to that backend
alone and a kt-kernel crash cannot take the table down. RSS is reported after the timed steps,
and as Δ over the same process before the layer was built. Note that ``kt`` keeps the fp32
expert weights in torch (state dict, merge, fallback) beside the kernel's bf16 copy.

Usage: ``python scripts/bench_moe.py [--quick] [--backends kt,cpu,torch,naive] [--json out]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = {
    # name: (experts E, top-k K, hidden D, expert FFN I, tokens T)
    "small E8 top2 D256 I704": (8, 2, 256, 704, 256),
    "large E64 top6 D2048 I1408": (64, 6, 2048, 1408, 256),
}
BACKENDS = ("kt", "cpu", "torch", "naive")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(shape: str, backend: str, repeat: int, threads: int) -> dict:
    """Builds one layer on one backend, times it, returns a row (runs in a subprocess)."""
    import torch

    from model.config import MiniMindConfig
    from model.lora import apply_lora
    from model.moe import MoEFeedForward, naive_experts_forward
    from model.offload import offload_experts

    torch.set_num_threads(threads)
    if backend == "kt":
        import kt_kernel  # noqa: F401  (imported before the baseline: its ~100 MB is not the layer)
    E, K, D, I, T = SHAPES[shape]
    base_rss = rss_mib()
    torch.manual_seed(0)
    cfg = MiniMindConfig.from_preset("tiny-moe", hidden_size=D, num_attention_heads=8,
                                     num_experts=E, num_experts_per_tok=K,
                                     moe_intermediate_size=I, n_shared_experts=0)
    layer = MoEFeedForward(cfg)  # nn.Linear's default init: U(±1/√fan_in), one pass over 2 GB
    apply_lora(layer, "gate_proj,up_proj,down_proj", rank=8, alpha=16)
    if backend in ("kt", "cpu"):
        offload_experts(layer, backend, **({"kt_num_threads": threads,
                                            "kt_chunk_tokens": T} if backend == "kt" else {}))
    x = torch.randn(T, D)
    _, ids, w = layer.route(x)
    w = w.detach()
    grad_y = torch.randn(T, D)
    lora = [p for n, p in layer.named_parameters() if "lora" in n]

    def step() -> None:
        x_, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
        if backend == "naive":
            y = naive_experts_forward(layer.experts, x_, ids, w_)
        else:
            y = layer.experts(x_, ids, w_)
        torch.autograd.grad(y, [x_, w_, *lora], grad_y)

    step()  # warm-up (and kt's kernel build)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return dict(shape=shape, backend=backend, tokens=T, seconds=best, tokens_per_s=T / best,
                rss_mib=rss_mib(), layer_rss_mib=rss_mib() - base_rss)


def run_one(shape: str, backend: str, repeat: int, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", shape, backend,
           "--repeat", str(repeat), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_ROW ")]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return dict(shape=shape, backend=backend, error=f"rc={proc.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1].removeprefix("BENCH_ROW "))


def print_table(rows: list[dict]) -> None:
    print(f"{'shape':28s} {'backend':8s} {'fwd+bwd s':>9s} {'tok/s':>8s} {'vs torch':>8s} "
          f"{'RSS MiB':>8s} {'ΔRSS MiB':>9s}")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape]
        ref = next((r for r in group if r["backend"] == "torch" and "error" not in r), None)
        for r in group:
            if "error" in r:
                print(f"{shape:28s} {r['backend']:8s} FAILED {r['error']}")
                continue
            ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
            print(f"{shape:28s} {r['backend']:8s} {r['seconds']:9.3f} {r['tokens_per_s']:8.0f} "
                  f"{ratio:>8s} {r['rss_mib']:8.0f} {r['layer_rss_mib']:9.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shape only")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeat", type=int, default=0, 
                    help="timed steps after one warm-up (0 = 5 small / 1 large)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--worker", nargs=2, metavar=("SHAPE", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        row = worker(*args.worker, repeat=args.repeat or 3, threads=args.threads)
        print("BENCH_ROW " + json.dumps(row), flush=True)
        return
    rows = []
    shapes = list(SHAPES)[:1] if args.quick else list(SHAPES)
    for shape in shapes:
        repeat = args.repeat or (5 if shape.startswith("small") else 1)
        for backend in args.backends.split(","):
            rows.append(run_one(shape, backend, repeat, args.threads))
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    from model.errors import run_cli
    run_cli(main)
