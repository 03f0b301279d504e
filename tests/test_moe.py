"""MoE: grouped dispatch equals the naive loop; the aux loss equals a hand computation."""

import pytest
import torch

from model.config import MiniMindConfig
from model.moe import MoEFeedForward, load_balance_loss, naive_experts_forward


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
