"""The Triton policy attention kernels against the fp32 reference: output and all four gradients.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are
small; the full dtype/shape matrix is marked ``gpu``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stpcore.kernels import _launch, _tiles
from stpcore.kernels import policy_attention as kernel
from stpcore.kernels._launch import LOG2E
from stpcore.ops import dispatch
from stpcore.ops.policy_attention import policy_attention, policy_attention_ref
from stpcore.testing import assert_close

OP = "policy_attention"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def make_inputs(B: int, H: int, N: int, D: int, dtype: torch.dtype, keep: str = "random", strided: bool = False,
                device: str = DEVICE):
    """q, k, v (B, H, N, D) in ``dtype`` and a (B, N) fp32 policy.

    strided: q, k, v are views of one (B, N, 3, H, D) qkv tensor, as a fused projection produces them.
    keep: "all", "none" (only self attention remains), "one", "random" (0/1), or "soft" (values in [0, 1]).
    """
    if strided:
        qkv = torch.randn(B, N, 3, H, D, device=device).to(dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), non-contiguous
    else:
        q, k, v = (torch.randn(B, H, N, D, device=device).to(dtype) for _ in range(3))
    if keep == "all":
        policy = torch.ones(B, N, device=device)
    elif keep == "none":
        policy = torch.zeros(B, N, device=device)
    elif keep == "one":
        policy = torch.zeros(B, N, device=device)
        policy[torch.arange(B), torch.randint(0, N, (B,))] = 1.0
    elif keep == "soft":
        policy = torch.rand(B, N, device=device)
    else:
        policy = (torch.rand(B, N, device=device) < 0.5).float()
    return q, k, v, policy


def run(fn, q, k, v, policy, dout, dtype, eps):
    """Output and (dq, dk, dv, dpolicy) of ``fn`` with inputs cast to ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    p = policy.detach().clone().requires_grad_()
    out = fn(*leaves, p, eps=eps)
    out.backward(dout.to(out.dtype))
    return [out] + [t.grad for t in leaves] + [p.grad]


def check_against_reference(q, k, v, policy, *, eps: float = 1e-6, lowp: bool = True) -> None:
    """Compare the kernel's output and gradients with the fp32 reference.

    For fp16/bf16 the flash-attention rule applies: at most LOWP_FACTOR times the error of the reference run
    in the same precision (plus the table's atol). On CPU that low-precision reference runs in fp16 too.
    """
    dtype = q.dtype
    dout = torch.randn(*q.shape[:3], v.shape[-1], device=q.device)
    got = run(kernel.policy_attention, q, k, v, policy, dout, dtype, eps)
    want = run(policy_attention_ref, q, k, v, policy, dout, torch.float32, eps)
    lowp_ref = run(policy_attention_ref, q, k, v, policy, dout, dtype, eps) if dtype != torch.float32 else None
    for i, name in enumerate(("out", "dq", "dk", "dv", "dpolicy")):
        assert got[i].dtype == (policy.dtype if name == "dpolicy" else dtype), name
        assert_close(got[i], want[i], op=OP, dtype=dtype, name=name,
                     lowp_reference=lowp_ref[i] if lowp_ref is not None and lowp else None)


CPU_CASES = [
    pytest.param(1, 1, 1, 16, torch.float32, "random", False, id="B1-N1-H1-D16-fp32"),
    pytest.param(2, 2, 97, 32, torch.float32, "soft", True, id="B2-N97-H2-D32-fp32-strided-soft"),
    pytest.param(1, 2, 128, 64, torch.float32, "random", False, id="B1-N128-H2-D64-fp32"),
    pytest.param(2, 1, 33, 128, torch.float32, "random", True, id="B2-N33-H1-D128-fp32-strided"),
    pytest.param(2, 2, 97, 64, torch.float16, "random", True, id="B2-N97-H2-D64-fp16-strided"),
    pytest.param(1, 2, 128, 32, torch.float16, "soft", False, id="B1-N128-H2-D32-fp16-soft"),
    pytest.param(1, 1, 392, 64, torch.float32, "random", False, id="B1-N392-H1-D64-fp32"),
    # The empty, single and full keep sets, always (the hypothesis test draws them only sometimes).
    pytest.param(1, 2, 1, 16, torch.float32, "none", False, id="B1-N1-none"),
    pytest.param(2, 2, 97, 16, torch.float32, "none", True, id="B2-N97-none-strided"),
    pytest.param(2, 2, 97, 32, torch.float32, "one", False, id="B2-N97-one"),
    pytest.param(2, 1, 97, 32, torch.float16, "all", False, id="B2-N97-all-fp16"),
]


@pytest.mark.parametrize("B, H, N, D, dtype, keep, strided", CPU_CASES)
def test_matches_reference(B, H, N, D, dtype, keep, strided):
    check_against_reference(*make_inputs(B, H, N, D, dtype, keep, strided))


