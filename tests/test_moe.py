"""MoE: grouped dispatch equals the naive loop; the aux loss equals a hand computation; DeepSeek-V2/V3
and Qwen2-MoE routing equal transformers' routers."""

import pytest
import torch

from model.config import MiniMindConfig
from model.moe import MoEFeedForward, load_balance_loss, naive_experts_forward, route


def make_layer(**overrides):
    cfg = MiniMindConfig.from_preset("tiny-moe", **overrides)
    layer = MoEFeedForward(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    return layer


@pytest.mark.parametrize("k,experts", [(1, 4), (2, 4), (2, 8), (3, 8)])
def test_grouped_dispatch_equals_naive_loop_outputs_and_gradients(k, experts):
    layer = make_layer(num_experts=experts, num_experts_per_tok=k, n_shared_experts=0)
    x = torch.randn(37, 64, requires_grad=True)
    probs, ids, w = layer.route(x)
    w = w.detach().requires_grad_()
    grouped = layer.experts(x, ids, w)
    grad_out = torch.randn_like(grouped)
    g = torch.autograd.grad(grouped, [x, w, *layer.experts.parameters()], grad_out)
    naive = naive_experts_forward(layer.experts, x, ids, w)
    n = torch.autograd.grad(naive, [x, w, *layer.experts.parameters()], grad_out,
                            allow_unused=True)
    torch.testing.assert_close(grouped, naive, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, n):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b,
                                   rtol=1e-5, atol=1e-6)


def test_unrouted_experts_still_get_zero_gradients():
    layer = make_layer(num_experts=4, num_experts_per_tok=1, n_shared_experts=0)
    x = torch.randn(6, 64)
    ids = torch.zeros(6, 1, dtype=torch.long)  # everything to expert 0
    y = layer.experts(x, ids, torch.ones(6, 1))
    y.sum().backward()
    for e in range(1, 4):
        grad = layer.experts[e].up_proj.weight.grad
        assert grad is not None and torch.count_nonzero(grad) == 0
    assert torch.count_nonzero(layer.experts[0].up_proj.weight.grad) > 0


