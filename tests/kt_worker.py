"""Runs one kt-kernel check in its own process and prints ``KT_RESULT <json>`` as its last line.

kt-kernel can kill the whole process on a bad shape (SIGSEGV, no Python error), so
``tests/test_offload.py`` runs each case here in a subprocess: a native crash fails one test, not
the run. The C++ side prints its own chatter to stdout, hence the marker. Usage:
``python tests/kt_worker.py CASE`` with CASE one of ``CASES``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import tempfile

import torch

from model.config import MiniMindConfig
from model.lora import apply_lora, load_adapter, lora_parameters, merge_lora, merged_model, save_adapter
from model.model import MiniMindLM
from model.moe import MoEFeedForward
from offload.experts import (KTExperts, kt_variant, mxfp4_dequantize, mxfp4_quantize,
                             offload_experts, refresh_kt_lora, register_kt_refresh)

PROJS = ("gate_proj", "up_proj", "down_proj")


def overfit_adapters(model, ids: torch.Tensor, steps: int) -> list[float]:
    """AdamW on the adapters for `steps` steps on one batch; kt's kernels are refreshed after each
    step. Returns the losses."""
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2, weight_decay=0.0)
    register_kt_refresh(opt, model)
    opt.zero_grad(set_to_none=True)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp32 (b is the reference)."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make_layer(E: int = 8, K: int = 2, H: int = 64, I: int = 128, r: int = 8,
               alpha: float = 16.0, targets: str = "gate_proj,up_proj,down_proj") -> MoEFeedForward:
    """An MoE layer with LoRA on every expert projection and a non-zero B (else grad A = 0)."""
    cfg = MiniMindConfig.from_preset("tiny-moe", hidden_size=H, num_experts=E,
                                     num_experts_per_tok=K, moe_intermediate_size=I,
                                     n_shared_experts=0)
    layer = MoEFeedForward(cfg)
    for name, p in layer.named_parameters():
        torch.nn.init.normal_(p, 0, 1 / math.sqrt(p.shape[-1]))
    apply_lora(layer, targets, rank=r, alpha=alpha)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3 / math.sqrt(r))
    return layer


def layer_grads(layer: MoEFeedForward, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                grad_y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and gradients (x, routing weights, each LoRA tensor stacked over experts)."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = layer.experts(x, ids, w)
    names = [(p, ab) for p in PROJS for ab in ("lora_A", "lora_B")]
    params = [getattr(getattr(e, p), ab) for p, ab in names for e in layer.experts]
    grads = torch.autograd.grad(y, [x, w, *params], grad_y)
    out = {"y": y.detach(), "x": grads[0], "w": grads[1]}
    E = len(layer.experts)
    for i, (p, ab) in enumerate(names):
        out[f"{p}.{ab}"] = torch.stack(grads[2 + i * E: 2 + (i + 1) * E])
    return out


def compare(got: dict, ref: dict) -> dict[str, float]:
    return {k: rel(got[k], ref[k]) for k in ref}


def routed_inputs(layer: MoEFeedForward, T: int) -> tuple[torch.Tensor, ...]:
    x = torch.randn(T, layer.config.hidden_size)
    _, ids, w = layer.route(x)
    return x, ids, w.detach(), torch.randn(T, layer.config.hidden_size)


def case_layer_precision(**kt) -> dict:
    torch.manual_seed(0)
    layer = make_layer()
    x, ids, w, gy = routed_inputs(layer, 64)
    ref = layer_grads(layer, x, ids, w, gy)  # fp32 torch backend
    kt_layer = offload_experts(copy.deepcopy(layer), "kt", kt_num_threads=2, **kt)
    assert isinstance(kt_layer.experts, KTExperts)
    return compare(layer_grads(kt_layer, x, ids, w, gy), ref)


def case_chunking() -> dict:
    """100 tokens through a 32-token kernel: 4 chunks, backward recomputes each forward."""
    torch.manual_seed(0)
    layer = make_layer()
    x, ids, w, gy = routed_inputs(layer, 100)
    ref = layer_grads(layer, x, ids, w, gy)
    kt_layer = offload_experts(copy.deepcopy(layer), "kt", kt_num_threads=2, kt_chunk_tokens=32)
    return compare(layer_grads(kt_layer, x, ids, w, gy), ref)


def case_gpu_experts() -> dict:
    """The first 3 of 8 experts stay with torch (they would be on the accelerator)."""
    return case_layer_precision(kt_num_gpu_experts=3)


def case_two_forwards() -> dict:
    """Forward A, forward B, backward B, backward A: A's kernel cache is gone and is recomputed."""
    torch.manual_seed(0)
    layer = make_layer()
    xa, ids_a, wa, gya = routed_inputs(layer, 48)
    xb, ids_b, wb, gyb = routed_inputs(layer, 40)
    kt_layer = offload_experts(copy.deepcopy(layer), "kt", kt_num_threads=2)
    params_kt = [p for n, p in kt_layer.named_parameters() if "lora" in n]
    params_ref = [p for n, p in layer.named_parameters() if "lora" in n]
    outs = {}
    for tag, lay, params in (("kt", kt_layer, params_kt), ("ref", layer, params_ref)):
        xa_, xb_ = xa.clone().requires_grad_(), xb.clone().requires_grad_()
        ya = lay.experts(xa_, ids_a, wa)
        yb = lay.experts(xb_, ids_b, wb)
        (yb * gyb).sum().backward()
        (ya * gya).sum().backward()
        outs[tag] = {"x_a": xa_.grad, "x_b": xb_.grad,
                     "lora": torch.cat([p.grad.flatten() for p in params])}
    return compare(outs["kt"], outs["ref"])


