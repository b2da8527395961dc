"""The fused Triton kernels of ``ms_deform_attn`` against the grid_sample reference, on CPU.

The kernels run in triton's interpreter (``TRITON_INTERPRET=1``: numpy on CPU tensors), which
checks their arithmetic, masking and atomics, not their GPU compilation or speed.

Why a child process: ``triton.jit`` chooses between compiling and interpreting when it decorates a
function, from TRITON_INTERPRET at that moment, and that includes triton's own helpers (``tl.zeros``
is a ``@triton.jit`` function of ``triton.language.standard``, decorated when triton is first
imported). So the variable must be set before triton itself is imported, which in this process
has already happened (``pytest.importorskip`` below, and other tests or torch may import it too);
setting it now and re-importing only our module gives interpreted kernels that call compiled
helpers and fail. Instead, ``kernel_results`` runs this file as a script once, in a fresh
interpreter with TRITON_INTERPRET=1: the child runs the kernels on every case built here and
sends back outputs and gradients (a ``torch.save`` file), and the tests compare them here, with
the reference computed in this process. One child, one torch import (~2 s of the ~5 s total).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from gdino.models.grounding_dino.deformable import ms_deform_attn, ms_deform_attn_reference

Args = tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor, torch.Tensor]

SHAPES = [(5, 7), (3, 3), (1, 5), (3, 1), (1, 1)]  # (H, W), odd sizes, 1xN, Nx1 and 1x1 included
# Exact map edges (0, 1), a pixel centre of the 7-wide level (1 / 14), points just inside and outside.
SPECIAL = [-0.5, -1e-7, 0.0, 1 / 14, 0.5, 1 - 1e-7, 1.0, 1.25]


def _inputs(
    b: int = 2,
    q: int = 6,
    n_heads: int = 2,
    head_dim: int = 8,
    n_points: int = 3,
    shapes: list[tuple[int, int]] = SHAPES,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Args:
    """value, shapes, locations, weights. Locations are random in [-0.3, 1.3] (many samples partly or
    wholly outside), and the first query's are all combinations of SPECIAL (edges, outside, centres).
    The default nL * nP = 15 samples per head pad to 16 lanes in the kernels."""
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, n_heads, head_dim, generator=g, dtype=torch.float64)
    locations = torch.rand(b, q, n_heads, len(shapes), n_points, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    if q:
        special = torch.tensor(SPECIAL, dtype=torch.float64)
        grid = torch.cartesian_prod(special, special)  # (len(SPECIAL) ** 2, 2)
        first = locations[:, 0].reshape(-1, 2)  # the first query's samples, (b * nH * nL * nP, 2)
        locations[:, 0] = grid[torch.arange(first.shape[0]) % grid.shape[0]].view_as(locations[:, 0])
    weights = torch.rand(b, q, n_heads, len(shapes), n_points, generator=g, dtype=torch.float64)
    return value.to(dtype), shapes, locations.to(dtype), weights.to(dtype)


def _grad_out(args: Args, seed: int = 3) -> torch.Tensor:
    value, _, locations, _ = args
    shape = (*locations.shape[:2], value.shape[2] * value.shape[3])  # (B, Q, nH*hd)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(value.dtype)


def _run(fn: Any, args: Args, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(out, grad_value, grad_locations, grad_weights) of ``fn`` for the given grad_out."""
    value, shapes, locations, weights = (a.detach().requires_grad_() if torch.is_tensor(a) else a for a in args)
    out = fn(value, shapes, locations, weights)
    return (out.detach(), *torch.autograd.grad(out, (value, locations, weights), grad_out))


