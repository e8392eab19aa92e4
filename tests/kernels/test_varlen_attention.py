"""The Triton varlen attention kernels against the fp32 reference, with gradients.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are
small; the full dtype/shape matrix is marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stpcore.kernels import varlen_attention as kernel
from stpcore.ops import dispatch
from stpcore.ops.varlen_attention import varlen_attention, varlen_attention_ref
from stpcore.testing import assert_close

OP = "varlen_attention"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def make_packed(lengths: list[int], H: int, D: int, dtype: torch.dtype, strided: bool = True, device: str = DEVICE):
    """q, k, v (total, H, D) in ``dtype``, cu_seqlens (B+1,) int32 and max_seqlen for these lengths.

    strided: q, k, v are views of one (total, 3, H, D) tensor, as a fused qkv projection produces them.
    """
    cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    total = int(cu[-1])
    if strided:
        q, k, v = torch.randn(total, 3, H, D, device=device).to(dtype).unbind(1)  # each (total, H, D)
    else:
        q, k, v = (torch.randn(total, H, D, device=device).to(dtype) for _ in range(3))
    return q, k, v, cu, max(lengths, default=0)


def run(fn, q, k, v, *rest, dtype, dout):
    """Output and (dq, dk, dv) of ``fn(q, k, v, *rest)`` with q, k, v cast to ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, *rest)
    out.backward(dout.to(out.dtype))
    return [out] + [t.grad for t in leaves]


def check_against_reference(kernel_fn, ref_fn, q, k, v, *rest, total: int) -> None:
    """Kernel output and gradients vs the fp32 reference (fp16/bf16: the low-precision reference rule)."""
    dtype = q.dtype
    dout = torch.randn(total, q.shape[1], v.shape[-1], device=q.device)
    got = run(kernel_fn, q, k, v, *rest, dtype=dtype, dout=dout)
    want = run(ref_fn, q, k, v, *rest, dtype=torch.float32, dout=dout)
    lowp_ref = run(ref_fn, q, k, v, *rest, dtype=dtype, dout=dout) if dtype != torch.float32 else None
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert got[i].dtype == dtype, name
        assert_close(got[i], want[i], op=OP, dtype=dtype, name=name,
                     lowp_reference=lowp_ref[i] if lowp_ref is not None else None)


CPU_CASES = [
    pytest.param([5, 0, 40, 1], 2, 32, torch.float32, id="L5,0,40,1-H2-D32-fp32"),
    pytest.param([128], 1, 16, torch.float32, id="L128-H1-D16-fp32"),
    pytest.param([17, 64], 2, 128, torch.float32, id="L17,64-H2-D128-fp32"),
    pytest.param([100, 37], 2, 64, torch.float16, id="L100,37-H2-D64-fp16"),
    pytest.param([0, 1, 70], 1, 32, torch.float16, id="L0,1,70-H1-D32-fp16"),
    pytest.param([392, 50], 1, 64, torch.float32, id="L392,50-H1-D64-fp32"),
]


@pytest.mark.parametrize("lengths, H, D, dtype", CPU_CASES)
def test_matches_reference(lengths, H, D, dtype):
    q, k, v, cu, max_len = make_packed(lengths, H, D, dtype)
    check_against_reference(kernel.varlen_attention, varlen_attention_ref, q, k, v, cu, max_len, total=q.shape[0])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.sampled_from([0, 1, 2, 3, 7, 16, 17, 31, 48, 65]), min_size=1, max_size=4).filter(any),
    H=st.integers(1, 2),
    D=st.sampled_from([16, 32, 64]),
    strided=st.booleans(),
)
def test_matches_reference_hypothesis(lengths, H, D, strided):
    q, k, v, cu, max_len = make_packed(lengths, H, D, torch.float32, strided)
    check_against_reference(kernel.varlen_attention, varlen_attention_ref, q, k, v, cu, max_len, total=q.shape[0])


