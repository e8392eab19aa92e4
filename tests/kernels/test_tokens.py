"""The Triton per-slot top-k, gather and scatter against the references (token moves are exact)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from stpcore.kernels import tokens as kernel  # noqa: E402
from stpcore.ops import (  # noqa: E402
    dispatch,
    gather_tokens,
    gather_tokens_ref,
    scatter_tokens,
    scatter_tokens_ref,
    slot_topk,
    slot_topk_gather,
    slot_topk_ref,
)
from stpcore.testing import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _distinct_scores(B, N, dtype=torch.float32, generator=None, device=DEVICE):
    """(B, N) scores, distinct within each video (a permutation of 0..N-1: exact in fp16 up to N = 2048)."""
    rows = [torch.randperm(N, generator=generator) for _ in range(B)]
    return torch.stack(rows).to(device=device, dtype=dtype)


def _check_tokens(B, num_slots, per_slot, k, C, dtype, scores_dtype=torch.float32, generator=None, device=DEVICE):
    N = num_slots * per_slot
    scores = _distinct_scores(B, N, scores_dtype, generator, device)
    x = torch.randn(B, N, C, generator=generator).to(device=device, dtype=dtype).requires_grad_()

    expected_idx = slot_topk_ref(scores, num_slots, k)
    assert torch.equal(slot_topk(scores, num_slots, k, backend="triton"), expected_idx)

    idx, kept = slot_topk_gather(scores, x, num_slots, k, backend="triton")
    expected_kept = gather_tokens_ref(x, expected_idx)
    assert idx.dtype == torch.int64 and torch.equal(idx, expected_idx)
    assert torch.equal(kept, expected_kept)
    grad = torch.randn(kept.shape, generator=generator).to(device=device, dtype=dtype)
    (d_x,) = torch.autograd.grad(kept, x, grad)
    (d_x_ref,) = torch.autograd.grad(expected_kept, x, grad)
    assert torch.equal(d_x, d_x_ref)

    gathered = gather_tokens(x, idx, backend="triton")
    assert torch.equal(gathered, expected_kept)
    assert torch.equal(torch.autograd.grad(gathered, x, grad)[0], d_x_ref)

    moved = kept.detach().requires_grad_()
    back = scatter_tokens(moved, idx, N, backend="triton")
    back_ref = scatter_tokens_ref(moved, idx, N)
    assert torch.equal(back, back_ref)
    grad_back = torch.randn(back.shape, generator=generator).to(device=device, dtype=dtype)
    assert torch.equal(torch.autograd.grad(back, moved, grad_back)[0],
                       torch.autograd.grad(back_ref, moved, grad_back)[0])

    # Round trip: the kept positions come back unchanged, the rest are zero.
    mask = torch.zeros(B, N, dtype=torch.bool, device=device).scatter_(1, idx, True)
    assert torch.equal(back, torch.where(mask.unsqueeze(-1), x.detach(), torch.zeros_like(x)))


@settings(max_examples=10, deadline=None)
@given(
    B=st.integers(1, 3),
    num_slots=st.integers(1, 8),
    per_slot=st.integers(1, 60),
    C=st.sampled_from([1, 3, 16, 48, 130]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    data=st.data(),
)
def test_tokens_match_reference_hypothesis(B, num_slots, per_slot, C, dtype, data):
    k = data.draw(st.integers(1, per_slot), label="k")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    _check_tokens(B, num_slots, per_slot, k, C, dtype, scores_dtype=dtype, generator=generator)


@pytest.mark.parametrize(
    "B,num_slots,per_slot,k,C",
    [(2, 8, 49, 34, 12), (1, 1, 1, 1, 3), (3, 2, 49, 49, 5), (2, 3, 300, 100, 4)],
    ids=["B2-S8-P49-k34-C12", "B1-S1-P1-k1-C3", "B3-S2-P49-kall-C5", "B2-S3-P300-k100-C4"],
)
def test_tokens_match_reference(B, num_slots, per_slot, k, C):
    _check_tokens(B, num_slots, per_slot, k, C, torch.float32)


def test_ties_take_the_lowest_index():
    """Exactly equal scores break towards the lower index, in the kernel and in the reference alike."""
    scores = torch.zeros(2, 12, device=DEVICE)
    assert slot_topk(scores, 3, 2, backend="triton").tolist() == [[0, 1, 4, 5, 8, 9]] * 2
    assert torch.equal(slot_topk(scores, 3, 2, backend="triton"), slot_topk_ref(scores, 3, 2))
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 1.0]], device=DEVICE)
    assert slot_topk(scores, 1, 3, backend="triton").tolist() == [[1, 2, 4]]
    assert slot_topk(scores, 1, 4, backend="triton").tolist() == [[0, 1, 2, 4]]
    for k in range(1, 7):
        assert torch.equal(slot_topk(scores, 1, k, backend="triton"), slot_topk_ref(scores, 1, k))


def test_nan_scores_keep_exactly_k_inside_the_slot():
    """NaN ranks highest (torch's order), so a slot with NaNs still keeps exactly k tokens: no index is
    written past the slot's k places (before the fix a NaN made k + 1 and wrote into the next slot or past
    the buffer's end)."""
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[0.3, 0.1, nan, 0.9, 0.5, 0.2, 0.8, 0.7],
                           [nan, 0.1, 0.2, nan, 0.4, 0.6, inf, nan]], device=DEVICE)
    for k in (1, 2, 3, 4):
        buffer = torch.full((2, 2 * k + 1), -7, dtype=torch.int64, device=DEVICE)
        idx, _ = kernel._slot_topk_gather(scores, None, 2, k, idx_out=buffer[:, : 2 * k])
        assert torch.equal(idx, slot_topk_ref(scores, 2, k)), k
        assert (buffer[:, -1] == -7).all(), f"k={k}: wrote past the {2 * k} output places"
    assert slot_topk_ref(scores, 2, 2).tolist() == [[2, 3, 6, 7], [0, 3, 6, 7]]