def case_refresh() -> dict:
    """The kernel sees adapter updates: by version check (optimizer), by refresh_kt_lora (.data)."""
    torch.manual_seed(0)
    layer = make_layer()
    x, ids, w, gy = routed_inputs(layer, 32)
    kt_layer = offload_experts(copy.deepcopy(layer), "kt", kt_num_threads=2)
    kt_layer.experts(x, ids, w)  # builds the kernel
    out = {}
    with torch.no_grad():  # an in-place step, like optimizer.step(): bumps version counters
        for p in lora_parameters(kt_layer):
            p.add_(0.2 * torch.randn_like(p))
    ref = copy.deepcopy(kt_layer)
    offload_experts(ref, "torch")
    out["after_step_no_refresh"] = rel(kt_layer.experts(x, ids, w), ref.experts(x, ids, w))
    for p in lora_parameters(kt_layer):  # .data edits bypass version counters
        p.data.add_(0.2 * torch.randn_like(p))
    ref = copy.deepcopy(kt_layer)
    offload_experts(ref, "torch")
    y_ref = ref.experts(x, ids, w)
    out["data_edit_stale"] = rel(kt_layer.experts(x, ids, w), y_ref)
    out["refreshed_layers"] = refresh_kt_lora(kt_layer)
    out["data_edit_refreshed"] = rel(kt_layer.experts(x, ids, w), y_ref)
    return out


def case_skiplora() -> dict:
    """No expert LoRA: the kernel runs frozen experts (*_SkipLoRA); x and w still get gradients."""
    torch.manual_seed(0)
    layer = make_layer()
    plain = MoEFeedForward(layer.config)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if "lora" not in k})
    x, ids, w, gy = routed_inputs(plain, 64)

    def run(lay):
        x_, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = lay.experts(x_, ids, w_)
        gx, gw = torch.autograd.grad(y, [x_, w_], gy)
        return {"y": y.detach(), "x": gx, "w": gw}

    ref = run(plain)
    kt_layer = offload_experts(copy.deepcopy(plain), "kt", kt_num_threads=2)
    return compare(run(kt_layer), ref)


def case_int4() -> dict:
    """AMXINT4 quantises the experts on load: a loose sanity bound only (H = I = 128)."""
    torch.manual_seed(0)
    layer = make_layer(H=128, I=128)
    x, ids, w, gy = routed_inputs(layer, 64)
    ref = layer_grads(layer, x, ids, w, gy)
    kt_layer = offload_experts(copy.deepcopy(layer), "kt", kt_num_threads=2,
                               kt_backend="AMXINT4")
    return compare(layer_grads(kt_layer, x, ids, w, gy), ref)


