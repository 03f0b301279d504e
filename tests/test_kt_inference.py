"""kt-kernel on every CPU variant: forward-only kernels vs fp32 torch, and the MXFP4 training kernel.

Each case runs ``tests/kt_worker.py`` in a subprocess (a kernel crash fails one test, not the run)
twice: on the variant kt-kernel picks for this CPU ("native") and on its ``avx2`` build, forced with
``KT_KERNEL_CPU_VARIANT=avx2`` — the build CI and AVX2-only users get, which has inference classes
and ``MXFP4_SFT_MOE`` but no bf16 training kernels. Relative errors are ‖a−b‖/‖b‖ against float32
PyTorch maths; the kernels compute in bf16.
"""

import os
from pathlib import Path

import pytest

from offload.experts import kt_inference_status
from tests.conftest import run_kt_worker

KT_OK, KT_WHY = kt_inference_status()


def _has_avx2() -> bool:
    try:
        return " avx2 " in f" {Path('/proc/cpuinfo').read_text()} ".replace("\n", " ")
    except OSError:
        return False


VARIANTS = [pytest.param("native", id="native"),
            pytest.param("avx2", id="avx2", marks=pytest.mark.skipif(
                not _has_avx2(), reason="this CPU has no AVX2: kt's avx2 build cannot run"))]


def run_case(case: str, variant: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if variant == "avx2":
        env["KT_KERNEL_CPU_VARIANT"] = "avx2"
    return run_kt_worker(case, env)


needs_kt = pytest.mark.skipif(not KT_OK, reason=KT_WHY)


@needs_kt
@pytest.mark.parametrize("variant", VARIANTS)
def test_kt_inference_kernels_match_fp32_torch(variant):
    out = run_case("inference", variant)
    if variant == "avx2":
        assert out["variant"] == "avx2"
    assert out["mode"] == "inference"
    for key in ("layer", "layer_gpu_experts", "decode_token", "after_adapter_edit"):
        assert out[key] < 0.02, (key, out)        # measured ~0.004-0.005 (bf16 weights)
    assert out["model_logits"] < 0.01 and out["model_argmax_agree"] == 1.0, out
    assert "no gradients" in out["grad_error"], out


@needs_kt
def test_avx2_build_picks_inference_kernels_by_default():
    """kt_mode auto on a build without bf16 training kernels: the forward-only kernel, and a
    forward that needs gradients says why and what to do instead."""
    out = run_case("inference_auto", "avx2")
    assert (out["variant"], out["mode"]) == ("avx2", "inference")
    assert out["layer"] < 0.02 and out["model_argmax_agree"] == 1.0, out
    for needle in ("'avx2'", "--moe_backend cpu", "AVX512-BF16 or AMX", "MXFP4"):
        assert needle in out["grad_error"], (needle, out["grad_error"])


@needs_kt
@pytest.mark.parametrize("variant", VARIANTS)
def test_kt_mxfp4_trains_expert_lora(variant):
    """4-bit base experts + LoRA: the kernel matches fp32 maths on the dequantised weights
    tightly; against the original fp32 weights it is off by the quantisation (~20 % here, random
    Gaussian weights); LoRA training still lowers the loss."""
    out = run_case("mxfp4", variant)
    assert out["mode"] == "sft"
    for key, err in out["vs_dequantised"].items():
        assert err < 0.03, (key, out["vs_dequantised"])          # measured 0.004-0.007
    assert 0.05 < out["weight_quant_error"] < 0.2, out
    for key, err in out["vs_fp32"].items():
        assert err < 0.35, (key, out["vs_fp32"])                 # measured 0.15-0.21
    losses = out["losses"]
    assert losses[-1] < losses[0] - 0.5, losses
    assert out["expert_lora_moved"] > 0