def _cases() -> dict[str, tuple[Args, torch.Tensor]]:
    """Every input the child runs the kernels on: name -> (args, grad_out)."""
    cases: dict[str, tuple[Args, torch.Tensor]] = {}
    for dtype in (torch.float32, torch.float64):
        args = _inputs(dtype=dtype, seed=1)
        cases[str(dtype)] = (args, _grad_out(args))
    # Every query samples the same points: many programs add into the same grad_value rows.
    value, shapes, locations, weights = _inputs(q=5, dtype=torch.float64, seed=2)
    args = (value, shapes, locations[:, 1:2].expand_as(locations).contiguous(), weights)
    cases["same points"] = (args, _grad_out(args))
    # The model's configuration: 8 heads of 32, 4 levels, 4 points (16 lanes, no padding).
    args = _inputs(b=1, q=3, n_heads=8, head_dim=32, n_points=4, shapes=[(5, 7), (3, 4), (2, 2), (1, 1)], seed=3)
    cases["model config"] = (args, _grad_out(args))
    # Half precision, and the same rounded inputs and grad_out in fp32.
    for dtype in (torch.bfloat16, torch.float16):
        args = _inputs(dtype=dtype, seed=4)
        grad_out = _grad_out(args)
        cases[str(dtype)] = (args, grad_out)
        cases[f"{dtype} as float32"] = (tuple(a.float() if torch.is_tensor(a) else a for a in args), grad_out.float())
    # Mixed, as the module runs a bf16 layer: bf16 values, fp32 locations and weights.
    value, shapes, locations, weights = _inputs(seed=6)
    args = (value.bfloat16(), shapes, locations, weights)
    grad_out = _grad_out(args)
    cases["mixed"] = (args, grad_out)
    cases["mixed as float32"] = ((value.bfloat16().float(), shapes, locations, weights), grad_out.float())
    # Far outside every level.
    value, shapes, locations, weights = _inputs(seed=5)
    args = (value, shapes, torch.full_like(locations, 9.0), weights)
    cases["far outside"] = (args, _grad_out(args))
    return cases


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The kernels' (out, grad_value, grad_locations, grad_weights) for every case, from one child
    process running this file with TRITON_INTERPRET=1 (see the module docstring)."""
    folder = tmp_path_factory.mktemp("triton-interpret")
    torch.save(_cases(), folder / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, str(folder / "cases.pt"), str(folder / "results.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(folder / "results.pt", weights_only=True)


def _assert_close(ours: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], **tol: float) -> None:
    for name, a, b in zip(("out", "grad_value", "grad_locations", "grad_weights"), ours, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    ("case", "tol"),
    [
        ("torch.float32", 1e-5),
        ("torch.float64", 1e-12),
        ("same points", 1e-12),
        ("model config", 1e-5),
        ("far outside", 0.0),
    ],
)
@pytest.mark.slow  # the kernels in triton's interpreter
def test_matches_reference(kernel_results: dict[str, Any], case: str, tol: float) -> None:
    """Output and all three gradients equal the grid_sample reference's (autograd)."""
    args, grad_out = _cases()[case]
    _assert_close(kernel_results[case], _run(ms_deform_attn_reference, args, grad_out), atol=tol, rtol=tol)
    if case == "far outside":
        assert (kernel_results[case][0] == 0).all()


