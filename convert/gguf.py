"""GGUF export for llama.cpp / Ollama: one ``.gguf`` file (weights + hyperparameters + BPE
tokenizer + chat template) from our model.

Tensor names and hyperparameter keys follow llama.cpp's own ``convert_hf_to_gguf.py`` (the
``gguf`` package's ``MODEL_TENSORS`` / ``TENSOR_NAMES`` tables), so the file loads in an
unmodified llama.cpp.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from common.atomic import atomic_path
from model.config import MiniMindConfig
from model.model import MiniMindLM
from model.tokenizer import PRETOKENIZE_REGEX

from .hf import ConversionError, find_tokenizer_dir, float32_state_dict

# Our parameter name (after ``model.layers.N.``) → llama.cpp tensor name (after ``blk.N.``).
_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",               # latent attention (DeepSeek)
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def rope_halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorders the output rows of a q/k projection from half-rotation RoPE to interleaved RoPE.

    We (and HF, Qwen3) rotate the pairs (i, i + D/2); llama.cpp's ``llama`` architecture rotates
    adjacent pairs (2i, 2i+1). Putting row i of each head at 2i and row i + D/2 at 2i+1 makes the
    two conventions compute the same scores (q·k is invariant to a shared permutation of D).
    """
    out_features, d_in = w.shape
    d = out_features // n_heads
    return w.view(n_heads, 2, d // 2, d_in).transpose(1, 2).reshape(out_features, d_in)


def _gguf_pre_tokenizer(tokenizer_json: dict, source: str) -> str:
    """The llama.cpp pre-tokenizer name equal to the tokenizer's, or a ``ConversionError``."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex", True),
              s.get("add_prefix_space", False)) for s in steps]
    byte_level = ("ByteLevel", None, True, False)
    if kinds == [byte_level]:
        return "gpt-2"
    if kinds == [("Digits", True, True, False), byte_level]:
        return "starcoder"  # llama.cpp: split every digit, then the GPT-2 regex
    split = steps[0].get("pattern", {}).get("Regex") if steps[0].get("type") == "Split" else None
    if split == PRETOKENIZE_REGEX and kinds[1:] == [("ByteLevel", None, False, False)]:
        return "qwen2"  # llama.cpp's qwen2 pre-tokenizer is this very pattern
    raise ConversionError(f"{source}: pre-tokenizer {kinds} has no exact llama.cpp equivalent; a "
                          "GGUF with a guessed one would tokenize some inputs differently")


def _refuse(ok: bool, msg: str) -> None:
    if not ok:
        raise ConversionError(f"GGUF export: {msg}")


def gguf_arch(config: MiniMindConfig) -> str:
    """The llama.cpp architecture whose maths equals the config's, or a ``ConversionError``.

    ==========================================  ==========  =====================================
    our config                                  llama.cpp   its maths, as llama.cpp computes it
    ==========================================  ==========  =====================================
    dense, QK-norm                              qwen3       NEOX (half) RoPE: weights as they are
    dense / MoE without shared, no QK-norm      llama       interleaved RoPE: q/k rows permuted;
                                                            MoE = Mixtral: softmax, top-k, renorm
    MoE, QK-norm, no shared experts             qwen3moe    softmax → top-k → renormalise
    MoE + sigmoid-gated shared expert (Qwen2)   qwen2moe    softmax → top-k, never renormalised
    latent attention (DeepSeek-V2/V3)           deepseek2   MQA over the latent (k_b/v_b split),
                                                            interleaved RoPE on the rope dims,
                                                            softmax or sigmoid + bias, groups
                                                            scored by their top-2 sum, renorm as
                                                            configured, then routed scaling
    ==========================================  ==========  =====================================

    Refused (llama.cpp would compute something else): YaRN (its attention factor is not verified
    here), dense leading layers outside deepseek2, routed scaling outside deepseek2, DeepSeek-V2's
    group-limited greedy routing over several groups (llama.cpp scores groups by their top-2 sum,
    V2 by their maximum), attention biases outside qwen2moe, dense MLA.
    """
    _refuse(config.yarn_factor <= 1.0, "a YaRN config is not supported; export the base model and "
            "enable YaRN at run time (llama.cpp --rope-scaling yarn)")
    if config.use_mla:
        _refuse(config.use_moe, "dense MLA (latent attention without experts): llama.cpp's "
                "deepseek2 expects expert tensors in every layer past the dense lead")
        _refuse(config.rope_interleave, "latent attention with half-rotation RoPE has no "
                "llama.cpp equivalent (deepseek2 rotates adjacent pairs)")
        _refuse(config.use_moe and config.n_shared_experts > 0 and not config.shared_expert_gate,
                "llama.cpp's deepseek2 is MoE with ungated shared experts; this config is not")
        _refuse(config.topk_method != "group_limited_greedy"
                or config.topk_group >= config.n_group,
                "DeepSeek-V2's group-limited greedy routing over several groups (llama.cpp scores "
                "groups by their top-2 sum, not their maximum)")
        _refuse(not config.attention_bias, "deepseek2 has no attention biases")
        return "deepseek2"
    _refuse(config.first_k_dense_replace == 0 or not config.use_moe,
            "dense leading layers (first_k_dense_replace) exist in llama.cpp's deepseek2 only")
    if config.use_moe:
        _refuse(config.routed_scaling_factor == 1.0 and config.topk_method == "greedy",
                "routed scaling and group-limited routing exist in llama.cpp's deepseek2 only")
    if config.use_moe and config.shared_expert_gate:
        _refuse(not config.qk_norm, "qwen2moe has no QK-norm")
        _refuse(not config.norm_topk_prob, "llama.cpp's qwen2moe never renormalises the top-k "
                "routing weights; this config does")
        _refuse(config.num_attention_heads * config.head_dim == config.hidden_size,
                "qwen2moe needs num_attention_heads * head_dim == hidden_size")
        return "qwen2moe"
    _refuse(not config.attention_bias, "attention biases export to qwen2moe only")
    if not config.use_moe:
        return "qwen3" if config.qk_norm else "llama"
    _refuse(config.n_shared_experts == 0, "MoE with ungated shared experts has no llama.cpp "
            "architecture with the same maths (qwen2moe gates its shared expert by a learned "
            "sigmoid, deepseek2 needs latent attention)")
    _refuse(config.norm_topk_prob, "llama.cpp's qwen3moe / llama MoE always renormalise the top-k "
            "routing weights; this config (norm_topk_prob false) does not")
    return "qwen3moe" if config.qk_norm else "llama"


def _split_kv_b(w: torch.Tensor, config: MiniMindConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj [H·(nope+v), r] → llama.cpp's absorbed-MLA pair: k_b [H, r, nope] (transposed,
    it multiplies the query) and v_b [H, v, r], as convert_hf_to_gguf splits it."""
    kv_b = w.view(config.num_attention_heads, config.qk_nope_head_dim + config.v_head_dim, -1)
    k_b, v_b = kv_b.split([config.qk_nope_head_dim, config.v_head_dim], dim=1)
    return k_b.transpose(1, 2).contiguous(), v_b.contiguous()


def _stack_mlps(sd: dict[str, torch.Tensor], prefix: str, n: int) -> dict[str, torch.Tensor]:
    """k shared SwiGLU experts of width I = one of width k·I (their sum): gate/up rows and
    down columns concatenated."""
    return {"gate": torch.cat([sd[f"{prefix}.{e}.gate_proj.weight"] for e in range(n)]),
            "up": torch.cat([sd[f"{prefix}.{e}.up_proj.weight"] for e in range(n)]),
            "down": torch.cat([sd[f"{prefix}.{e}.down_proj.weight"] for e in range(n)], dim=1)}


def gguf_tensors(config: MiniMindConfig, sd: dict[str, torch.Tensor], arch: str
                 ) -> dict[str, torch.Tensor]:
    """llama.cpp tensor name → fp32 tensor (torch layout [out, in]; the writer reverses the dims
    into ggml order). Routed experts are stacked per layer: ``ffn_{gate,up}_exps`` [E, I, D],
    ``ffn_down_exps`` [E, D, I], the router ``ffn_gate_inp`` [E, D], as convert_hf_to_gguf does."""
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"],
               "output_norm.weight": sd["model.norm.weight"]}
    if not config.tie_word_embeddings or arch == "qwen2moe":  # llama.cpp's qwen2moe needs output
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        layer, blk = f"model.layers.{i}.", f"blk.{i}."
        for ours, theirs in _GGUF_LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                key = f"{layer}{ours[:-len('weight')]}{kind}"
                if key not in sd:
                    continue  # q/k norms, biases, the dense FFN: only where the config has them
                w = sd[key]
                if arch == "llama" and ours == "self_attn.q_proj.weight":
                    w = rope_halves_to_interleaved(w, config.num_attention_heads)
                elif arch == "llama" and ours == "self_attn.k_proj.weight":
                    w = rope_halves_to_interleaved(w, config.num_key_value_heads)
                tensors[f"{blk}{theirs[:-len('weight')]}{kind}"] = w
        if arch == "deepseek2":
            tensors[f"{blk}attn_k_b.weight"], tensors[f"{blk}attn_v_b.weight"] = _split_kv_b(
                sd[layer + "self_attn.kv_b_proj.weight"], config)
        if not config.is_moe_layer(i):
            continue
        tensors[f"{blk}ffn_gate_inp.weight"] = sd[layer + "mlp.gate.weight"]
        if layer + "mlp.gate.e_score_correction_bias" in sd:
            tensors[f"{blk}exp_probs_b.bias"] = sd[layer + "mlp.gate.e_score_correction_bias"]
        for proj in ("gate", "up", "down"):
            tensors[f"{blk}ffn_{proj}_exps.weight"] = torch.stack(
                [sd[f"{layer}mlp.experts.{e}.{proj}_proj.weight"] for e in range(config.num_experts)])
        if arch == "qwen2moe":
            shared = {p: sd[f"{layer}mlp.shared_expert.{p}_proj.weight"] for p in ("gate", "up", "down")}
            tensors[f"{blk}ffn_gate_inp_shexp.weight"] = sd[layer + "mlp.shared_expert_gate.weight"][0]
        elif config.n_shared_experts:
            shared = _stack_mlps(sd, layer + "mlp.shared_experts", config.n_shared_experts)
        else:
            shared = {}
        for proj, w in shared.items():
            tensors[f"{blk}ffn_{proj}_shexp.weight"] = w
    return tensors