def test_gather_with_no_channels_still_returns_the_indices():
    scores = _distinct_scores(2, 12)
    idx, kept = slot_topk_gather(scores, torch.zeros(2, 12, 0, device=DEVICE), 3, 2, backend="triton")
    assert torch.equal(idx, slot_topk_ref(scores, 3, 2)) and kept.shape == (2, 6, 0)


def test_gather_backward_sums_repeated_indices():
    x = torch.randn(2, 7, 5, device=DEVICE, requires_grad=True)
    idx = torch.tensor([[0, 3, 3, 6, 3], [1, 1, 2, 0, 4]], device=DEVICE, dtype=torch.int32)
    grad = torch.randn(2, 5, 5, device=DEVICE)
    out = gather_tokens(x, idx, backend="triton")
    ref = gather_tokens_ref(x, idx.long())
    assert torch.equal(out, ref)
    # Sums of up to 3 rows: the addition order may differ, so the default fp32 tolerance, not exactness.
    assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x, grad)[0],
                 op="gather_tokens_backward", name="d_x (summed)")


def test_strided_inputs():
    base = torch.randn(2, 20, 9, device=DEVICE)
    x = base[:, :, 2:8]  # (2, 20, 6), channel-sliced view
    scores = _distinct_scores(2, 20)[:, :].t().contiguous().t()  # (2, 20), column-major
    idx, kept = slot_topk_gather(scores, x, 4, 2, backend="triton")
    assert torch.equal(idx, slot_topk_ref(scores, 4, 2))
    assert torch.equal(kept, gather_tokens_ref(x, idx))
    assert torch.equal(gather_tokens(x, idx, backend="triton"), gather_tokens_ref(x, idx))
    x_t = base.transpose(1, 2)[:, :4, :]  # (2, 4, 20): non-unit channel stride
    idx_t = torch.tensor([[3, 0, 2, 1], [1, 2, 3, 0]], device=DEVICE)
    assert torch.equal(scatter_tokens(x_t, idx_t, 6, backend="triton"), scatter_tokens_ref(x_t, idx_t, 6))


