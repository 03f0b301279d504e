"""Speed benchmark: measures this machine's peaks, then the model against them, in one run.

The machine is shared and noisy, so every figure is reported next to a peak measured in the same
run, as a ratio:
- the hardware (CPU capability or GPU name) and what ``--dtype auto`` picks on it, and why;
- matmul peak and copy bandwidth per measured dtype: fp32 always, bf16 too where the hardware runs
  it natively (an emulated bf16, e.g. on AVX2, is ~40x slower and not worth a row);
- a training step (forward + backward + AdamW) at ``minimind2-small``, batch 4 × 512, in each
  measured dtype: tokens/s, MFU = model FLOPs / that dtype's measured matmul peak, and the auto
  dtype's speed as a fraction of the fastest;
- greedy decoding at batch 1 and 8: ours (eager path, static step, compiled static step),
  upstream MiniMind (``--upstream DIR``) and transformers on the same weights and tokens:
  tokens/s, ratios, and the fraction of the bandwidth bound (bytes of weights + KV cache read per
  step / measured bandwidth);
- speculative decoding (``perf.speculative``): a trained pair on held-out prompts, ours against
  plain decoding and transformers' assisted generation, and the cost model at minimind2-small;
- the serving engine: 1 vs 16 concurrent clients (tokens/s, p50/p99 latency, first-token times,
  where the time went), the longest stall of running streams while a new 512-token prompt is
  prefilled, chunked and not, and one decode step's pieces at 1 and 16 rows;
- an MoE layer forward + backward (8 experts, top-2): grouped dispatch vs MiniMind's naive loop;
- an MoE model step (4 experts, top-1) vs the dense step with the same active parameters;
- the real loop and data pipeline (fit on packed real text) vs the bare step, and packed vs
  padded data in useful tokens/s.

Model FLOPs per token (PaLM appendix B): 6·N for the weights (N includes the tied head, which is
a real matmul) + 12·L·H·D·S for attention scores and values (S = context). Usage:
``python scripts/bench.py [--quick] [--only train,decode,moe] [--json out.json]
[--text_dir DIR_OF_TXT]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dataset import synthetic
from dataset.lm_dataset import load_files, make_collate
from model.config import MiniMindConfig
from model.generate import SamplingParams, generate_tokens
from model.model import MiniMindLM
from model.moe import MoEFeedForward, naive_experts_forward
from model.precision import DTYPES, resolve_precision
from model.tokenizer import Tokenizer
from perf.common import autocast, best_time
from perf.speculative import bench_speculative
from trainer.config import TrainConfig
from trainer.loop import fit
from trainer.losses import lm_loss


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_time(lambda: a @ b, repeat)


def copy_bandwidth(mbytes: int = 512, repeat: int = 5) -> float:
    src = torch.empty(mbytes * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_time(lambda: dst.copy_(src), repeat)  # read + write


def flops_per_token(cfg: MiniMindConfig, seq_len: int, active: bool = True) -> float:
    n = cfg.num_parameters(active=active)
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def train_step_fn(model: MiniMindLM, ids: torch.Tensor, dtype: torch.dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False, foreach=True)

    def step():
        with autocast(dtype):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_train(peaks: dict, auto: str, quick: bool) -> list[dict]:
    """The step in every measured dtype; the auto dtype's row says how close it is to the best."""
    rows = []
    cfg = MiniMindConfig.from_preset("minimind2-small")
    B, S = (2, 256) if quick else (4, 512)
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    for name, peak in peaks.items():
        torch.manual_seed(0)
        model = MiniMindLM(cfg).train()
        t = best_time(train_step_fn(model, ids, DTYPES[name]), repeat=2 if quick else 3)
        tok_s = B * S / t
        mfu = tok_s * flops_per_token(cfg, S) / peak
        rows.append(dict(bench="train step minimind2-small", variant=name + (" (auto)" if name == auto else ""),
                         batch=f"{B}x{S}", seconds=t, tokens_per_s=tok_s, mfu=mfu))
    best = max(r["tokens_per_s"] for r in rows)
    for r in rows:
        r["vs_fastest_dtype"] = r["tokens_per_s"] / best
    return rows


