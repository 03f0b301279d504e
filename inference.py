"""The one loader for using a trained model: a model folder, an optional LoRA adapter, expert
offload and a dtype composed into ``(model, tokenizer)`` for chat, evaluation, serving and export.

It sits above ``model/`` because it composes transforms the network itself never imports
(``model.lora``, ``offload``): the model file stays the network alone.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from common.errors import UserError
from model.io import load_pretrained, load_tokenizer
from model.lora import load_adapter, merged_model
from model.model import MiniMindLM
from model.precision import resolve_device, resolve_precision
from model.speculative import Speculation
from model.tokenizer import Tokenizer
from offload.experts import offload_experts


def load_for_inference(model_dir: str | Path, lora: str | Path | None = None,
                       device: str = "auto", dtype: str = "auto",
                       moe_backend: str = "torch") -> tuple[MiniMindLM, Tokenizer]:
    """``(model, tokenizer)`` from a model folder, ready to generate: the one loader behind
    eval_model.py, the server, the web demo and the converter.

    ``device`` auto is CUDA when present, else CPU; ``dtype`` is a name or auto (model.precision;
    the choice is logged on stderr). A LoRA adapter is merged in fp32 before the cast, so bf16
    rounding happens once, on the merged weight, and the result is a plain model (no LoRA
    modules: inference costs what the base costs). ``moe_backend`` other than ``torch`` hands
    the routed experts to ``offload.experts.offload_experts`` last, after the merge, so offloaded
    experts carry the adapter too.
    """
    model = load_pretrained(model_dir, device="cpu")
    if lora:
        load_adapter(model, lora)
        model = merged_model(model)
    dev = resolve_device(device)
    precision = resolve_precision(dtype, dev)
    print(f"[load] {precision.describe()}", file=sys.stderr)
    model = model.to(device=dev, dtype=precision.dtype).eval()
    if moe_backend != "torch" and not model.config.use_moe:
        warnings.warn(f"--moe_backend {moe_backend}: the model has no experts; ignored")
    elif moe_backend != "torch":
        # Forward-only kernels where kt has them: faster than the training kernels, no LoRA buffers.
        kt = {"kt_mode": "inference"} if moe_backend == "kt" else {}
        model = offload_experts(model, backend=moe_backend, **kt) or model
    return model, load_tokenizer(model_dir)


def load_speculation(model: MiniMindLM, tokenizer: Tokenizer, draft_model: str | Path | None = None,
                     prompt_lookup: int = 0, draft_tokens: int = 6, draft_p_min: float = 0.5,
                     device: str = "auto", dtype: str = "auto") -> Speculation | None:
    """The ``Speculation`` of the ``--draft_model`` / ``--prompt_lookup`` / ``--draft_tokens`` /
    ``--draft_p_min`` flags (None when neither source is given), checked against the model: a draft is loaded
    like the model (same device and dtype) and must have the same tokenizer."""
    if draft_model and prompt_lookup:
        raise UserError("--draft_model and --prompt_lookup are two ways to propose tokens: "
                        "pick one")
    if prompt_lookup < 0 or draft_tokens < 1 or not 0 <= draft_p_min < 1:
        raise UserError(f"--prompt_lookup {prompt_lookup} must be >= 0, --draft_tokens "
                        f"{draft_tokens} >= 1 and --draft_p_min {draft_p_min} in [0, 1)")
    if not draft_model and not prompt_lookup:
        return None
    draft = None
    if draft_model:
        draft, draft_tokenizer = load_for_inference(draft_model, device=device, dtype=dtype)
        if draft_tokenizer.fingerprint != tokenizer.fingerprint:
            raise UserError(f"--draft_model {draft_model}: its tokenizer differs from the "
                            "model's (a draft must propose token ids the model reads the same)")
    spec = Speculation(draft_model=draft, prompt_lookup=prompt_lookup, draft_tokens=draft_tokens,
                       draft_p_min=draft_p_min)
    try:
        spec.check(model)
    except ValueError as e:
        raise UserError(f"{'--draft_model' if draft_model else '--prompt_lookup'}: {e}") from None
    return spec