def _add_hparams(writer, config: MiniMindConfig, arch: str) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    # llama.cpp's llama arch sizes Mixtral's experts by feed_forward_length (it has no other FFN)
    mixtral = arch == "llama" and config.use_moe
    writer.add_feed_forward_length(config.moe_intermediate_size if mixtral else config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch == "deepseek2":
        # llama.cpp runs MLA as multi-query attention over the latent (+ the shared rope key),
        # then decompresses with v_b: one kv head, key = r + rope dims, value = r.
        nope, rope, r = config.qk_nope_head_dim, config.qk_rope_head_dim, config.kv_lora_rank
        writer.add_head_count_kv(1)
        writer.add_key_length(r + rope)
        writer.add_value_length(r)
        writer.add_key_length_mla(nope + rope)
        writer.add_value_length_mla(config.v_head_dim)
        writer.add_rope_dimension_count(rope)
        writer.add_q_lora_rank(config.q_lora_rank)      # 0 = one q_proj (V2-Lite)
        writer.add_kv_lora_rank(r)
        writer.add_leading_dense_block_count(config.first_k_dense_replace)
    else:
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_dimension_count(config.head_dim)
    if not config.use_moe:
        return
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if arch == "deepseek2":
        import gguf
        writer.add_expert_shared_count(config.n_shared_experts)
        writer.add_expert_weights_scale(config.routed_scaling_factor)
        writer.add_expert_weights_norm(config.norm_topk_prob)
        sigmoid = config.topk_method == "noaux_tc"
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid
                                      else gguf.ExpertGatingFuncType.SOFTMAX)
        if config.n_group > 1 and config.topk_group < config.n_group:
            writer.add_expert_group_count(config.n_group)
            writer.add_expert_group_used_count(config.topk_group)