def load_upstream(upstream_dir: str, ours: MiniMindLM):
    """Upstream MiniMind's ``MiniMindForCausalLM`` from its source tree (``model/model_minimind.py``)
    with our weights (same parameter names), or None with the reason printed."""
    import importlib.util
    import inspect

    source = Path(upstream_dir) / "model" / "model_minimind.py"
    if not upstream_dir or not source.is_file():
        why = "not given" if not upstream_dir else f"{source} not found"
        print(f"  upstream MiniMind skipped: source tree {why} (--upstream DIR or "
              "MINIMIND_UPSTREAM=DIR)")
        return None
    spec = importlib.util.spec_from_file_location("model_minimind", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Upstream's config reads most fields from **kwargs with defaults of its own: pass every field
    # of ours that its default config has (or its signature names), so the shapes agree.
    accepted = set(inspect.signature(module.MiniMindConfig.__init__).parameters)
    accepted |= set(vars(module.MiniMindConfig()))
    fields = {k: v for k, v in ours.config.to_dict().items()
              if k in accepted and k not in ("rope_scaling", "architectures")}
    up = module.MiniMindForCausalLM(module.MiniMindConfig(**fields)).eval()
    missing, unexpected = up.load_state_dict(ours.state_dict(), strict=False)
    missing = [k for k in missing if "rotary" not in k and "freqs" not in k]
    if missing:
        print(f"  upstream MiniMind: {len(missing)} weights not mapped (e.g. {missing[0]}); "
              "its timing stands, its tokens will differ")
    return up.to(next(ours.parameters()).dtype)


@torch.inference_mode()
def upstream_greedy(model, prompts: torch.Tensor, new: int) -> torch.Tensor:
    """MiniMind's own decode: its forward with ``past_key_values`` (a cache grown by torch.cat)."""
    out = model(prompts, use_cache=True)
    past, tokens = out.past_key_values, []
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new - 1):
        tokens.append(nxt)
        out = model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens.append(nxt)
    return torch.cat(tokens, dim=1)


def load_transformers(ours: MiniMindLM, tmp: Path):
    """Our model exported with ``export_hf`` and loaded back by transformers, or None."""
    try:
        from transformers import AutoModelForCausalLM

        from convert.hf import export_hf
    except ImportError as e:
        print(f"  transformers skipped: {e}")
        return None
    export_hf(ours, tmp / "hf")
    return AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=next(ours.parameters()).dtype
                                                ).eval()


def decode_rates(variants: dict, batch: int, new: int, repeat: int) -> dict[str, float]:
    """Decode tokens/s per variant with the prefill taken out: (t(new) - t(1)) over new - 1
    steps, best of ``repeat`` rounds; each round times every variant once, so a change in the
    shared machine's load hits them all alike."""
    full = {name: float("inf") for name in variants}
    one = dict(full)
    for _ in range(repeat):
        for name, run in variants.items():
            for n, best in ((new, full), (1, one)):
                t0 = time.perf_counter()
                run(n)
                best[name] = min(best[name], time.perf_counter() - t0)
    return {name: batch * (new - 1) / max(full[name] - one[name], 1e-9) for name in variants}


