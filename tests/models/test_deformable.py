"""The gather-based ``ms_deform_attn`` and the module that runs it, against the grid_sample reference."""

from __future__ import annotations

import pytest
import torch

from gdino.models.grounding_dino.deformable import (
    MultiScaleDeformableAttention,
    ms_deform_attn,
    ms_deform_attn_reference,
)
from gdino.models.grounding_dino.ops import deformable

SHAPES = [(6, 7), (1, 5), (4, 1), (3, 3), (1, 1)]  # (H, W): 1xN, Nx1 and 1x1 levels included


def _inputs(
    b: int = 2,
    q: int = 9,
    n_heads: int = 3,
    head_dim: int = 4,
    n_points: int = 2,
    shapes: list[tuple[int, int]] = SHAPES,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """value, shapes, locations in [-0.3, 1.3] (many samples partly or wholly outside the map), weights."""
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, n_heads, head_dim, generator=g).to(dtype)
    locations = (torch.rand(b, q, n_heads, len(shapes), n_points, 2, generator=g) * 1.6 - 0.3).to(dtype)
    weights = torch.rand(b, q, n_heads, len(shapes), n_points, generator=g).to(dtype)
    return value, shapes, locations, weights


@pytest.mark.parametrize("b", [1, 2])
def test_matches_reference(b: int) -> None:
    args = _inputs(b=b)
    out = ms_deform_attn(*args)
    assert out.shape == (b, 9, 3 * 4) and out.dtype == torch.float32
    torch.testing.assert_close(out, ms_deform_attn_reference(*args), atol=1e-5, rtol=1e-5)


def test_matches_reference_at_encoder_like_shapes() -> None:
    shapes = [(20, 30), (10, 15), (5, 8), (3, 4)]
    args = _inputs(b=1, q=300, n_heads=8, head_dim=32, n_points=4, shapes=shapes, seed=1)
    torch.testing.assert_close(ms_deform_attn(*args), ms_deform_attn_reference(*args), atol=1e-5, rtol=1e-5)


def test_edges_pixel_centres_and_far_outside() -> None:
    """Exact map edges, pixel centres and corners, and points far outside (which read exact zeros)."""
    value, shapes, _, _ = _inputs(b=1, q=1)
    special = torch.tensor([-7.0, -0.5, -1e-7, 0.0, 1 / 14, 0.25, 0.5, 1 - 1e-7, 1.0, 1 + 1 / 14, 1.5, 9.0])
    xy = torch.cartesian_prod(special, special)  # (144, 2)
    q = xy.shape[0]
    locations = xy.view(1, q, 1, 1, 1, 2).expand(1, q, 3, len(shapes), 2, 2).contiguous()
    weights = torch.rand(1, q, 3, len(shapes), 2, generator=torch.Generator().manual_seed(2))
    out = ms_deform_attn(value, shapes, locations, weights)
    torch.testing.assert_close(out, ms_deform_attn_reference(value, shapes, locations, weights), atol=1e-5, rtol=1e-5)
    far = (xy.abs() > 2).any(-1)
    assert far.any() and (out[0, far] == 0).all()


def test_non_finite_locations_give_nan_rather_than_an_error() -> None:
    value, shapes, locations, weights = _inputs(b=1, q=3)
    locations[0, 0, 0, 0, 0, 0] = float("nan")
    locations[0, 1, 0, 0, 0, 1] = float("inf")
    out = ms_deform_attn(value, shapes, locations, weights)
    assert out[0, :2, :4].isnan().all() and out[0, :2, 4:].isfinite().all() and out[0, 2].isfinite().all()


def test_chunks_straddling_the_batch_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _inputs(b=2, q=9)
    expected = ms_deform_attn(*args)
    k = 3 * len(SHAPES) * 2  # samples per query row
    monkeypatch.setattr(deformable, "STEP_ELEMENTS", 4 * k)  # 18 rows in steps of 4: one spans both images
    torch.testing.assert_close(ms_deform_attn(*args), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ms_deform_attn(*args), ms_deform_attn_reference(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_gradients_match_reference(monkeypatch: pytest.MonkeyPatch, chunk_rows: int | None) -> None:
    if chunk_rows:
        monkeypatch.setattr(deformable, "STEP_ELEMENTS", chunk_rows * 3 * len(SHAPES) * 2)
    value, shapes, locations, weights = _inputs(b=2)
    upstream = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(3))
    grads = []
    for fn in (ms_deform_attn, ms_deform_attn_reference):
        leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
        (fn(leaves[0], shapes, leaves[1], leaves[2]) * upstream).sum().backward()
        grads.append([t.grad for t in leaves])
    for ours, theirs, name in zip(*grads, ("value", "sampling_locations", "attention_weights")):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation)
def test_gradcheck_float64() -> None:
    value, shapes, locations, weights = _inputs(b=2, q=3, n_heads=2, head_dim=2, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, shapes, loc, w), leaves)


def test_bfloat16_close_to_float64_reference() -> None:
    value, shapes, locations, weights = _inputs(b=2, q=200, n_heads=4, head_dim=8, dtype=torch.bfloat16)
    out = ms_deform_attn(value, shapes, locations, weights)
    assert out.dtype == torch.bfloat16
    exact = ms_deform_attn_reference(value.double(), shapes, locations.double(), weights.double())
    # Coordinates and weights are worked out in float32; only the values and the sum are bfloat16.
    torch.testing.assert_close(out.double(), exact, atol=5e-2, rtol=2e-2)


