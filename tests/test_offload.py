"""Expert offload: the cpu backend equals torch; kt matches an fp32 reference, trains and exports.

kt cases run in subprocesses (``tests/kt_worker.py``) because kt-kernel can crash the process
natively; they skip only when kt_kernel is missing or its CPU variant has no training kernels.
The error cases run in-process against a fake kt_kernel whose kernel constructor fails the test,
which proves every check happens before any native call.
"""

import copy
import sys
import types

import pytest
import torch

from model.config import MiniMindConfig
from model.lora import apply_lora, lora_parameters
from model.model import MiniMindLM
from model.moe import Experts, MoEFeedForward
from offload.experts import CPUExperts, KTExperts, KTOptions, kt_status, offload_experts, refresh_kt_lora
from tests.conftest import run_kt_worker

KT_OK, KT_REASON = kt_status()
# Relative error ‖a−b‖/‖b‖ against fp32; the kernel computes in bf16.
FWD_TOL, BWD_TOL = 0.05, 0.10
LORA_GRADS = [f"{p}.{ab}" for p in ("gate_proj", "up_proj", "down_proj")
              for ab in ("lora_A", "lora_B")]


def tiny_model(**overrides) -> MiniMindLM:
    return MiniMindLM(MiniMindConfig.from_preset("tiny-moe", **overrides))


# --- cpu backend -----------------------------------------------------------------------------