def bench_decode(bandwidth: float, dtypes: list[str], quick: bool, upstream_dir: str = "",
                 compile: bool = True) -> list[dict]:
    """Greedy decode at minimind2-small, batch 1 and 8: ours on the eager path, the static step
    and the compiled static step; upstream MiniMind and transformers on the same weights. Every
    implementation must produce our eager path's tokens (checked, reported in ``same_tokens``)."""
    rows = []
    cfg = MiniMindConfig.from_preset("minimind2-small")
    prompt_len, new = 64, (16 if quick else 48)
    repeat = 2 if quick else 3
    for dtype in (DTYPES[d] for d in dtypes):
        torch.manual_seed(0)
        model = MiniMindLM(cfg).eval().to(dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            others = {"upstream MiniMind": load_upstream(upstream_dir, model),
                      "transformers": load_transformers(model, Path(tmp))}
        for batch in (1, 8):
            prompts = [[(17 * b + 3 * i) % 6000 + 10 for i in range(prompt_len)]
                       for b in range(batch)]
            ids = torch.tensor(prompts)

            def ours(fast: bool, compiled: bool):
                def run(n):
                    params = SamplingParams(max_new_tokens=n, stop_token_ids=())
                    steps = list(generate_tokens(model, prompts, params, fast=fast,
                                                 compile=compiled))
                    return torch.tensor(steps).T
                return run

            variants = {"ours eager": ours(False, False), "ours static step": ours(True, False)}
            if compile:
                variants["ours compiled static step"] = ours(True, True)
            if others["upstream MiniMind"] is not None:
                variants["upstream MiniMind"] = lambda n: upstream_greedy(
                    others["upstream MiniMind"], ids, n)
            if others["transformers"] is not None:
                hf = others["transformers"]
                variants["transformers"] = lambda n: hf.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                    min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
                )[:, prompt_len:]
            reference = variants["ours eager"](new)
            # Per step every weight is read once, and the cache up to the current length: the
            # mean context over the decode. Bytes / measured bandwidth = the fastest possible step.
            ctx = prompt_len + new / 2
            kv_bytes = (2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * cfg.head_dim
                        * ctx * torch.tensor([], dtype=dtype).element_size())
            bound_tok_s = batch * bandwidth / (weight_bytes + kv_bytes)
            same, setup = {}, {}
            for name, run in variants.items():
                t0 = time.perf_counter()
                same[name] = bool(torch.equal(run(new).cpu(), reference))  # warms up, compiles
                run(1)
                setup[name] = time.perf_counter() - t0
            measured = decode_rates(variants, batch, new, repeat)
            for name in variants:
                rows.append(dict(bench="greedy decode minimind2-small", variant=name,
                                 dtype=str(dtype)[6:], batch=batch,
                                 tokens_per_s=measured[name],
                                 bandwidth_bound_fraction=measured[name] / bound_tok_s,
                                 same_tokens=same[name], first_call_s=setup[name]))
            for r in rows[-len(variants):]:
                for ref in ("upstream MiniMind", "transformers"):
                    if ref in measured and r["variant"].startswith("ours"):
                        r[f"vs_{ref.split()[0]}"] = r["tokens_per_s"] / measured[ref]
            print(f"  batch {batch}: bound {bound_tok_s:.0f} tok/s "
                  f"({(weight_bytes + kv_bytes) / 1e6:.0f} MB per step at "
                  f"{bandwidth / 1e9:.1f} GB/s)")
    return rows


def step_breakdown(model: MiniMindLM, peak: float | None, rows=(1, 16), pos: int = 88,
                   repeat: int = 10) -> list[dict]:
    """One eager decode step over the engine's smallest cache (256 positions) at ``rows`` rows,
    each row at position ``pos`` (mid-way through the serving benchmark's 64 + 48 tokens), and
    its pieces timed alone: the matmuls (every projection and the head, on prepacked weights, in
    the step's order so the weights stream from memory as in the step), attention over the used
    prefix and over the whole cache, the rest (norms, RoPE, cache writes: the step less those),
    and choosing the tokens: greedy, and temperature 0.8 with top-p 0.9 and a repetition penalty
    on flat logits (N(0, 1): the nucleus is wider than the filter's candidates, the vocabulary is
    sorted) and on peaked ones (N(0, 5^2): it is not).
    ``matmul_at_peak_ms``: the matmul FLOPs at the matmul peak measured in the same run."""
    from model.fast_decode import PackedWeights, StaticDecoder, decode_step
    from model.generate import _choose_tokens

    cfg = model.config
    dec = StaticDecoder(model, max(rows), 256)
    packed = PackedWeights.for_model(model)
    layers = model.model.layers
    weights = sum(m.weight.numel() for layer in layers for m in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
        layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
    weights += model.lm_head.weight.numel()
    H, G, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out = []
    with torch.inference_mode():
        for B in rows:
            tokens, pos_B = torch.randint(0, cfg.vocab_size, (B,)), torch.full((B,), pos)
            k, v = dec.cache.k[:, :B], dec.cache.v[:, :B]
            step = best_time(lambda: dec.step(tokens, pos_B), repeat)
            whole = best_time(lambda: decode_step(model, k, v, tokens, pos_B, packed), repeat)
            h = torch.randn(B, 1, cfg.hidden_size)
            o_in = torch.randn(B, 1, H * Dh)
            f_in = torch.randn(B, 1, cfg.intermediate_size)

            def matmuls():
                for layer in layers:
                    a, m = layer.self_attn, layer.mlp
                    packed.project(h, a.q_proj, a.k_proj, a.v_proj)
                    packed.project(o_in, a.o_proj)
                    packed.project(h, m.gate_proj, m.up_proj)
                    packed.project(f_in, m.down_proj)
                packed.project(h, model.lm_head)

            q = torch.randn(B, H, 1, Dh)

            def attention(T):
                mask = (torch.arange(T) <= pos).view(1, 1, 1, T)
                for i in range(len(layers)):
                    torch.nn.functional.scaled_dot_product_attention(
                        q, k[i, :, :, :T], v[i, :, :, :T], attn_mask=mask, enable_gqa=H != G)

            mm = best_time(matmuls, repeat)
            att = best_time(lambda: attention(pos + 1), repeat)
            att_all = best_time(lambda: attention(dec.max_len), repeat)
            logits = torch.randn(B, cfg.vocab_size)
            seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool)
            greedy = [SamplingParams()] * B
            sampled = [SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.1)] * B
            gens = [torch.Generator().manual_seed(b) for b in range(B)]
            row = dict(bench="serving: one decode step, fp32", variant=f"{B} rows",
                       step_ms=1e3 * step, whole_cache_step_ms=1e3 * whole,
                       matmul_ms=1e3 * mm, attention_ms=1e3 * att,
                       whole_cache_attention_ms=1e3 * att_all,
                       rest_ms=1e3 * (step - mm - att),
                       choose_greedy_ms=1e3 * best_time(
                           lambda: _choose_tokens(logits, greedy, seen, [None] * B), repeat),
                       choose_top_p_flat_ms=1e3 * best_time(
                           lambda: _choose_tokens(logits, sampled, seen, gens), repeat),
                       choose_top_p_peaked_ms=1e3 * best_time(
                           lambda: _choose_tokens(5 * logits, sampled, seen, gens), repeat))
            if peak:
                row["matmul_at_peak_ms"] = 1e3 * 2 * weights * B / peak
            out.append(row)
    return out