def test_inference_mode_and_empty_queries() -> None:
    args = _inputs()
    with torch.inference_mode():
        out = ms_deform_attn(*args)
    torch.testing.assert_close(out, ms_deform_attn_reference(*args), atol=1e-5, rtol=1e-5)
    value, shapes, locations, weights = args
    empty = ms_deform_attn(value, shapes, locations[:, :0], weights[:, :0])
    assert empty.shape == (2, 0, 12)


def _module_reference(module: MultiScaleDeformableAttention, query, reference_points, value, shapes, mask):
    """The module's computation before the fast path: two Linear layers and the grid_sample core."""
    b, q, _ = query.shape
    v = module.value_proj(value).masked_fill(mask[..., None], 0.0).view(b, value.shape[1], module.n_heads, -1)
    shape = (b, q, module.n_heads, module.n_levels, module.n_points)
    offsets = module.sampling_offsets(query).view(*shape, 2)
    weights = module.attention_weights(query).view(b, q, module.n_heads, -1).softmax(-1).view(shape)
    locations = module._sampling_locations(reference_points, offsets, shapes)
    return module.output_proj(ms_deform_attn_reference(v, shapes, locations, weights))


@pytest.mark.parametrize("coords", [2, 4])
def test_module_matches_reference_path(coords: int) -> None:
    torch.manual_seed(4)
    shapes = SHAPES[:4]
    module = MultiScaleDeformableAttention(32, len(shapes), 4, 3)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    s = sum(h * w for h, w in shapes)
    query, value = torch.randn(2, 7, 32), torch.randn(2, s, 32)
    reference = torch.rand(2, 7, len(shapes), coords)
    mask = torch.rand(2, s) < 0.2
    out = module(query, reference, value, shapes, mask)
    expected = _module_reference(module, query, reference, value, shapes, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Gradients reach both (still separate) projections through the fused matmul.
    out.square().sum().backward()
    ours = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    _module_reference(module, query, reference, value, shapes, mask).square().sum().backward()
    for name, p in module.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_module_parameter_names_unchanged() -> None:
    names = set(MultiScaleDeformableAttention(32, 4, 4, 3).state_dict())
    assert names == {
        f"{layer}.{kind}"
        for layer in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        for kind in ("weight", "bias")
    }


def test_bilinear_by_hand() -> None:
    value = torch.arange(1.0, 7.0).view(1, 6, 1, 1)  # one level 2x3: [[1, 2, 3], [4, 5, 6]]
    loc = torch.tensor([[0.5, 0.5], [0.0, 0.0], [1 / 6, 0.25]]).view(1, 3, 1, 1, 1, 2)
    out = ms_deform_attn(value, [(2, 3)], loc, torch.ones(1, 3, 1, 1, 1))
    # map centre: halfway between 2 and 5; top-left corner: a quarter of pixel (0, 0); centre of pixel (0, 0)
    torch.testing.assert_close(out.flatten(), torch.tensor([3.5, 0.25, 1.0]))


def test_rejects_spatial_shapes_that_do_not_match() -> None:
    value, shapes, locations, weights = _inputs()
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, shapes[:-1], locations[:, :, :, :-1], weights[:, :, :, :-1])
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, shapes[:-1], locations, weights)


def test_cpu_backward_pieces_equal_embedding_bags_own() -> None:
    """The sorted table gradient and the weights' gradient that ``_SampledGather`` uses equal
    ``embedding_bag``'s autograd, with a row many bags read and (likely) rows none reads."""
    g = torch.Generator().manual_seed(3)
    rows, k, hd = 400, 12, 8
    index = torch.randint(0, rows, (300, k), generator=g, dtype=torch.int32)
    index[:, 0] = 7
    table = torch.randn(rows, hd, generator=g).requires_grad_()
    weights = torch.rand(300, k, generator=g).requires_grad_()
    upstream = torch.randn(300, hd, generator=g)
    out = torch.nn.functional.embedding_bag(index, table, mode="sum", per_sample_weights=weights)
    (out * upstream).sum().backward()
    ours_table = deformable._table_gradient(index, weights.detach(), upstream, rows)
    torch.testing.assert_close(ours_table, table.grad, atol=1e-5, rtol=1e-5)
    assert ours_table[7].abs().sum() > 0
    torch.testing.assert_close(
        deformable._weights_gradient(index, table.detach(), upstream), weights.grad, atol=1e-5, rtol=1e-5
    )


def test_training_keeps_only_locations_and_weights() -> None:
    """Under autograd the corner indices and weights (4x the samples) are recomputed in the
    backward, not kept: what the step saves is the table and its inputs."""
    value, shapes, locations, weights = _inputs(b=2, q=9)
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2])
    k = weights[0, 0].numel()  # nH * nL * nP samples per query
    assert (2 * 9, 2, k) in saved and (2 * 9, k) in saved
    assert all(shape[-1] != 4 * k // weights.shape[2] for shape in saved)  # no (bags, 4 * nL * nP) tensor


def test_cpu_backward_is_deterministic() -> None:
    value, shapes, locations, weights = _inputs(b=2, q=300, n_heads=4, head_dim=8, n_points=4)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
        ms_deform_attn(leaves[0], shapes, leaves[1], leaves[2]).square().sum().backward()
        runs.append([t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