@pytest.mark.parametrize("k,experts", [(1, 4), (2, 8)])
def test_cpu_backend_equals_torch_outputs_and_grads(k, experts):
    cfg = MiniMindConfig.from_preset("tiny-moe", num_experts=experts, num_experts_per_tok=k)
    layer = MoEFeedForward(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    cpu_layer = offload_experts(copy.deepcopy(layer), "cpu")
    assert isinstance(cpu_layer.experts, CPUExperts)
    x = torch.randn(2, 19, 64)
    grads = []
    for lay in (layer, cpu_layer):
        x_ = x.clone().requires_grad_()
        y, aux = lay(x_)
        grad_y = torch.randn_like(y, generator=torch.Generator().manual_seed(3))
        ((y * grad_y).sum() + aux).backward()
        grads.append([y, x_.grad, *(p.grad for p in lay.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_offload_keeps_parameter_names_and_round_trips():
    model = tiny_model()
    keys = list(model.state_dict())
    offload_experts(model, "cpu")
    assert list(model.state_dict()) == keys
    assert all(isinstance(layer.mlp.experts, CPUExperts) for layer in model.model.layers)
    model.to(torch.float64)  # a dtype change reaches the pinned experts, they stay on the CPU
    assert model.model.layers[0].mlp.experts[0].up_proj.weight.dtype == torch.float64
    offload_experts(model, "torch")
    assert type(model.model.layers[0].mlp.experts) is Experts
    assert list(model.state_dict()) == keys


def test_moving_the_model_leaves_offloaded_experts_in_cpu_memory(fake_kt):
    # "meta" stands in for an accelerator: everything else moves, the pinned experts do not.
    model = offload_experts(tiny_model(), "cpu").to("meta")
    assert model.model.embed_tokens.weight.device.type == "meta"
    assert model.model.layers[0].mlp.shared_experts[0].up_proj.weight.device.type == "meta"
    assert model.model.layers[0].mlp.experts[3].up_proj.weight.device.type == "cpu"
    kt_model = offload_experts(tiny_model(), "kt", kt_num_gpu_experts=1).to("meta")
    experts = kt_model.model.layers[1].mlp.experts
    assert isinstance(experts, KTExperts)
    assert [e.down_proj.weight.device.type for e in experts] == ["meta", "cpu", "cpu", "cpu"]


def test_cpu_backend_with_lora_trains_identically_to_torch():
    torch.manual_seed(0)
    a = tiny_model()
    apply_lora(a, "all", rank=8, alpha=16)
    b = offload_experts(copy.deepcopy(a), "cpu")
    ids = torch.randint(3, 6400, (2, 16))
    for m in (a, b):
        opt = torch.optim.AdamW(lora_parameters(m), lr=1e-2)
        for _ in range(3):
            m(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


# --- errors before any native call ---------------------------------------------------------

@pytest.fixture
def fake_kt(monkeypatch):
    """A kt_kernel with a training variant whose kernel constructor must never be reached."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a native kt-kernel object was created before validation")

    fake = types.ModuleType("kt_kernel")
    fake.__cpu_variant__ = "avx512_bf16"
    fake.KTMoEWrapper = forbidden
    monkeypatch.setitem(sys.modules, "kt_kernel", fake)
    return fake


@pytest.mark.parametrize("field,value", [("hidden_size", 48), ("moe_intermediate_size", 100)])
def test_sizes_not_multiple_of_32_raise_value_error(fake_kt, field, value):
    overrides = {field: value}
    if field == "hidden_size":
        overrides["num_attention_heads"] = 4
    model = tiny_model(**overrides)
    with pytest.raises(ValueError, match=rf"{field}={value} is not a multiple of 32"):
        offload_experts(model, "kt")
    assert type(model.model.layers[0].mlp.experts) is Experts  # untouched


def test_int4_needs_multiples_of_128(fake_kt):
    with pytest.raises(ValueError, match="hidden_size=64 is not a multiple of 128"):
        offload_experts(tiny_model(), "kt", kt_backend="AMXINT4")


@pytest.mark.parametrize("kwargs,message", [
    (dict(kt_backend="FP16"), "kt_backend='FP16' is not supported"),
    (dict(kt_backend="AMXINT8"), "needs kt_weight_path"),
    (dict(kt_num_gpu_experts=3), "kt_num_gpu_experts=3 leaves 1 of 4"),
    (dict(kt_num_threads=-1), "kt_num_threads=-1"),
])
def test_bad_kt_options_raise(fake_kt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        offload_experts(tiny_model(), "kt", **kwargs)


def test_unknown_option_and_backend():
    with pytest.raises(TypeError, match="unknown kt option"):
        offload_experts(tiny_model(), "kt", kt_threads=2)
    with pytest.raises(ValueError, match="unknown expert backend"):
        offload_experts(tiny_model(), "gpu")
    with pytest.raises(ValueError, match="no MoE layers"):
        offload_experts(MiniMindLM(MiniMindConfig.from_preset("tiny")), "cpu")


@pytest.mark.parametrize("rank,dropout,message", [(300, 0.0, "LoRA rank=300 is unsupported"),
                                                  (8, 0.1, "LoRA dropout=0.1 is unsupported")])
def test_unsupported_lora_raises_before_kernel(fake_kt, rank, dropout, message):
    model = tiny_model()
    apply_lora(model, "all", rank=rank, alpha=16, dropout=dropout)
    offload_experts(model, "kt")  # the kernel is built on first use
    ids = torch.randint(3, 6400, (1, 8))
    with pytest.raises(ValueError, match=message):
        model(ids)


def test_missing_kt_kernel_raises_import_error_with_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "kt_kernel", None)  # makes `import kt_kernel` fail
    with pytest.raises(ImportError, match="pip install --no-deps -r requirements-kt.txt"):
        offload_experts(tiny_model(), "kt")
    assert not kt_status()[0]


def test_variant_without_training_kernels_names_it_and_the_ways_forward(fake_kt):
    """kt-kernel's avx2 build (AVX2-only CPUs) has no bf16 training kernels: training asks fail
    with one line naming the variant, --moe_backend cpu, AVX512-BF16/AMX and MXFP4; inference
    (kt_mode auto) takes the forward-only kernels instead."""
    fake_kt.__cpu_variant__ = "avx2"
    ok, reason = kt_status()
    assert not ok and "\n" not in reason
    for needle in ("variant 'avx2'", "--moe_backend cpu", "AVX512-BF16 or AMX", "MXFP4"):
        assert needle in reason, (needle, reason)
    with pytest.raises(RuntimeError, match="variant 'avx2' has no AMXBF16_SFT training kernel"):
        offload_experts(tiny_model(), "kt", kt_mode="sft")
    assert kt_status("MXFP4")[0]  # the one training class the avx2 build ships
    model = offload_experts(tiny_model(), "kt")  # auto: no kernel is built until a forward
    assert {layer.mlp.experts.mode for layer in model.model.layers} == {"inference"}
    with pytest.raises(ValueError, match="inference kernels.*AMXINT4"):
        offload_experts(tiny_model(hidden_size=128, moe_intermediate_size=128,
                                   num_attention_heads=4), "kt", kt_backend="AMXINT4")
    fake_kt.__cpu_variant__ = "avx512_bf16"
    assert kt_status()[0] and kt_status("MXFP4")[0]
    assert offload_experts(tiny_model(), "kt").model.layers[0].mlp.experts.mode == "sft"


def test_mxfp4_checks(fake_kt):
    with pytest.raises(ValueError, match="MXFP4.*kt_num_gpu_experts=1 must be 0"):
        offload_experts(tiny_model(), "kt", kt_backend="MXFP4", kt_num_gpu_experts=1)


def test_mxfp4_round_trip_is_the_ocp_rule():
    """Codes and scales against hand-computed values, and an error bound on random weights."""
    from offload.experts import mxfp4_dequantize, mxfp4_quantize
    row = torch.tensor([[0.5, -1.0, 1.5, 6.0, 7.9, 0.26] + [0.0] * 26])  # max 7.9: scale 2^0
    packed, scales = mxfp4_quantize(row)
    assert scales.float().tolist() == [[1.0]]
    assert packed[0, :3].tolist() == [0x1 | 0xA << 4, 0x3 | 0x7 << 4, 0x7 | 0x1 << 4]
    assert mxfp4_dequantize(packed, scales)[0, :6].tolist() == [0.5, -1.0, 1.5, 6.0, 6.0, 0.5]
    w = torch.randn(64, 128)
    err = ((mxfp4_dequantize(*mxfp4_quantize(w)) - w).norm() / w.norm()).item()
    assert 0.05 < err < 0.2, err


def test_kt_options_are_a_typed_dataclass():
    opts = KTOptions(kt_backend="amxint4", kt_num_threads=4)
    assert opts.method == "AMXINT4_SFT"
    assert KTOptions().method == "AMXBF16_SFT"
    assert KTOptions().chunk_tokens() == 2048 and KTOptions(kt_chunk_tokens=64).chunk_tokens() == 64
    with pytest.raises(ValueError, match="kt_weight_path is read by kt_backend='AMXINT8' only"):
        KTOptions(kt_backend="AMXBF16", kt_weight_path="/tmp").validate()
    assert refresh_kt_lora(tiny_model()) == 0  # safe to call on any model


# --- kt, in subprocesses -------------------------------------------------------------------

def run_worker(case: str) -> dict:
    return run_kt_worker(case)


needs_kt = pytest.mark.skipif(not KT_OK, reason=KT_REASON)


def assert_layer_precision(err: dict) -> None:
    assert err["y"] < FWD_TOL, err
    for key in ["x", "w", *LORA_GRADS]:
        assert err[key] < BWD_TOL, (key, err)


@needs_kt
@pytest.mark.parametrize("case", ["layer_precision", "chunking", "gpu_experts"])
def test_kt_layer_matches_fp32_reference(case):
    assert_layer_precision(run_worker(case))


@needs_kt
def test_kt_backward_after_another_forward_recomputes():
    err = run_worker("two_forwards")
    assert max(err.values()) < BWD_TOL, err


@needs_kt
def test_kt_sees_adapter_updates():
    out = run_worker("refresh")
    assert out["after_step_no_refresh"] < FWD_TOL  # optimizer steps bump versions: auto-refresh
    assert out["data_edit_stale"] > 0.3  # .data edits are invisible to the kernel ...
    assert out["refreshed_layers"] == 1
    assert out["data_edit_refreshed"] < FWD_TOL  # ... until refresh_kt_lora


@needs_kt
def test_kt_without_expert_lora_runs_frozen_experts():
    err = run_worker("skiplora")
    assert err["y"] < FWD_TOL and err["x"] < BWD_TOL and err["w"] < BWD_TOL, err


@needs_kt
def test_kt_int4_is_a_loose_approximation():
    err = run_worker("int4")
    assert err["y"] < 0.35, err  # int4 weights: ~20 % on Gaussian weights, measured


@needs_kt
def test_kt_model_trains_and_adapter_loads_on_torch_backend():
    out = run_worker("train")
    assert out["grad_expert_lora"] < BWD_TOL and out["grad_other_lora"] < BWD_TOL, out
    losses, ref = out["losses"], out["losses_torch"]
    assert losses[-1] < losses[0] - 0.5, losses
    assert max(abs(a - b) for a, b in zip(losses, ref)) < 0.05, (losses, ref)
    expert_keys = out["expert_keys"]
    assert len(expert_keys) == 2 * 4 * 3 * 2  # layers × experts × projections × (A, B)
    assert "model.layers.1.mlp.experts.3.gate_proj.lora_A" in expert_keys
    assert out["logits_vs_torch_adapter"] < FWD_TOL
    assert out["logits_vs_torch_merged"] < FWD_TOL
    # the kernel running the merged weights agrees with the merged torch model (bf16 only)
    assert out["kt_kernel_ran_merged"] and out["kt_merged_vs_torch_merged"] < FWD_TOL, out
    assert out["kt_model_merge_takes_torch_path"] < 1e-4