def test_reasons_per_entry_point():
    scores, x, idx = torch.zeros(2, 8), torch.zeros(2, 8, 3), torch.zeros(2, 4, dtype=torch.long)
    assert kernel.slot_topk_reasons(scores, 2, 1) == []
    assert kernel.gather_tokens_reasons(x, idx) == []
    assert kernel.scatter_tokens_reasons(x, idx, 8) == []
    assert kernel.slot_topk_gather_reasons(scores, x, 2, 1) == []
    assert kernel.slot_topk_reasons(torch.zeros(1, 2048), 1, 4)  # 2048 tokens in one slot
    assert kernel.slot_topk_gather_reasons(torch.zeros(1, 2048), torch.zeros(1, 2048, 3), 1, 4)
    assert kernel.slot_topk_reasons(scores.long(), 2, 1)
    assert kernel.gather_tokens_reasons(x, idx.float())
    assert kernel.scatter_tokens_reasons(x.int(), idx, 8)
    assert kernel.slot_topk_gather_reasons(scores, x.int(), 2, 1)
    if dispatch.triton_interpret():
        assert kernel.slot_topk_gather_reasons(scores, x.bfloat16(), 2, 1)
        assert kernel.gather_tokens_reasons(x.bfloat16(), idx)


def test_dispatch_asks_each_entry_points_reasons():
    """The triton backend of every op reports its own entry point's reasons (here: an int32 x)."""
    scores = torch.zeros(2, 8, device=DEVICE)
    x = torch.zeros(2, 8, 3, dtype=torch.int32, device=DEVICE)
    idx = torch.zeros(2, 4, dtype=torch.long, device=DEVICE)
    explained = {
        "gather_tokens": dispatch.explain("gather_tokens", x, idx),
        "scatter_tokens": dispatch.explain("scatter_tokens", x, idx, 8),
        "slot_topk_gather": dispatch.explain("slot_topk_gather", scores, x, 2, 1),
    }
    if DEVICE == "cuda" or dispatch.triton_interpret():  # CPU tensors pass the device check only when named
        for op, args in (("gather_tokens", (x, idx)), ("scatter_tokens", (x, idx, 8)),
                         ("slot_topk_gather", (scores, x, 2, 1))):
            with pytest.raises(NotImplementedError, match="x dtype torch.int32"):
                dispatch.select(op, "triton", *args)
        assert dispatch.select("slot_topk", "triton", scores, 2, 1).name == "triton"
    assert all(reasons["triton"] for reasons in explained.values()), explained


def test_dispatch_picks_reference_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    scores, x, idx = torch.zeros(2, 8), torch.zeros(2, 8, 3), torch.zeros(2, 4, dtype=torch.long)
    assert dispatch.select("slot_topk", None, scores, 2, 1).name == "reference"
    assert dispatch.select("gather_tokens", None, x, idx).name == "reference"
    assert dispatch.select("scatter_tokens", None, x, idx, 8).name == "reference"
    assert dispatch.select("slot_topk_gather", None, scores, x, 2, 1).name == "reference"


# Reduced matrix (the GPU script's): every stage in bf16, the first in every dtype; the rest runs with
# STPCORE_FULL_MATRIX=1.
GPU_CASES = [
    pytest.param(N, k, dtype, id=f"{stage}-{name}",
                 marks=() if dtype == torch.bfloat16 or stage == "N392-k34" else pytest.mark.full_matrix)
    for (N, k), stage in zip([(392, 34), (272, 24), (192, 16), (392, 49)],
                             ["N392-k34", "N272-k24", "N192-k16", "N392-kall"], strict=True)
    for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16"))
]


@pytest.mark.gpu
@pytest.mark.parametrize("N, k, dtype", GPU_CASES)
def test_gpu_matrix(N, k, dtype):
    """The paper's stages: B=32, D=384, 8 slots; scores fp32, tokens in dtype."""
    _check_tokens(32, 8, N // 8, k, 384, dtype, device="cuda")