def test_scale_argument():
    q, k, v, cu, max_len = make_packed([9, 30], 2, 16, torch.float32)
    got = kernel.varlen_attention(q, k, v, cu, max_len, scale=0.7)
    assert_close(got, varlen_attention_ref(q, k, v, cu, max_len, scale=0.7), op=OP)


def test_all_sequences_empty():
    q, k, v = (torch.randn(6, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    cu = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    out = kernel.varlen_attention(q[:0], k[:0], v[:0], cu, 0)
    assert out.shape == (0, 2, 16)
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_dispatch_runs_the_kernels_when_named():
    """backend="triton" runs the kernels: compiled on CUDA tensors where a GPU exists, else the interpreter."""
    q, k, v, cu, max_len = make_packed([7, 12], 2, 16, torch.float32)
    assert_close(varlen_attention(q, k, v, cu, max_len, backend="triton"), varlen_attention_ref(q, k, v, cu, max_len),
                 op=OP)


def test_cpu_tensors_run_the_kernels_only_in_the_interpreter():
    q, k, v, cu, max_len = make_packed([7, 12], 2, 16, torch.float32, device="cpu")
    if dispatch.triton_interpret():
        assert_close(varlen_attention(q, k, v, cu, max_len, backend="triton"),
                     varlen_attention_ref(q, k, v, cu, max_len), op=OP)
    else:  # a CUDA machine: the compiled kernels cannot take CPU tensors, and dispatch says so
        with pytest.raises(NotImplementedError, match="tensors are on cpu"):
            varlen_attention(q, k, v, cu, max_len, backend="triton")


def test_dispatch_auto_on_cpu_does_not_pick_triton():
    q, k, v, cu, max_len = make_packed([7, 12], 2, 16, torch.float32, device="cpu")
    assert dispatch.select("varlen_attention", None, q, k, v, cu, max_len, scale=None).name != "triton"


def test_reasons():
    q, k, v, cu, max_len = make_packed([7, 12], 2, 16, torch.float32)
    assert kernel.varlen_attention_reasons(q, k, v, cu, max_len, scale=None) == []
    odd = torch.randn(q.shape[0], 2, 24, device=DEVICE)
    reasons = kernel.varlen_attention_reasons(odd, odd, odd, cu, max_len, scale=None)
    assert any("head dim 24" in r for r in reasons), reasons
    with pytest.raises(NotImplementedError, match="head dim 24"):
        varlen_attention(odd, odd, odd, cu, max_len, backend="triton")
    if dispatch.triton_interpret():  # the interpreter has no bf16: refused, not silently wrong
        b = [t.bfloat16() for t in (q, k, v)]
        with pytest.raises(NotImplementedError, match="bf16 is not supported"):
            varlen_attention(*b, cu, max_len, backend="triton")


GPU_LENGTHS = {
    "equal272": [272] * 32,
    "equal128": [128] * 32,
    "var30-70": [int(392 * f) for f in torch.linspace(0.3, 0.7, 32).tolist()],
    "edge": [0, 1, 392, 393, 97, 0],
}
# Reduced matrix (the GPU script's): the paper's head (H6-D64) in every dtype and length set, the other heads in
# bf16; the rest runs with STPCORE_FULL_MATRIX=1.
GPU_CASES = [
    pytest.param(GPU_LENGTHS[name], H, D, dtype, id=f"{name}-H{H}-D{D}-{DTYPE_NAMES[dtype]}",
                 marks=() if D == 64 or dtype == torch.bfloat16 else pytest.mark.full_matrix)
    for name in GPU_LENGTHS
    for H, D in [(6, 64), (2, 128), (3, 16)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
]


@pytest.mark.gpu
@pytest.mark.parametrize("lengths, H, D, dtype", GPU_CASES)
def test_matches_reference_gpu(lengths, H, D, dtype):
    q, k, v, cu, max_len = make_packed(lengths, H, D, dtype)
    check_against_reference(kernel.varlen_attention, varlen_attention_ref, q, k, v, cu, max_len, total=q.shape[0])