# --outtype (llama.cpp's names) → the file type declared in the header. The gguf package
# quantizes these itself (numpy, bit-exact with ggml's reference quantizers).
GGUF_OUTTYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                 "q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1",
                 "q4_0": "MOSTLY_Q4_0"}
# K-quants have no numpy quantizer in the gguf package: llama.cpp's own quantizer writes them
# (llama-cpp-python's ``llama_model_quantize``, the library behind ``llama-quantize``).
LLAMA_CPP_OUTTYPES = {"q2_k": "MOSTLY_Q2_K", "q3_k_s": "MOSTLY_Q3_K_S", "q3_k_m": "MOSTLY_Q3_K_M",
                      "q3_k_l": "MOSTLY_Q3_K_L", "q4_k_s": "MOSTLY_Q4_K_S",
                      "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_s": "MOSTLY_Q5_K_S",
                      "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}
OUTTYPES = (*GGUF_OUTTYPES, *LLAMA_CPP_OUTTYPES)


def tensor_type(name: str, w, outtype: str, has_output: bool):
    """The ggml type a tensor is written in at ``outtype``, by convert_hf_to_gguf's rules (and
    llama-quantize's for the output matrix at sub-8-bit types):

    - 1-D tensors, norms, biases and the MoE router (``ffn_gate_inp``) stay F32: llama.cpp's
      kernels for them take F32, and they are a negligible share of the bytes;
    - a matrix whose rows are not a whole number of quantization blocks (32 values for the
      legacy quants) falls back to F16, as convert_hf_to_gguf does on ``QuantError``;
    - at 4-5 bits the output matrix (the token embedding when it is tied) is Q8_0: llama-quantize
      gives it Q6_K, which the gguf package cannot write, and Q8_0 itself where Q6_K's 256-wide
      blocks do not fit. The token embedding of an untied model takes the file's type.
    """
    import gguf
    qtypes = gguf.GGMLQuantizationType
    if w.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") \
            or ".ffn_gate_inp" in name:
        return qtypes.F32
    qtype = qtypes[outtype.upper()]
    output_matrix = name == "output.weight" or (name == "token_embd.weight" and not has_output)
    if outtype in ("q5_1", "q5_0", "q4_1", "q4_0") and output_matrix:
        qtype = qtypes.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if w.shape[-1] % block == 0 else qtypes.F16


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise ConversionError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")


def export_gguf(model: MiniMindLM, out_path: str | Path, tokenizer_dir: str | Path | None = None,
                outtype: str = "f32") -> Path:
    """One ``.gguf`` file (weights + hyperparameters + BPE tokenizer + chat template) for the
    architecture ``gguf_arch`` picks, its matrices in ``outtype`` (``OUTTYPES``; which tensors
    keep a wider type: ``tensor_type``). K-quants (``LLAMA_CPP_OUTTYPES``) are written by
    llama.cpp's quantizer from an f32 export: it needs llama-cpp-python."""
    check_outtype(outtype)
    if outtype in LLAMA_CPP_OUTTYPES:
        return _quantize_with_llama_cpp(model, Path(out_path), tokenizer_dir, outtype)
    import gguf  # optional dependency, only for this export

    config = model.config
    arch = gguf_arch(config)
    tok_dir = find_tokenizer_dir(None) if tokenizer_dir is None else Path(tokenizer_dir)
    tok_json = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok_cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    if tok_json.get("model", {}).get("type") != "BPE":
        raise ConversionError(f"{tok_dir}: only byte-level BPE tokenizers export to GGUF")
    pre = _gguf_pre_tokenizer(tok_json, str(tok_dir / "tokenizer.json"))

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = gguf_tensors(config, float32_state_dict(model.state_dict()), arch)

    vocab = {**tok_json["model"]["vocab"], **{t["content"]: t["id"] for t in tok_json["added_tokens"]}}
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ConversionError(f"{tok_dir}: token ids are not contiguous from 0")
    if len(vocab) > config.vocab_size:
        raise ConversionError(f"tokenizer has {len(vocab)} tokens, the model only {config.vocab_size}")
    tokens = [""] * config.vocab_size
    types = [int(gguf.TokenType.UNUSED)] * config.vocab_size
    for text, tid in vocab.items():
        tokens[tid], types[tid] = text, int(gguf.TokenType.NORMAL)
    for t in tok_json["added_tokens"]:
        types[t["id"]] = int(gguf.TokenType.CONTROL if t["special"] else gguf.TokenType.USER_DEFINED)
    for tid in range(len(vocab), config.vocab_size):  # embedding rows past the tokenizer
        tokens[tid] = f"[PAD{tid}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]

    with atomic_path(out_path) as tmp:  # a crash never leaves a half-written .gguf
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(out_path.stem)
        _add_hparams(writer, config, arch)
        writer.add_file_type(gguf.LlamaFileType[GGUF_OUTTYPES[outtype]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(config.bos_token_id)
        writer.add_eos_token_id(config.eos_token_id)
        writer.add_pad_token_id(config.pad_token_id)
        writer.add_add_bos_token(False)  # our prompts carry <|im_start|> from the chat template
        if tok_cfg.get("chat_template"):
            writer.add_chat_template(tok_cfg["chat_template"])
        for name, w in tensors.items():
            qtype = tensor_type(name, w, outtype, "output.weight" in tensors)
            writer.add_tensor(name, gguf.quants.quantize(w.numpy(), qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out_path


def _quantize_with_llama_cpp(model: MiniMindLM, out_path: Path, tokenizer_dir: str | Path | None,
                             outtype: str) -> Path:
    """A K-quant file by llama.cpp's own quantizer (its per-tensor type choices, e.g. Q4_K_M's
    Q6_K for half of the attention-v and FFN-down matrices) from a lossless f32 export."""
    try:
        import llama_cpp
    except ImportError:
        raise ConversionError(f"--outtype {outtype} is written by llama.cpp's own quantizer: "
                              "pip install llama-cpp-python, or run llama-quantize on an f32 "
                              "export") from None
    import gguf

    with tempfile.TemporaryDirectory(dir=out_path.parent if out_path.parent.is_dir() else None
                                     ) as tmp, atomic_path(out_path) as dst:
        src = export_gguf(model, Path(tmp) / "f32.gguf", tokenizer_dir, "f32")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(gguf.LlamaFileType[LLAMA_CPP_OUTTYPES[outtype]])
        if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
            raise ConversionError(f"llama.cpp's quantizer failed to write {outtype} "
                                  f"(its log above says why)")
    return out_path
