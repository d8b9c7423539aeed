"""The opt-in CUDA C++ W8A8 GEMM (csrc/w8a8_gemm.cu) against the fp32 references, every variant and epilogue.

Runs only on a compute-capability-9.0 GPU where nvcc can build the kernel; outputs are poisoned before each run.
"""

from __future__ import annotations

import pytest
import torch

from engine.ops import int8_linear as w8a8
from engine.ops import w8a8_cuda

pytestmark = pytest.mark.gpu

# Wan 1.3B-480P (M = 32760: ragged last row tile) and 14B-720P shapes; last: K % 128 ≠ 0 (but % 16 = 0), M and N
# ragged.
SHAPES = [(32760, 1536, 1536), (32760, 8960, 1536), (75600, 5120, 13824), (1000, 1008, 520)]
VARIANTS = [0, 1]  # 1: ping-pong consumers


@pytest.fixture(autouse=True)
def _needs_kernel() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    if w8a8_cuda._library() is None:
        pytest.fail("the CUDA kernel did not build (see the log warning)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _operands(m: int, k: int, n: int, fmt: str = "int8") -> tuple[torch.Tensor, ...]:
    x = torch.randn(m, k, device="cuda")
    x[:, torch.randint(0, k, (8,), device="cuda")] *= 10.0  # outlier channels
    a, a_scale = w8a8.quantize_blockwise(x.bfloat16(), fmt)  # type: ignore[arg-type]
    b, b_scale = w8a8.quantize_blockwise((torch.randn(n, k, device="cuda") * 0.02).bfloat16(), fmt)  # type: ignore[arg-type]
    return a, a_scale, b, b_scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32, None])
def test_store_matches_reference(shape: tuple[int, int, int], variant: int, bias_dtype: torch.dtype | None) -> None:
    m, k, n = shape
    a, a_scale, b, b_scale = _operands(m, k, n)
    bias = torch.randn(n, device="cuda").to(bias_dtype) if bias_dtype is not None else None
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    w8a8_cuda.block_scaled_mm_cuda(a, a_scale, b, b_scale, bias, out, variant=variant)
    expected = w8a8.block_scaled_mm_reference(a, a_scale, b, b_scale, bias)  # fp32
    assert torch.isfinite(out).all()
    # bf16 output rounding only: each element within half a bf16 step of the fp32 result, plus the fp32 summation
    # order of the two (a random walk over K terms: ~1e-7 per term of magnitude ~1).
    excess = (out.float() - expected).abs() - expected.abs() * 2.0**-8 - 2e-6 * k**0.5
    assert excess.max().item() <= 0, f"{(excess > 0).sum().item()} elements off, worst at {divmod(excess.argmax().item(), n)}"
    assert _rel(out, expected) <= 2e-3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp8_store_matches_reference(shape: tuple[int, int, int], variant: int) -> None:
    m, k, n = shape
    a, a_scale, b, b_scale = _operands(m, k, n, "fp8")
    bias = torch.randn(n, device="cuda").bfloat16()
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    w8a8_cuda.block_scaled_mm_cuda(a, a_scale, b, b_scale, bias, out, variant=variant)
    expected = w8a8.block_scaled_mm_reference(a, a_scale, b, b_scale, bias)  # fp32
    assert torch.isfinite(out).all()
    # bf16 rounding (1.7e-3) plus Hopper's reduced-precision accumulation inside each e4m3 wgmma, as the Triton FP8
    # test (docs/notes/linear.md).
    assert _rel(out, expected) <= 2.5e-3


@pytest.mark.parametrize("shape", [(75600, 13824, 5120), (1000, 1008, 520)])
def test_residual_matches_unfused_chain(shape: tuple[int, int, int]) -> None:
    m, k, n = shape
    a, a_scale, b, b_scale = _operands(m, k, n)
    bias = torch.randn(n, device="cuda").bfloat16()
    gate = torch.randn(2 if m % 2 == 0 else 1, n, device="cuda")
    residual = torch.randn(m, n, device="cuda") * 4
    y = w8a8.block_scaled_mm_reference(a, a_scale, b, b_scale, bias, torch.bfloat16).float()
    update = y * gate.repeat_interleave(m // gate.shape[0], dim=0)
    expected = residual + update
    w8a8_cuda.block_scaled_mm_cuda(a, a_scale, b, b_scale, bias, residual, epilogue="residual", gate=gate)
    # one bf16 step of the update where the fp32 sums round the other way, plus their summation-order difference
    bound = update.abs() * 2.0**-7 + 1e-6 * expected.abs() + 2e-6 * k**0.5 * gate.abs().max()
    excess = (residual - expected).abs() - bound
    assert excess.max().item() <= 0, f"{(excess > 0).sum().item()} elements off, worst at {divmod(excess.argmax().item(), n)}"


@pytest.mark.parametrize("shape", [(32760, 1536, 8960), (1000, 1008, 520)])
def test_gelu_quant_matches_unfused_chain(shape: tuple[int, int, int]) -> None:
    m, k, n = shape
    a, a_scale, b, b_scale = _operands(m, k, n)
    bias = torch.randn(n, device="cuda").bfloat16()
    q = torch.full((m, n), 77, dtype=torch.int8, device="cuda")
    scale = torch.full(((m + 127) // 128, (n + 127) // 128), float("nan"), device="cuda")
    w8a8_cuda.block_scaled_mm_cuda(a, a_scale, b, b_scale, bias, q, epilogue="gelu_quant", q_scale=scale)
    q_ref, scale_ref = w8a8.block_scaled_mm_gelu_quant_reference(a, a_scale, b, b_scale, bias)
    # As the Triton epilogue's test: a flipped bf16 rounding moves a block's amax by one bf16 step and a few
    # values by one int8 step.
    torch.testing.assert_close(scale, scale_ref, rtol=2.0**-7, atol=0)
    assert (q.int() - q_ref.int()).abs().max() <= 1
    assert (q == q_ref).float().mean() >= 0.99


def test_linear_layers_take_the_cuda_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the opt-in on, Int8FeedForward routes through the CUDA kernel and equals the Triton kernel's result."""
    m, d, f = 4096, 1536, 8960
    fc1 = torch.nn.Linear(d, f, device="cuda", dtype=torch.bfloat16)
    fc2 = torch.nn.Linear(f, d, device="cuda", dtype=torch.bfloat16)
    ffn = w8a8.Int8FeedForward(w8a8.Int8Linear.from_linear(fc1), w8a8.Int8Linear.from_linear(fc2))
    x = torch.randn(1, m, d, device="cuda").bfloat16()
    residual = torch.randn(1, m, d, device="cuda")
    gate = torch.randn(1, 1, d, device="cuda")
    epilogues: list[str] = []
    original = w8a8_cuda.block_scaled_mm_cuda

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        epilogues.append(str(kwargs.get("epilogue", "store")))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(w8a8_cuda, "ENABLED", True)
    monkeypatch.setattr(w8a8_cuda, "block_scaled_mm_cuda", spy)
    cuda_out = ffn(x)
    cuda_residual = ffn.add_to_residual(x, residual.clone(), gate)
    assert epilogues == ["gelu_quant", "store", "gelu_quant", "residual"]

    monkeypatch.setattr(w8a8_cuda, "usable", lambda *args: False)
    triton_out = ffn(x)
    triton_residual = ffn.add_to_residual(x, residual.clone(), gate)
    assert len(epilogues) == 4
    assert _rel(cuda_out, triton_out) <= 5e-3  # one int8 step of the hidden activation in rare elements
    assert _rel(cuda_residual, triton_residual) <= 5e-3