def case_train() -> dict:
    """tiny-moe + LoRA on everything, experts in kt: grads match torch, loss falls, adapter
    round-trips onto a torch-backend model (and merges) with the same logits."""
    torch.manual_seed(0)
    cfg = MiniMindConfig.from_preset("tiny-moe")
    base = MiniMindLM(cfg)
    base_sd = copy.deepcopy(base.state_dict())
    model = copy.deepcopy(base)
    apply_lora(model, "all", rank=8, alpha=16)
    ref = copy.deepcopy(model)  # torch backend, same adapters
    # One kt worker thread: on 2 cores, 2 kt threads spinning between calls starve torch's own
    # threads (measured 0.2 s vs 0.035 s per step of this tiny model).
    offload_experts(model, "kt", kt_num_threads=1)
    ids = torch.randint(3, cfg.vocab_size, (2, 24))
    out: dict = {}

    # One step's gradients, kt vs torch, with a non-zero B so every LoRA gradient is non-trivial.
    with torch.no_grad():
        for m in (model, ref):
            g = torch.Generator().manual_seed(1)
            for p in lora_parameters(m):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    for m in (model, ref):
        m(ids, labels=ids).loss.backward()
    expert_kt, expert_ref, other_kt, other_ref = [], [], [], []
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.grad is None:
            continue
        (expert_kt if ".experts." in n else other_kt).append(p.grad.flatten())
        (expert_ref if ".experts." in n else other_ref).append(q.grad.flatten())
    out["grad_expert_lora"] = rel(torch.cat(expert_kt), torch.cat(expert_ref))
    out["grad_other_lora"] = rel(torch.cat(other_kt), torch.cat(other_ref))

    # Overfit one batch with AdamW on the adapters; the hook refreshes the kernels each step.
    # The same loop on the torch backend gives the loss curve kt should follow (bf16 drift only).
    for tag, m in (("losses", model), ("losses_torch", ref)):
        out[tag] = overfit_adapters(m, ids, steps=20)  # the refresh is a no-op for torch

    model.eval()
    with torch.no_grad():
        logits_kt = model(ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp)
        from safetensors import safe_open
        with safe_open(f"{tmp}/adapter_model.safetensors", "pt") as f:
            keys = sorted(f.keys())
        out["expert_keys"] = [k for k in keys if ".experts." in k]
        plain = MiniMindLM(cfg)
        plain.load_state_dict(base_sd)
        load_adapter(plain, tmp)
    plain.eval()
    with torch.no_grad():
        logits_torch = plain(ids).logits
        out["logits_vs_torch_adapter"] = rel(logits_kt, logits_torch)
        merge_lora(plain)
        logits_torch_merged = plain(ids).logits
        out["logits_vs_torch_merged"] = rel(logits_kt, logits_torch_merged)
        # The kt-trained model's adapters folded into its weights, run by the kernel again (a
        # plain model, experts on kt, no LoRA: the SkipLoRA kernel): kt vs the merged torch model.
        folded = offload_experts(merged_model(model).eval(), "kt", kt_num_threads=1)
        logits_kt_merged = folded(ids).logits
        out["kt_kernel_ran_merged"] = all(isinstance(m.experts, KTExperts) and m.experts._runner
                                          is not None for m in folded.modules()
                                          if isinstance(m, MoEFeedForward))
        out["kt_merged_vs_torch_merged"] = rel(logits_kt_merged, logits_torch_merged)
        # merge_lora on the kt model itself: merged adapters take the torch path (torch maths).
        merge_lora(model)
        out["kt_model_merge_takes_torch_path"] = rel(model(ids).logits, logits_torch)
    return out


