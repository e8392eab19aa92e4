"""The Triton predictor aggregation against predictor_pool_ref: output and both gradients, over keep sets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from stpcore.kernels import predictor_pool as kpp  # noqa: E402
from stpcore.ops import dispatch, predictor_pool, predictor_pool_ref  # noqa: E402
from stpcore.testing import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP = "predictor_pool"
KEEP_SETS = ["all", "none", "one", "random", "fractional"]


def _keep(mode, B, N, generator=None, device=DEVICE):
    if mode == "all":
        keep = torch.ones(B, N)
    elif mode == "none":
        keep = torch.zeros(B, N)
    elif mode == "one":
        keep = torch.zeros(B, N)
        keep[torch.arange(B), torch.randint(N, (B,), generator=generator)] = 1.0
    elif mode == "random":
        keep = (torch.rand(B, N, generator=generator) > 0.5).float()
    else:
        keep = torch.rand(B, N, generator=generator)
    return keep.to(device)


def _run(fn, x, keep, num_slots, grad, dtype):
    x = x.detach().to(dtype).requires_grad_()
    keep = keep.detach().clone().requires_grad_()
    out = fn(x, keep, num_slots)
    d_x, d_keep = torch.autograd.grad(out, (x, keep), grad.to(dtype))
    return out, d_x, d_keep


def _check(B, num_slots, per_slot, C, mode, dtype, generator=None, device=DEVICE):
    N = num_slots * per_slot
    x = torch.randn(B, N, C, generator=generator).to(device)
    keep = _keep(mode, B, N, generator, device)
    grad = torch.randn(B, N, C, generator=generator).to(device)
    got = _run(lambda *a: predictor_pool(*a, backend="triton"), x, keep, num_slots, grad, dtype)
    ref = _run(predictor_pool_ref, x, keep, num_slots, grad, torch.float32)
    lowp = _run(predictor_pool_ref, x, keep, num_slots, grad, dtype) if dtype != torch.float32 else (None,) * 3
    # The output and d_x element by element. A keep gradient is a difference of sums over its slot and its video
    # (<g, x_m> - <g, F>), which can cancel: fp32 leaves an error relative to the video's largest gradient, not to
    # the element, so d_keep is compared relative to that (an empty slot's is bounded now, as large as any other's).
    for name, a, r, s in zip(("out", "d_x"), got[:2], ref[:2], lowp[:2], strict=True):
        assert_close(a, r, op=OP, dtype=dtype, name=name, lowp_reference=s)
    scale = ref[2].abs().amax(-1, keepdim=True).clamp_min(1.0)  # (B, 1)
    assert_close(got[2] / scale, ref[2] / scale, op=OP, dtype=dtype, name="d_keep (relative to the video's largest)",
                 lowp_reference=None if lowp[2] is None else lowp[2] / scale)
    assert got[0].dtype == dtype and got[2].dtype == keep.dtype


@pytest.mark.parametrize("mode", KEEP_SETS)
@pytest.mark.parametrize(
    "B,num_slots,per_slot,C",
    [(1, 1, 1, 3), (2, 8, 49, 12), (3, 3, 5, 9), (1, 2, 97, 6)],
    ids=["B1-S1-N1-C3", "B2-S8-N392-C12", "B3-S3-N15-C9", "B1-S2-N194-C6"],
)
def test_matches_reference_fp32(B, num_slots, per_slot, C, mode):
    _check(B, num_slots, per_slot, C, mode, torch.float32)


@pytest.mark.parametrize("mode", KEEP_SETS)  # empty slots ("none", "one") too: their keep gradient is bounded
def test_matches_reference_fp16(mode):
    _check(2, 8, 49, 12, mode, torch.float16)


@settings(max_examples=10, deadline=None)
@given(
    B=st.integers(1, 2),
    num_slots=st.integers(1, 8),
    per_slot=st.integers(1, 60),
    third=st.integers(1, 20),
    mode=st.sampled_from(KEEP_SETS),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_hypothesis(B, num_slots, per_slot, third, mode, seed):
    _check(B, num_slots, per_slot, 3 * third, mode, torch.float32, generator=torch.Generator().manual_seed(seed))


def test_strided_inputs():
    base = torch.randn(2, 16, 10, device=DEVICE)
    x = base[:, :, 1:7]  # (2, 16, 6) channel-sliced view
    keep = torch.rand(16, 2, device=DEVICE).t()  # (2, 16), column-major
    assert_close(predictor_pool(x, keep, 4, backend="triton"), predictor_pool_ref(x, keep, 4), op=OP)
    x_t = torch.randn(2, 6, 16, device=DEVICE).transpose(1, 2)  # (2, 16, 6), non-unit channel stride
    assert_close(predictor_pool(x_t, keep, 4, backend="triton"), predictor_pool_ref(x_t, keep, 4), op=OP)


def test_not_supported_reasons():
    x, keep = torch.zeros(2, 8, 6), torch.ones(2, 8)
    assert kpp.not_supported_reasons(x, keep, 2) == []
    assert kpp.not_supported_reasons(x.double(), keep, 2)
    assert kpp.not_supported_reasons(x, keep.bool(), 2)
    if dispatch.triton_interpret():
        assert kpp.not_supported_reasons(x.bfloat16(), keep, 2)


def test_dispatch_picks_reference_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.select("predictor_pool", None, torch.zeros(2, 8, 6), torch.ones(2, 8), 2).name == "reference"


# Reduced matrix (the GPU script's): N = 392 in every dtype and mode, the later stages in bf16 with a 0/1 keep;
# the rest runs with STPCORE_FULL_MATRIX=1.
GPU_CASES = [
    pytest.param(N, dtype, mode, id=f"N{N}-{name}-{mode}",
                 marks=() if N == 392 or (dtype, mode) == (torch.bfloat16, "random") else pytest.mark.full_matrix)
    for N in (392, 272, 192)
    for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16"))
    for mode in ("all", "random", "fractional")
]


@pytest.mark.gpu
@pytest.mark.parametrize("N, dtype, mode", GPU_CASES)
def test_gpu_matrix(N, dtype, mode):
    """The paper's predictor inputs: B=32, D=384, 8 slots."""
    _check(32, 8, N // 8, 384, mode, dtype, device="cuda")