def test_large_eps_terms_and_max_gradient():
    # With eps = 0.3 the eps/N smoothing, the eps in the denominator and the row max's gradient dm are no
    # longer negligible, so this checks each of them, not only the softmax part.
    q, k, v, policy = make_inputs(2, 2, 40, 16, torch.float32, "random")
    check_against_reference(q * 3, k, v, policy, eps=0.3)


@pytest.mark.parametrize("gap", [13.0, 18.0])
def test_fp16_dropped_key_far_above_the_kept_ones(gap):
    """The row max is over all keys, so a dropped key scoring ``gap`` above the kept ones makes every kept
    weight exp(-gap)-small: in fp16 they underflowed before the P.V dot (errors 20-100x the fp16
    reference's). The kernel accumulates relative to the kept keys' max instead."""
    torch.manual_seed(0)
    q, k, v, policy = make_inputs(1, 2, 32, 16, torch.float32, "all")
    q, k = q * 0.5, k * 0.5
    q[..., 0] += 4.0
    k[:, :, 0, :] = 0.0
    k[:, :, 0, 0] = gap  # key 0 scores about gap above the rest (q . k / sqrt(16))
    policy[:, 0] = 0.0  # and is dropped
    check_against_reference(q.half(), k.half(), v.half(), policy)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    N=st.integers(1, 80),
    D=st.sampled_from([16, 32, 64]),
    keep=st.sampled_from(["all", "none", "one", "random"]),
    strided=st.booleans(),
)
def test_matches_reference_hypothesis(B, H, N, D, keep, strided):
    check_against_reference(*make_inputs(B, H, N, D, torch.float32, keep, strided))


def test_dispatch_runs_the_kernels_when_named():
    """backend="triton" runs the kernels: compiled on CUDA tensors where a GPU exists, else the interpreter."""
    q, k, v, policy = make_inputs(1, 2, 20, 16, torch.float32)
    got = policy_attention(q, k, v, policy, backend="triton")
    assert_close(got, policy_attention_ref(q, k, v, policy), op=OP)


def test_cpu_tensors_run_the_kernels_only_in_the_interpreter():
    q, k, v, policy = make_inputs(1, 2, 20, 16, torch.float32, device="cpu")
    if dispatch.triton_interpret():
        assert_close(policy_attention(q, k, v, policy, backend="triton"), policy_attention_ref(q, k, v, policy), op=OP)
    else:  # a CUDA machine: the compiled kernels cannot take CPU tensors, and dispatch says so
        with pytest.raises(NotImplementedError, match="tensors are on cpu"):
            policy_attention(q, k, v, policy, backend="triton")


def test_dispatch_auto_on_cpu_does_not_pick_triton():
    q, k, v, policy = make_inputs(1, 2, 20, 16, torch.float32, device="cpu")
    chosen = dispatch.select(OP, None, q, k, v, policy, eps=1e-6)
    assert chosen.name in ("chunked", "reference")