def bench_pack_crossover(quick: bool) -> list[dict]:
    """One projection at decode sizes, ``F.linear`` against oneDNN's prepacked kernel
    (``PackedWeights``), at 1 and 16 rows: where packing starts to pay (``PACK_MIN_ELEMENTS``)."""
    from model.fast_decode import PACK_MIN_ELEMENTS

    pack = torch.ops.mkldnn._reorder_linear_weight
    rows_out = []
    for h in ((128, 512) if quick else (128, 256, 384, 512, 768)):
        for out in (h, 3 * h):
            w = torch.randn(out, h)
            packed = pack(w, 1)
            for rows in (1, 16):
                x = torch.randn(1, rows, h)
                plain = best_time(lambda: [F.linear(x, w) for _ in range(100)], 5) / 100
                onednn = best_time(lambda: [torch.ops.mkldnn._linear_pointwise(
                    x, packed, None, "none", [], "") for _ in range(100)], 5) / 100
                rows_out.append(dict(bench="decode projection, plain vs prepacked",
                                     variant=f"{h} -> {out}, {rows} rows",
                                     weight_mb=w.numel() * 4 / 1e6, linear_us=plain * 1e6,
                                     packed_us=onednn * 1e6, packed_vs_linear=onednn / plain,
                                     packs=w.numel() >= PACK_MIN_ELEMENTS))
    return rows_out