def hand_aux(probs, ids, B, coef, kind, mask=None):
    """Loop-by-loop: f_e = routed slots / (K·tokens), P_e = mean prob, coef·E·Σ f·P."""
    T, E = probs.shape
    S, K = T // B, ids.shape[1]
    mask = torch.ones(B, S) if mask is None else mask.float()
    groups = [list(range(B))] if kind == "token" else [[b] for b in range(B)]
    losses = []
    for rows in groups:
        f, p, n = [0.0] * E, [0.0] * E, 0.0
        for b in rows:
            for s in range(S):
                if mask[b, s] == 0:
                    continue
                n += 1
                for e in range(E):
                    p[e] += probs[b * S + s, e].item()
                for kk in range(K):
                    f[ids[b * S + s, kk].item()] += 1
        losses.append(coef * E * sum((f[e] / (K * n)) * (p[e] / n) for e in range(E)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("kind", ["token", "sequence"])
def test_aux_loss_equals_hand_computation(kind):
    B, S, E, K = 3, 5, 4, 2
    probs = torch.randn(B * S, E).softmax(-1)
    ids = probs.topk(K, dim=-1).indices
    mask = torch.ones(B, S)
    mask[1, :2] = 0
    for m in (None, mask):
        got = load_balance_loss(probs, ids, B, 0.1, kind, m)
        assert got.item() == pytest.approx(hand_aux(probs, ids, B, 0.1, kind, m), rel=1e-5)


def test_balanced_router_scores_exactly_the_coefficient():
    E = 4
    probs = torch.full((8, E), 1 / E)
    ids = torch.arange(8).remainder(E).unsqueeze(-1)
    assert load_balance_loss(probs, ids, 2, 0.5, "token").item() == pytest.approx(0.5)


def test_topk_renormalisation_and_shared_experts():
    layer = make_layer(num_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    x = torch.randn(2, 5, 64)
    _, ids, w = layer.route(x.reshape(-1, 64))
    torch.testing.assert_close(w.sum(-1), torch.ones(10))
    y, aux = layer(x)
    x_TD = x.reshape(-1, 64)
    expected = naive_experts_forward(layer.experts, x_TD, ids, w) + layer.shared_experts[0](x_TD)
    torch.testing.assert_close(y.reshape(-1, 64), expected, rtol=1e-5, atol=1e-6)
    assert aux.item() > 0
    plain = make_layer(norm_topk_prob=False)
    assert (plain.route(x.reshape(-1, 64))[2].sum(-1) < 1).all()


# --- DeepSeek-V2/V3 and Qwen2-MoE routing against transformers' routers ---------------------------

ROUTERS = {  # name → (our overrides, transformers config class, router class, its config fields)
    "v2-greedy": (dict(topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.5),
                  "DeepseekV2Config", "deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter",
                  dict(topk_method="greedy", routed_scaling_factor=1.5)),
    "v2-group": (dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                      norm_topk_prob=False, routed_scaling_factor=16.0),
                 "DeepseekV2Config", "deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter",
                 dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                      routed_scaling_factor=16.0)),
    "v3-noaux": (dict(topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
                      routed_scaling_factor=2.5),
                 "DeepseekV3Config", "deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter",
                 dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
    "qwen2": (dict(norm_topk_prob=False), "Qwen2MoeConfig",
              "qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter", dict(norm_topk_prob=False)),
}


@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_choices_and_weights_equal_transformers(name):
    import importlib
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    ours, config_cls, router_path, fields = ROUTERS[name]
    torch.manual_seed(0)
    layer = make_layer(num_experts=16, num_experts_per_tok=3, n_shared_experts=0, **ours)
    module, cls = router_path.rsplit(".", 1)
    hf_cfg = getattr(transformers, config_cls)(
        hidden_size=64, num_experts_per_tok=3, **{"n_routed_experts" if "Deepseek" in config_cls
                                                 else "num_experts": 16}, **fields)
    ref = getattr(importlib.import_module(f"transformers.models.{module}"), cls)(hf_cfg)
    with torch.no_grad():
        ref.weight.copy_(layer.gate.weight)
        if hasattr(ref, "e_score_correction_bias"):  # a bias large enough to change choices
            bias = torch.randn(16) * 0.3
            ref.e_score_correction_bias.copy_(bias)
            layer.gate.e_score_correction_bias.copy_(bias)
    x = torch.randn(64, 64)
    _, ids, w = layer.route(x)
    _, ref_w, ref_ids = ref(x)
    order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)  # transformers' top-k is unsorted
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(w.gather(1, order), ref_w.float().gather(1, ref_order),
                               rtol=1e-6, atol=1e-7)
    if name == "v3-noaux":  # the bias changed some choice, so the test can tell it is applied
        _, unbiased, _ = route(layer.config, layer.gate(x))
        assert not torch.equal(unbiased.sort(-1).values, ids.sort(-1).values)
    if name == "v2-group":  # every choice lies in the topk_group groups with the best expert
        groups = layer.route(x)[0].view(64, 4, 4).max(-1).values.topk(2, -1).indices
        assert all(set((ids[t] // 4).tolist()) <= set(groups[t].tolist()) for t in range(64))


def test_qwen2_shared_expert_is_gated_by_a_sigmoid():
    layer = make_layer(num_experts=4, num_experts_per_tok=2, n_shared_experts=0,
                       shared_expert_gate=True, shared_expert_intermediate_size=32)
    x = torch.randn(2, 5, 64)
    x_TD = x.reshape(-1, 64)
    _, ids, w = layer.route(x_TD)
    want = (naive_experts_forward(layer.experts, x_TD, ids, w)
            + torch.sigmoid(x_TD @ layer.shared_expert_gate.weight.T) * layer.shared_expert(x_TD))
    torch.testing.assert_close(layer(x)[0].reshape(-1, 64), want, rtol=1e-5, atol=1e-6)


def test_first_k_dense_replace_keeps_dense_ffns_first():
    from model.model import MiniMindLM
    from model.moe import FeedForward
    cfg = MiniMindConfig.from_preset("tiny-mla-moe", num_hidden_layers=3, first_k_dense_replace=2)
    kinds = [type(b.mlp) for b in MiniMindLM(cfg).model.layers]
    assert kinds == [FeedForward, FeedForward, MoEFeedForward]
    assert sum(p.numel() for p in MiniMindLM(cfg).parameters()) == cfg.num_parameters()