@pytest.mark.slow  # the kernels in triton's interpreter
@pytest.mark.parametrize("case", ["torch.bfloat16", "torch.float16", "mixed"])
def test_half_precision_agrees_with_float32(kernel_results: dict[str, Any], case: str) -> None:
    """Half inputs are read as they are and accumulated in fp32, so outputs and gradients differ from
    the fp32 run on the same (rounded) inputs and grad_out only by their own final rounding. "mixed"
    is bf16 values with fp32 locations and weights (whose gradients stay fp32)."""
    ours = kernel_results[case]
    full = kernel_results[f"{case} as float32"]
    half = torch.float16 if case == "torch.float16" else torch.bfloat16
    expected = [half, half] + ([torch.float32] * 2 if case == "mixed" else [half] * 2)
    assert [t.dtype for t in ours] == expected
    # One final rounding to 11 (fp16) significant bits: relative error 2**-11 at most. For bf16 (8 bits)
    # that would be 2**-8 on a GPU (fp32 -> bf16 rounds to nearest even there), but triton's
    # interpreter converts fp32 -> bf16 by truncating the mantissa: up to 2**-7.
    rtol = 2**-11 if half == torch.float16 else 2**-7
    for name, a, b, dtype in zip(("out", "grad_value", "grad_locations", "grad_weights"), ours, full, expected):
        tol = {"atol": 1e-5, "rtol": rtol if dtype != torch.float32 else 1e-5}
        torch.testing.assert_close(a.float(), b, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_bad_arguments_raise_value_error() -> None:
    """Checked before any kernel runs (so here, with the compiled-mode module)."""
    from gdino.models.grounding_dino.ops.deformable_triton import ms_deform_attn_triton, supported_head_dim

    assert [d for d in range(1, 70) if supported_head_dim(d)] == [1, 2, 4, 8, 16, 32, 64]
    value, shapes, locations, weights = _inputs(q=1, head_dim=6)
    with pytest.raises(ValueError, match="power-of-two head dim, not 6"):
        ms_deform_attn_triton(value, shapes, locations, weights)
    value, shapes, locations, weights = _inputs(q=1)
    with pytest.raises(ValueError, match="do not match"):
        ms_deform_attn_triton(value, shapes[:-1], locations[:, :, :, :-1], weights[:, :, :, :-1])
    with pytest.raises(ValueError, match="do not match"):
        ms_deform_attn_triton(value, shapes, locations, weights[..., :-1])
    from gdino.models.grounding_dino.ops import deformable_triton

    if not deformable_triton._INTERPRETED:  # compiled kernels, CPU tensors
        with pytest.raises(ValueError, match="CUDA"):
            ms_deform_attn_triton(value, shapes, locations, weights)


@pytest.mark.parametrize(
    ("value_dtype", "location_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]
)
@pytest.mark.slow  # compiles the kernels
def test_kernels_compile_for_a_gpu(value_dtype: torch.dtype, location_dtype: torch.dtype) -> None:
    """The interpreter runs kernels as Python, so it misses what only the compiler rejects: compile
    both kernels for sm_80 at the model's sizes, no GPU needed (triton's wheel ships ptxas)."""
    from gdino.models.grounding_dino.ops import deformable_triton as m

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # another triton layout
        pytest.skip(f"no ahead-of-time compile API: {e}")
    if m._INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set in this process")
    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    v, loc = names[value_dtype], names[location_dtype]
    pointers = {"value_ptr": v, "out_ptr": v, "grad_out_ptr": v, "grad_value_ptr": "fp32", "shapes_ptr": "i32"}
    pointers |= {"starts_ptr": "i32", "loc_ptr": loc, "attn_ptr": loc, "grad_loc_ptr": loc, "grad_attn_ptr": loc}
    constants = m._constants(8, 4, 4, 32, value_dtype)
    for kernel, per_thread in ((m._fwd_kernel, 4), (m._bwd_kernel, 2)):
        # Pointers typed, the rest constexpr or i32 (Q, S).
        signature = {n: "*" + pointers[n] if n in pointers else "i32" for n in kernel.arg_names}
        signature |= dict.fromkeys(constants, "constexpr")
        compiled = m.triton.compile(
            ASTSource(kernel, signature, constants),
            target=GPUTarget("cuda", 80, 32),
            options={"num_warps": m._num_warps(constants, per_thread), "enable_fp_fusion": True},
        )
        assert compiled.asm["cubin"]
        if kernel is m._bwd_kernel:
            assert "red.global.gpu.relaxed.add.f32" in compiled.asm["ptx"]  # grad_value adds, fp32 buffer


def test_availability_and_no_dispatch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import ModuleType

    from gdino.models.grounding_dino.ops.deformable_triton import triton_available

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_available(torch.device("cpu")) and triton_available("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available("cpu")
    # ms_deform_attn keeps its PyTorch path for CPU tensors, even in interpreter mode.
    fake = ModuleType("gdino.models.grounding_dino.ops.deformable_triton")
    fake.triton_available = fake.supported_head_dim = lambda *_: True  # type: ignore[attr-defined]
    fake.ms_deform_attn_triton = lambda *_: pytest.fail("dispatched CPU tensors")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gdino.models.grounding_dino.ops.deformable_triton", fake)
    args = _inputs(q=2)
    torch.testing.assert_close(ms_deform_attn(*args), ms_deform_attn_reference(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation)
def test_package_imports_without_triton() -> None:
    code = """if True:
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch, gdino
        from gdino.models.grounding_dino.ops import deformable_triton as m
        from gdino.models.grounding_dino.deformable import ms_deform_attn
        assert m.triton is None and not m.triton_available("cuda")
        try:
            zeros = torch.zeros
            m.ms_deform_attn_triton(zeros(1, 1, 1, 2), [(1, 1)], zeros(1, 1, 1, 1, 1, 2), zeros(1, 1, 1, 1, 1))
        except RuntimeError as e:
            assert "pip install triton" in str(e)
        else:
            raise AssertionError("no error without triton")
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _child(cases_path: str, results_path: str) -> None:
    """Runs in the child process (TRITON_INTERPRET=1 set before anything imported triton)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from gdino.models.grounding_dino.ops import deformable_triton

    assert deformable_triton._INTERPRETED
    torch.set_num_threads(1)
    cases = torch.load(cases_path, weights_only=True)
    kernel = deformable_triton.ms_deform_attn_triton
    results = {name: _run(kernel, args, grad_out) for name, (args, grad_out) in cases.items()}
    value, shapes, locations, weights = cases["torch.float32"][0]
    empty = deformable_triton.ms_deform_attn_triton(value, shapes, locations[:, :0], weights[:, :0])
    assert empty.shape == (2, 0, 16), empty.shape
    torch.save(results, Path(results_path))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