def bench_serving(quick: bool, compile: bool = False, peak: float | None = None) -> list[dict]:
    """The engine (no HTTP) at minimind2-small: 1 client after another vs 16 at once, latency
    percentiles, where each round's time went (the engine's counters: prompt forwards, decode
    steps, choosing tokens, host work), and the longest gap between two tokens of running
    streams while a new 512-token prompt is prefilled, chunked (128) and in one piece; then one
    decode step's pieces at 1 and 16 rows (``step_breakdown``)."""
    from serving.engine import Engine, Finished

    class NullTokenizer:
        def decode(self, ids, skip_special_tokens=False):
            return "x" * len(ids)

    torch.manual_seed(0)
    model = MiniMindLM(MiniMindConfig.from_preset("minimind2-small")).eval()
    new, prompt_len = (16, 32) if quick else (48, 64)
    rows = []

    def submit(engine, prompt, n):
        done, times = threading.Event(), []

        def sink(ev):
            times.append(time.perf_counter())
            if isinstance(ev, Finished):
                done.set()
        engine.submit(f"r{len(prompt)}-{time.perf_counter()}", prompt,
                      SamplingParams(max_new_tokens=n, stop_token_ids=()), sink)
        return done, times

    def prompt(i, n=prompt_len):
        return [(31 * i + 7 * j) % 6000 + 10 for j in range(n)]

    engine = Engine(model, NullTokenizer(), max_batch_size=16, compile=compile).start()
    try:
        submit(engine, prompt(0), 4)[0].wait()  # warm-up (and the compile, if on)
        results = {}
        for clients in (1, 16):
            before = engine.stats_snapshot()
            latencies, first, t0 = [], [], time.perf_counter()
            rounds = 2 if clients == 1 else 1
            for _ in range(rounds):
                start = time.perf_counter()
                jobs = [submit(engine, prompt(i), new) for i in range(clients)]
                for done, times in jobs:
                    done.wait()
                    latencies.append(times[-1] - start)
                    first.append(times[0] - start)
            wall = time.perf_counter() - t0
            after = engine.stats_snapshot()
            spent = {k: after[k] - before[k] for k in ("prefill_s", "step_s", "sample_s",
                                                        "host_s", "batches")}
            tok_s = rounds * clients * new / wall
            lat = sorted(latencies)
            results[clients] = tok_s
            rows.append(dict(bench="serving engine minimind2-small", variant=f"{clients} clients",
                             tokens_per_s=tok_s, p50_latency_s=lat[len(lat) // 2],
                             p99_latency_s=lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                             p50_first_token_s=sorted(first)[len(first) // 2],
                             max_first_token_s=max(first), wall_s=wall, steps=spent["batches"],
                             ms_per_step=1e3 * spent["step_s"] / max(spent["batches"], 1),
                             prefill_s=spent["prefill_s"], steps_s=spent["step_s"],
                             sample_s=spent["sample_s"], host_s=spent["host_s"],
                             other_s=wall - sum(spent[k] for k in ("prefill_s", "step_s",
                                                                   "sample_s", "host_s"))))
        rows[-1]["vs_1_client"] = results[16] / results[1]
        for chunk in (128, 100_000):
            engine.prefill_chunk = chunk
            running = [submit(engine, prompt(100 + i), 3 * new) for i in range(8)]
            while min(len(t) for _, t in running) < 4:
                time.sleep(0.001)
            t_new = time.perf_counter()
            newcomer = submit(engine, prompt(999, 512), 4)
            newcomer[0].wait()
            for done, _ in running:
                done.wait()
            gaps = [b - a for _, t in running for a, b in zip(t, t[1:]) if b > t_new]
            base = sorted(b - a for _, t in running for a, b in zip(t, t[1:]) if b < t_new)
            rows.append(dict(bench="serving: new 512-token prompt while 8 streams decode",
                             variant=f"prefill chunk {chunk}" if chunk < 512 else "unchunked",
                             median_step_s=base[len(base) // 2], longest_stall_s=max(gaps),
                             first_token_of_newcomer_s=newcomer[1][0] - t_new))
    finally:
        engine.shutdown()
    return rows + step_breakdown(model, peak, repeat=5 if quick else 10)


def bench_moe_layer(dtypes: list[str], quick: bool) -> list[dict]:
    """Grouped dispatch vs the per-expert masking loop at a training-sized batch (compute-bound:
    both run the same matmuls) and at a decode-sized one (dispatch overhead dominates)."""
    cfg = MiniMindConfig.from_preset("minimind2-small", use_moe=True, num_experts=8,
                                     num_experts_per_tok=2, moe_intermediate_size=1408)
    torch.manual_seed(0)
    layer = MoEFeedForward(cfg)
    rows = []
    for T in ((1024, 16) if quick else (2048, 16)):
        x = torch.randn(T, cfg.hidden_size, requires_grad=True)
        for name in dtypes:
            def run(naive: bool):
                with autocast(DTYPES[name]):
                    _, ids, w = layer.route(x)
                    y = (naive_experts_forward(layer.experts, x, ids, w) if naive
                         else layer.experts(x, ids, w))
                y.float().sum().backward()

            grouped = best_time(lambda: run(False), repeat=5 if T < 100 else 3)
            naive = best_time(lambda: run(True), repeat=5 if T < 100 else 3)
            rows.append(dict(bench="MoE layer fwd+bwd E=8 top-2 D=512 I=1408", variant=name,
                             tokens=T, grouped_tokens_per_s=T / grouped,
                             naive_tokens_per_s=T / naive, speedup=naive / grouped))
    return rows


def bench_moe_model(auto: str, quick: bool) -> list[dict]:
    """Top-1 MoE vs the dense model with the same active parameters, in the auto dtype. The full
    step includes AdamW over all parameters (3× more for 4 experts), so fwd+bwd alone is
    reported too."""
    dense = MiniMindConfig.from_preset("minimind2-small")
    moe = MiniMindConfig.from_preset("minimind2-small", use_moe=True, num_experts=4,
                                     num_experts_per_tok=1, n_shared_experts=0,
                                     moe_intermediate_size=dense.intermediate_size,
                                     aux_loss_coef=0.01, aux_loss_kind="token")
    B, S = (2, 256) if quick else (4, 512)
    ids = torch.randint(0, dense.vocab_size, (B, S))
    rows, step_t, fb_t = [], {}, {}
    for name, cfg in (("dense", dense), ("moe 4 experts top-1", moe)):
        torch.manual_seed(0)
        model = MiniMindLM(cfg).train()

        def fwd_bwd():
            with autocast(DTYPES[auto]):
                loss = model(ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        fb_t[name] = best_time(fwd_bwd, repeat=2 if quick else 3)
        step_t[name] = best_time(train_step_fn(model, ids, DTYPES[auto]), repeat=2 if quick else 3)
        rows.append(dict(bench=f"model step {auto} (equal active params)", variant=name,
                         active_params_m=cfg.num_parameters(active=True) / 1e6,
                         total_params_m=cfg.num_parameters() / 1e6, step_s=step_t[name],
                         fwd_bwd_s=fb_t[name], tokens_per_s=B * S / step_t[name]))
    key = "moe 4 experts top-1"
    rows[-1]["moe_vs_dense_step"] = step_t["dense"] / step_t[key]
    rows[-1]["moe_vs_dense_fwd_bwd"] = fb_t["dense"] / fb_t[key]
    return rows


def _paragraph_corpus(out: Path, max_chars: int, text_dir: str) -> Path:
    """Real text as {"text"} JSONL, one paragraph a record: the .txt files of ``text_dir`` when
    given (e.g. Project Gutenberg books), else the project's generated text."""
    texts: list[str] = []
    if text_dir:
        if not Path(text_dir).is_dir():
            raise FileNotFoundError(f"--text_dir {text_dir}: no such folder")
        for f in sorted(Path(text_dir).glob("*.txt")):
            texts += [" ".join(p.split()) for p in f.read_text(errors="replace").split("\n\n")]
            if sum(map(len, texts)) > max_chars:
                break
        source = text_dir
    else:
        texts, source = synthetic.pretrain_texts(max_chars // 200, seed=0), "synthetic"
    synthetic.write_jsonl([t for t in texts if t.strip()], out)
    print(f"  loop bench corpus: {source}, {out.stat().st_size / 1e6:.1f} MB")
    return out


def bench_loop(auto: str, text_dir: str, quick: bool) -> list[dict]:
    """The real loop and data pipeline (fit + packed dataset + collate + logging) against the bare
    step on the same shapes, and packed vs one-paragraph-per-row padded data: useful (non-pad)
    tokens per second."""
    preset, B, S, steps = ("demo", 8, 256, 6) if quick else ("minimind2-small", 4, 512, 8)
    tokenizer = Tokenizer.from_dir()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = _paragraph_corpus(tmp / "text.jsonl", 2_000_000 if quick else 6_000_000, text_dir)
        cfg_model = MiniMindConfig.from_preset(preset)
        torch.manual_seed(0)
        bare_model = MiniMindLM(cfg_model).train()
        ids = torch.randint(0, cfg_model.vocab_size, (B, S))
        bare = best_time(train_step_fn(bare_model, ids, DTYPES[auto]), repeat=3)
        rows.append(dict(bench=f"pretrain {preset} {B}x{S} {auto}", variant="bare step",
                         useful_tokens_per_s=B * S / bare))
        for mode in ("packed", "padded"):
            data = load_files("pretrain", [corpus], tokenizer, S, mode=mode,
                              cache_dir=tmp / "cache")
            real = sum(int(data[i]["input_ids"].numel()) for i in range(min(len(data), 2000)))
            real_per_row = real / min(len(data), 2000)
            cfg = TrainConfig(out_dir=str(tmp / mode), max_steps=steps + 2, batch_size=B,
                              seq_len=S, lr=1e-4, dtype=auto, log_every=steps, progress=False,
                              plot=False, seed=0)
            torch.manual_seed(0)
            model = MiniMindLM(cfg_model)
            fit(model, data, lm_loss, cfg, collate_fn=make_collate(tokenizer.pad_id))
            last = [json.loads(x) for x in open(tmp / mode / "metrics.jsonl") if '"step_time_s"' in x][-1]
            step_s = last["step_time_s"]  # mean over the last log_every steps, set-up excluded
            rows.append(dict(bench=f"pretrain {preset} {B}x{S} {auto}", variant=f"fit, {mode} data",
                             useful_tokens_per_s=B * real_per_row / step_s,
                             loop_overhead_vs_bare=step_s / bare - 1 if mode == "packed" else None,
                             mean_row_tokens=real_per_row))
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        cells = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                 if v is not None]
        print("  " + "  ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    ap.add_argument("--only", default="train,decode,pack,spec,serve,moe,moe_model,loop",
                    help="comma list of: train, decode, pack, spec, serve, moe, moe_model, loop")
    ap.add_argument("--upstream", default=os.environ.get("MINIMIND_UPSTREAM", ""),
                    help="upstream MiniMind source tree (has model/model_minimind.py) to compare "
                         "against; default $MINIMIND_UPSTREAM; skipped when absent")
    ap.add_argument("--dtypes", default="", help="measure only these of the native dtypes "
                    "(comma list, e.g. fp32)")
    ap.add_argument("--no_compile", action="store_true",
                    help="skip the compiled decode step (its compile takes ~1 min per shape)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--json", default="", help="also write all figures to this JSON file")
    ap.add_argument("--text_dir", default="", help="folder of .txt files for the loop bench's real "
                    "text (e.g. ../shared/data/pretrain_text/gutenberg_en); default: generated text")
    g = ap.add_argument_group("spec: speculative decoding (perf/speculative.py)")
    g.add_argument("--spec_target", default="", help="trained model folder (default: the "
                   "quickstart's out/quickstart/sft/final)")
    g.add_argument("--spec_draft", default="", help="its draft (default: out/quickstart/distill/"
                   "final, the distilled student)")
    g.add_argument("--spec_prompts", default="", help="held-out questions, JSONL with 'question' "
                   "(default: out/quickstart/data/test.jsonl)")
    g.add_argument("--spec_k", type=int, default=6, help="most draft tokens per round")
    g.add_argument("--spec_lookup", type=int, default=4, help="prompt-lookup tokens per round")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    auto = resolve_precision("auto", "cpu")
    # bf16 rows only where bf16 is native: emulated, one 2048^3 matmul alone takes seconds.
    dtypes = ["fp32", "bf16"] if auto.name == "bf16" else ["fp32"]
    if args.dtypes:
        dtypes = [d for d in args.dtypes.split(",") if d in dtypes]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {auto.describe()}; measuring {', '.join(dtypes)}")
    peaks = {d: matmul_peak(DTYPES[d]) for d in dtypes}
    bandwidth = copy_bandwidth()
    print("peaks: " + ", ".join(f"matmul {d} {v / 1e9:.0f} GFLOP/s" for d, v in peaks.items())
          + f", copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    results = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "auto_dtype": auto.name,
               "auto_reason": auto.reason, "peaks_gflops": {k: v / 1e9 for k, v in peaks.items()},
               "bandwidth_gbs": bandwidth / 1e9}
    sections = [("train", lambda: bench_train(peaks, auto.name, args.quick)),
                ("decode", lambda: bench_decode(bandwidth, dtypes, args.quick, args.upstream,
                                                not args.no_compile)),
                ("pack", lambda: bench_pack_crossover(args.quick)),
                ("spec", lambda: bench_speculative(args)),
                ("serve", lambda: bench_serving(args.quick, peak=peaks.get("fp32"))),
                ("moe", lambda: bench_moe_layer(dtypes, args.quick)),
                ("moe_model", lambda: bench_moe_model(auto.name, args.quick)),
                ("loop", lambda: bench_loop(auto.name, args.text_dir, args.quick))]
    for name, fn in sections:
        if name in only:
            print(f"[{name}]")
            rows = fn()
            print_rows(rows)
            results[name] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