def case_inference(kt_mode: str = "inference") -> dict:
    """Forward-only kernels vs the fp32 torch backend: a layer with live (unmerged) expert LoRA,
    chunked (100 tokens through 32-token calls), 3 experts left to torch, one decode token; then
    a whole tiny-moe model's logits. ``variant`` and ``mode`` say what actually ran."""
    torch.manual_seed(0)
    out: dict = {"variant": kt_variant()}
    layer = make_layer()
    x, ids, w, _ = routed_inputs(layer, 100)
    with torch.no_grad():
        ref = layer.experts(x, ids, w)
        for tag, kw in (("layer", {}), ("layer_gpu_experts", {"kt_num_gpu_experts": 3})):
            kt_layer = offload_experts(copy.deepcopy(layer), "kt", kt_num_threads=1,
                                       kt_chunk_tokens=32, kt_mode=kt_mode, **kw)
            out[tag] = rel(kt_layer.experts(x, ids, w), ref)
            out["mode"] = kt_layer.experts.mode
        out["decode_token"] = rel(kt_layer.experts(x[:1], ids[:1], w[:1]), ref[:1])
        # An adapter edit after the first forward reaches the kernel (it is rebuilt).
        for p in lora_parameters(kt_layer):
            p.mul_(2.0)
        for p in lora_parameters(layer):
            p.mul_(2.0)
        out["after_adapter_edit"] = rel(kt_layer.experts(x, ids, w), layer.experts(x, ids, w))
    try:
        kt_layer.experts(x.clone().requires_grad_(), ids, w)
        out["grad_error"] = ""
    except RuntimeError as e:
        out["grad_error"] = str(e)

    cfg = MiniMindConfig.from_preset("tiny-moe")
    model = MiniMindLM(cfg).eval()
    tokens = torch.randint(3, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ref_logits = model(tokens).logits
        offload_experts(model, "kt", kt_num_threads=1, kt_mode=kt_mode)
        logits = model(tokens).logits
    out["model_logits"] = rel(logits, ref_logits)
    out["model_argmax_agree"] = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    return out


def _dequantised_copy(layer: MoEFeedForward) -> MoEFeedForward:
    """The same layer with every routed expert weight replaced by its MXFP4 round trip."""
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        for e in ref.experts:
            for proj in PROJS:
                weight = getattr(e, proj).weight
                weight.copy_(mxfp4_dequantize(*mxfp4_quantize(weight)))
    return ref


def case_mxfp4() -> dict:
    """kt_backend MXFP4 (4-bit base + LoRA): forward, backward and the six LoRA gradients vs fp32
    torch maths on the dequantised weights (what the kernel should compute) and vs the original
    fp32 weights (what quantisation costs); then tiny-moe LoRA training steps."""
    torch.manual_seed(0)
    layer = make_layer()
    x, ids, w, gy = routed_inputs(layer, 64)
    kt_layer = offload_experts(copy.deepcopy(layer), "kt", kt_num_threads=1, kt_backend="MXFP4")
    got = layer_grads(kt_layer, x, ids, w, gy)
    out = {"variant": kt_variant(), "mode": kt_layer.experts.mode,
           "vs_dequantised": compare(got, layer_grads(_dequantised_copy(layer), x, ids, w, gy)),
           "vs_fp32": compare(got, layer_grads(layer, x, ids, w, gy))}
    weight = layer.experts[0].gate_proj.weight
    out["weight_quant_error"] = rel(mxfp4_dequantize(*mxfp4_quantize(weight)), weight)

    cfg = MiniMindConfig.from_preset("tiny-moe")
    model = MiniMindLM(cfg)
    apply_lora(model, "all", rank=8, alpha=16)
    offload_experts(model, "kt", kt_num_threads=1, kt_backend="MXFP4")
    tokens = torch.randint(3, cfg.vocab_size, (2, 24))
    out["losses"] = overfit_adapters(model, tokens, steps=12)
    out["expert_lora_moved"] = max(p.abs().max().item() for n, p in model.named_parameters()
                                   if ".experts." in n and n.endswith("lora_B"))
    return out


CASES = {"layer_precision": case_layer_precision, "chunking": case_chunking,
         "gpu_experts": case_gpu_experts, "two_forwards": case_two_forwards,
         "refresh": case_refresh, "skiplora": case_skiplora, "int4": case_int4,
         "train": case_train, "inference": case_inference,
         "inference_auto": lambda: case_inference("auto"), "mxfp4": case_mxfp4}


if __name__ == "__main__":
    torch.set_num_threads(2)
    result = CASES[sys.argv[1]]()
    sys.stdout.flush()
    print("KT_RESULT " + json.dumps(result), flush=True)