def _tf32_check(api: str) -> None:
    """The body of test_tf32_switch_read_through_either_torch_api, run in a process of its own."""
    matmul = torch.backends.cuda.matmul

    def set_tf32(on: bool) -> None:
        if api == "allow_tf32":
            matmul.allow_tf32 = on
        else:
            matmul.fp32_precision = "tf32" if on else "ieee"

    for on in (True, False):
        set_tf32(on)
        assert _launch.dot_precision(torch.float32) == ("tf32" if on else "ieee")  # policy and varlen
    set_tf32(True)
    q, k, v, policy = make_inputs(1, 1, 20, 16, torch.float32)
    # TF32 dots (10-bit mantissa) on a GPU; the interpreter computes in fp32 regardless.
    torch.testing.assert_close(kernel.policy_attention(q, k, v, policy), policy_attention_ref(q, k, v, policy),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("api", ["allow_tf32", "fp32_precision"])
def test_tf32_switch_read_through_either_torch_api(api):
    """fp32 dots follow torch's TF32 switch, also when it is set through torch's fp32_precision API (after
    which reading the legacy allow_tf32 raises "mix of the legacy and new APIs"), and fp32 calls still run.
    In a process of its own: how torch versions reconcile the two APIs' flags after a new-API write differs
    (the GPU machine's 2.11 is not CI's 2.13), and a flag left behind would change the tests after it."""
    if api == "fp32_precision" and not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    root = Path(__file__).resolve().parents[2]
    code = f"from tests.kernels.test_policy_attention import _tf32_check; _tf32_check({api!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_gpu_default_tiles(monkeypatch):
    """The attention launchers' default GPU tiles: fp32 with IEEE dots (FMA units) gets small tiles over 8 warps,
    since 64 x 32 tiles spill kilobytes per thread there (measured in tests/kernels/test_compile.py)."""
    default_attention_tiles = _tiles.default_attention_tiles
    monkeypatch.setattr(_tiles, "INTERPRET", False)
    monkeypatch.setattr(_launch, "tf32_enabled", lambda: False)
    cuda = torch.device("cuda")  # only its type is read
    assert default_attention_tiles(392, 64, torch.bfloat16, cuda) == (64, 64, 4, 3)
    assert default_attention_tiles(392, 128, torch.float16, cuda) == (64, 32, 4, 2)
    assert default_attention_tiles(392, 64, torch.float32, cuda) == (32, 32, 8, 2)
    assert default_attention_tiles(392, 128, torch.float32, cuda) == (16, 16, 8, 2)
    monkeypatch.setattr(_launch, "tf32_enabled", lambda: True)
    assert default_attention_tiles(392, 128, torch.float32, cuda) == (64, 32, 4, 2)
    assert default_attention_tiles(392, 32, torch.float32, cuda) == (64, 64, 4, 3)


@pytest.mark.parametrize("n, blk", [(0, 16), (1, 16), (16, 16), (17, 32), (97, 128), (392, 128)])
def test_interpreter_tiles(n, blk):
    """On CPU (and in the interpreter) one square power-of-two block of 16-128 covers up to n tokens."""
    assert _tiles.default_attention_tiles(n, 64, torch.float32, torch.device("cpu")) == (blk, blk, 4, 1)


def test_measured_tiles_are_used_per_pass_and_gpu(monkeypatch, tmp_path):
    """The launchers take the committed tiles for this GPU model, dtype and head dim, pass by pass; anything
    absent (file, GPU, key, pass) or malformed falls back to the defaults; the sweep's override wins."""
    table = {"policy_attention": {"NVIDIA H200": {
        "bf16-D64": {"fwd": [128, 64, 8, 3], "bwd": [32, 64, 4, 3]},
        "fp16-D64": {"fwd": [64, 48, 4, 3]},  # 48 is not a power of two: ignored with a warning
        "fp32-ieee-D64": {"bwd": [16, 16, 8, 2]},
    }}}
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(_tiles, "TILES_FILE", path)
    monkeypatch.setattr(_tiles, "device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(_tiles, "cuda_available", lambda: True)
    monkeypatch.setattr(kernel, "INTERPRET", False)
    monkeypatch.setattr(_tiles, "INTERPRET", False)
    monkeypatch.setattr(_launch, "tf32_enabled", lambda: False)
    _tiles.load_table.cache_clear()
    cuda = torch.device("cuda")
    try:
        with pytest.warns(UserWarning, match="fp16-D64/fwd"):
            assert kernel._blocks(392, 64, torch.bfloat16, cuda, "fwd") == (128, 64, 8, 3)
        assert kernel._blocks(392, 64, torch.bfloat16, cuda, "bwd") == (32, 64, 4, 3)
        assert kernel._blocks(392, 64, torch.float16, cuda, "fwd") == _tiles.default_attention_tiles(
            392, 64, torch.float16, cuda)
        assert kernel._blocks(392, 64, torch.float32, cuda, "bwd") == (16, 16, 8, 2)
        assert kernel._blocks(392, 64, torch.float32, cuda, "fwd") == (32, 32, 8, 2)  # no fwd entry: default
        assert kernel._blocks(392, 128, torch.bfloat16, cuda, "fwd") == (64, 32, 4, 2)  # no D128 entry: default
        with kernel.use_tiles(fwd=(64, 32, 4, 4)):
            assert kernel._blocks(392, 64, torch.bfloat16, cuda, "fwd") == (64, 32, 4, 4)
            assert kernel._blocks(392, 64, torch.bfloat16, cuda, "bwd") == (32, 64, 4, 3)
        monkeypatch.setattr(_tiles, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
        assert kernel._blocks(392, 64, torch.bfloat16, cuda, "fwd") == (64, 64, 4, 3)  # another GPU: default
        monkeypatch.setattr(_tiles, "TILES_FILE", tmp_path / "absent.json")
        assert kernel._blocks(392, 64, torch.bfloat16, cuda, "fwd") == (64, 64, 4, 3)
    finally:
        _tiles.load_table.cache_clear()


def test_committed_tile_table_is_valid():
    """kernels/tiles.json, where committed, holds only entries the launchers accept (none are dropped)."""
    from stpcore.kernels import _tiles

    if not _tiles.TILES_FILE.is_file():  # none committed yet: every launch takes the default tiles
        assert _tiles.load_table(str(_tiles.TILES_FILE)) == {}
        return
    raw = json.loads(_tiles.TILES_FILE.read_text())
    entries = [(op, gpu, key, p, t) for op, gpus in raw.items() for gpu, keys in gpus.items()
               for key, passes in keys.items() for p, t in passes.items()]
    assert entries and all(p in _tiles.PASSES and _tiles.valid_tiles(t) for *_, p, t in entries), entries


def test_saved_statistics():
    """What the forward saves for the backward: the row max over ALL keys (log2 units), its first position
    when several keys tie for it (torch.max's), across key blocks, and 1 / (Z + eps) per row."""
    torch.manual_seed(0)
    B, H, N, D = 1, 2, 200, 16  # two key blocks in the interpreter (128 wide), several on a GPU
    q, k, v, policy = make_inputs(B, H, N, D, torch.float32, "random")
    # Multiples of 1/4: every product and partial sum of the scores is exact in fp32, so tied keys tie in every
    # summation order (a BLAS computes columns at different tile positions in different orders: on an AVX2 machine
    # key 150 came out 1 ulp above key 5 in the interpreter's dot, and the kernel rightly took it).
    q, k = (q * 4).round() / 4, (k * 4).round() / 4
    # Keys 7, 5 and 150 tie for the max of many rows: within one key block (5, 7) and across blocks (150).
    k[:, :, 150] = k[:, :, 7] = k[:, :, 5] = q[:, :, 0].abs() * 4
    out, v_sum, row_max, inv_den, arg_max = kernel._policy_attn_fwd(q, k, v, policy, 1e-6)
    scores = (q @ k.transpose(-2, -1)) * D**-0.5
    ref_max, ref_arg = scores.max(dim=-1)
    torch.testing.assert_close(row_max / LOG2E, ref_max, rtol=1e-5, atol=1e-5)
    clear = (scores.topk(2, dim=-1).values.diff(dim=-1).abs().squeeze(-1) > 1e-4) | (ref_arg == 5)
    assert (ref_arg == 5).sum() > 10, "the test needs rows whose max is the tie"
    assert torch.equal(arg_max[clear].long(), ref_arg[clear])
    eye = torch.eye(N, device=q.device)
    mask = policy[:, None, None, :] + (1 - policy[:, None, None, :]) * eye
    z = ((scores - ref_max[..., None]).exp() * mask).sum(-1)
    torch.testing.assert_close(inv_den, 1 / (z + 1e-6), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_sum, v.sum(dim=2), rtol=1e-5, atol=1e-5)


def test_not_supported_reasons():
    q, k, v, policy = make_inputs(1, 1, 8, 16, torch.float32)
    assert kernel.not_supported_reasons(q, k, v, policy, eps=1e-6) == []
    odd = torch.randn(1, 1, 8, 24, device=DEVICE)
    reasons = kernel.not_supported_reasons(odd, odd, odd, policy, eps=1e-6)
    assert any("head dim 24" in r for r in reasons), reasons
    ints = torch.ones(1, 1, 8, 16, dtype=torch.int32, device=DEVICE)
    assert any("dtype" in r for r in kernel.not_supported_reasons(ints, ints, ints, policy, eps=1e-6))
    with pytest.raises(NotImplementedError, match="head dim 24"):
        policy_attention(odd, odd, odd, policy, backend="triton")
    if dispatch.triton_interpret():  # the interpreter has no bf16: refused, not silently wrong (was ~1e9 off)
        b = [t.bfloat16() for t in (q, k, v)]
        with pytest.raises(NotImplementedError, match="bf16 is not supported"):
            policy_attention(*b, policy, backend="triton")


def _in_reduced_matrix(B, H, N, D, dtype, keep) -> bool:
    """The paper's shape in every dtype and keep set; the other shapes once in bf16 (0/1 keep) and once in
    fp32 (soft keep). The rest runs with STPCORE_FULL_MATRIX=1."""
    return (B, H, N, D) == (32, 6, 392, 64) or (dtype, keep) in ((torch.bfloat16, "random"), (torch.float32, "soft"))


GPU_CASES = [
    pytest.param(B, H, N, D, dtype, keep, id=f"B{B}-N{N}-H{H}-D{D}-{DTYPE_NAMES[dtype]}-{keep}",
                 marks=() if _in_reduced_matrix(B, H, N, D, dtype, keep) else pytest.mark.full_matrix)
    for B, H, N, D in [(32, 6, 392, 64), (8, 6, 272, 64), (2, 3, 393, 128), (4, 2, 97, 16), (4, 2, 1, 32)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for keep in ("all", "none", "random", "soft")
]


@pytest.mark.gpu
@pytest.mark.parametrize("B, H, N, D, dtype, keep", GPU_CASES)
def test_matches_reference_gpu(B, H, N, D, dtype, keep):
    check_against_reference(*make_inputs(B, H, N, D, dtype, keep, strided=True))
