"""The feed-forward block: chunked (inference) and whole (autograd) give the plain formula."""

from __future__ import annotations

import torch
from torch import nn

from gdino.models.grounding_dino import ffn


def _plain(x, l1, l2):
    return x + l2(torch.relu(l1(x)))


def test_chunked_equals_plain_and_autograd_path_too(monkeypatch):
    monkeypatch.setattr(ffn, "ROWS_PER_STEP", 7)  # several steps, the last one partial
    torch.manual_seed(0)
    l1, l2 = nn.Linear(16, 40), nn.Linear(40, 16)
    x = torch.randn(2, 25, 16)
    with torch.no_grad():
        expected = _plain(x, l1, l2)
        torch.testing.assert_close(ffn.residual_ffn(x, l1, l2), expected, atol=1e-6, rtol=0)
        for dtype in (torch.float64, torch.bfloat16):
            l1d, l2d = l1.to(dtype), l2.to(dtype)
            got = ffn.residual_ffn(x.to(dtype), l1d, l2d)
            torch.testing.assert_close(
                got, _plain(x.to(dtype), l1d, l2d), atol=2e-2 if dtype == torch.bfloat16 else 1e-12, rtol=0
            )
        l1, l2 = l1.float(), l2.float()
    y = x.clone().requires_grad_()
    ffn.residual_ffn(y, l1, l2).sum().backward()
    z = x.clone().requires_grad_()
    _plain(z, l1, l2).sum().backward()
    torch.testing.assert_close(y.grad, z.grad, atol=1e-6, rtol=0)


def test_chunked_with_another_activation_and_residual(monkeypatch):
    monkeypatch.setattr(ffn, "ROWS_PER_STEP", 5)
    torch.manual_seed(1)
    l1, l2 = nn.Linear(8, 32), nn.Linear(32, 8)
    x, r = torch.randn(3, 4, 4, 8), torch.randn(3, 4, 4, 8)
    with torch.no_grad():
        got = ffn.residual_ffn(x, l1, l2, torch.nn.functional.gelu, residual=r)
        torch.testing.assert_close(got, r + l2(torch.nn.functional.gelu(l1(x))), atol=1e-6, rtol=0)


def test_training_path_recomputes_the_hidden_activation_and_gives_autograds_gradients(monkeypatch):
    """Under autograd on CPU the block keeps only its input; every gradient (input, both weights,
    both biases) equals plain autograd's, for ReLU and GELU, over several row blocks."""
    monkeypatch.setattr(ffn, "ROWS_PER_STEP", 7)
    monkeypatch.setattr(ffn, "BACKWARD_ROWS_PER_STEP", 11)
    torch.manual_seed(2)
    for activation, plain_act in ((ffn._relu_, torch.relu), (torch.nn.functional.gelu, torch.nn.functional.gelu)):
        l1, l2 = nn.Linear(8, 24).double(), nn.Linear(24, 8).double()
        x = torch.randn(3, 10, 8, dtype=torch.float64, requires_grad=True)
        r = torch.randn(3, 10, 8, dtype=torch.float64, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.shape) or t, lambda t: t):
            out = ffn.residual_ffn(x, l1, l2, activation, residual=r)
        # The input and the weights only: no hidden activation (30 x 24).
        assert sorted(map(tuple, saved)) == [(8, 24), (24,), (24, 8), (30, 8)]
        upstream = torch.randn_like(out)
        grads = torch.autograd.grad(out, (x, r, *l1.parameters(), *l2.parameters()), upstream)
        expected_out = r + l2(plain_act(l1(x)))
        expected = torch.autograd.grad(expected_out, (x, r, *l1.parameters(), *l2.parameters()), upstream)
        torch.testing.assert_close(out, expected_out, atol=1e-12, rtol=0)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_training_path_with_frozen_weights_leaves_them_without_gradient():
    torch.manual_seed(3)
    l1, l2 = nn.Linear(8, 16), nn.Linear(16, 8)
    for p in (*l1.parameters(), *l2.parameters()):
        p.requires_grad_(False)
    x = torch.randn(40, 8, requires_grad=True)
    ffn.residual_ffn(x, l1, l2).square().sum().backward()
    z = x.detach().clone().requires_grad_()
    _plain(z, l1, l2).square().sum().backward()
    torch.testing.assert_close(x.grad, z.grad, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in (*l1.parameters(), *l2.parameters()))
