"""policy_attention: hand-computed cases, gradcheck, and the chunked formulation against the direct one."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stpcore import ops
from stpcore.ops.policy_attention import policy_attention_chunked, policy_attention_ref
from stpcore.testing import assert_close


def _inputs(B, H, N, D, dtype=torch.float64, keep=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(3))
    policy = (torch.rand(B, N, generator=g) < keep).to(dtype)
    return q, k, v, policy


def test_hand_computed_two_tokens_with_eps_and_self():
    # N=2, D=1, one head. Token 1 dropped (p=[1, 0]). q = [1, 2], k = [1, 0], v = [10, 20].
    q = torch.tensor([1.0, 2.0], dtype=torch.float64).reshape(1, 1, 2, 1)
    k = torch.tensor([1.0, 0.0], dtype=torch.float64).reshape(1, 1, 2, 1)
    v = torch.tensor([10.0, 20.0], dtype=torch.float64).reshape(1, 1, 2, 1)
    p = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    eps = 0.1  # large, so its terms are visible
    # Query 0: S = [1, 0], max 1, E = [1, e^-1], M = [1, 0] -> W = [1, 0], Z = 1.
    a0 = torch.tensor([(1 + eps / 2) / (1 + eps), (0 + eps / 2) / (1 + eps)], dtype=torch.float64)
    # Query 1: S = [2, 0], max 2, E = [1, e^-2], M = [1, 1] (sees itself) -> W = [1, e^-2].
    w = torch.tensor([1.0, math.exp(-2)], dtype=torch.float64)
    a1 = (w + eps / 2) / (w.sum() + eps)
    expected = torch.stack([a0 @ v.flatten(), a1 @ v.flatten()]).reshape(1, 1, 2, 1)
    for fn in (policy_attention_ref, policy_attention_chunked):
        torch.testing.assert_close(fn(q, k, v, p, eps=eps), expected, rtol=0, atol=1e-12)


def test_all_dropped_each_query_sees_only_itself():
    q, k, v, _ = _inputs(2, 3, 7, 4)
    p = torch.zeros(2, 7, dtype=torch.float64)
    out = ops.policy_attention(q, k, v, p, eps=0.0)
    torch.testing.assert_close(out, v)  # A = identity when only the diagonal is visible and eps = 0


def test_single_kept_token_and_eps_smoothing():
    q, k, v, _ = _inputs(1, 1, 5, 3)
    p = torch.zeros(1, 5, dtype=torch.float64)
    p[0, 2] = 1.0
    eps = 1e-2
    out = ops.policy_attention(q, k, v, p, eps=eps)
    S = (q @ k.transpose(-2, -1)) / math.sqrt(3)
    E = (S - S.amax(-1, keepdim=True)).exp()
    M = torch.eye(5, dtype=torch.float64)
    M[:, 2] = 1.0
    A = (E * M + eps / 5) / ((E * M).sum(-1, keepdim=True) + eps)
    torch.testing.assert_close(out, A @ v)
    assert torch.allclose(A.sum(-1), torch.ones(5, dtype=torch.float64))


def test_policy_of_ones_is_softmax_attention():
    q, k, v, _ = _inputs(2, 2, 9, 8)
    p = torch.ones(2, 9, dtype=torch.float64)
    out = ops.policy_attention(q, k, v, p, eps=0.0)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("fn", [policy_attention_ref, policy_attention_chunked], ids=["direct", "chunked"])
@pytest.mark.parametrize("eps", [1e-6, 0.3])
def test_gradcheck_float64(fn, eps):
    q, k, v, _ = _inputs(1, 2, 6, 3)
    p = torch.rand(1, 6, dtype=torch.float64)  # soft policy: every path of the formula is exercised
    args = [t.clone().requires_grad_() for t in (q, k, v, p)]
    assert torch.autograd.gradcheck(lambda *a: fn(*a, eps=eps), args)


@pytest.mark.parametrize("chunk", [1, 4, None], ids=["chunk1", "chunk4", "auto"])
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0], ids=["none", "half", "all"])
def test_chunked_equals_direct_values_and_all_gradients(chunk, keep):
    q, k, v, p = _inputs(2, 3, 13, 8, keep=keep, seed=1)
    eps = 1e-3
    a = [t.clone().requires_grad_() for t in (q, k, v, p)]
    b = [t.clone().requires_grad_() for t in (q, k, v, p)]
    out_ref = policy_attention_ref(*a, eps=eps)
    out = policy_attention_chunked(*b, eps=eps, chunk_size=chunk)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(out_ref)
    g_ref = torch.autograd.grad(out_ref, a, grad)
    g = torch.autograd.grad(out, b, grad)
    for name, x, y in zip(("dq", "dk", "dv", "dpolicy"), g, g_ref, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-11, msg=name)


def test_chunked_float32_matches_float64_reference():
    q, k, v, p = _inputs(2, 6, 49, 16, dtype=torch.float32, seed=2)
    out = policy_attention_chunked(q, k, v, p)
    expected = policy_attention_ref(q.double(), k.double(), v.double(), p.double())
    assert_close(out, expected, op="policy_attention", dtype=torch.float32)


def test_dispatch_on_cpu_uses_chunked_and_named_backends_agree():
    q, k, v, p = _inputs(1, 2, 10, 4, dtype=torch.float32)
    chosen = ops.dispatch.select("policy_attention", None, q, k, v, p, eps=1e-6)
    assert chosen.name == "chunked"
    torch.testing.assert_close(
        ops.policy_attention(q, k, v, p, backend="reference"), ops.policy_attention(q, k, v, p, backend="chunked")
    )


def test_explicit_backend_that_cannot_run_raises_with_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, p = _inputs(1, 1, 4, 4, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="triton.*cpu"):
        ops.policy_attention(q, k, v, p, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.policy_attention(q, k, v, p, backend="cuda-magic")


def test_env_var_forces_backend(monkeypatch):
    q, k, v, p = _inputs(1, 1, 4, 4, dtype=torch.float32)
    monkeypatch.setenv("STPCORE_BACKEND", "policy_attention=reference")
    assert ops.dispatch.select("policy_attention", None, q, k, v, p, eps=1e-6).name == "reference"
    monkeypatch.setenv("STPCORE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="STPCORE_BACKEND"):
        ops.policy_attention(q, k, v, p)
    # A name for every op, with pairs that override it: the pair wins for its op.
    monkeypatch.setenv("STPCORE_BACKEND", "nonsense, policy_attention=reference")
    assert ops.dispatch.select("policy_attention", None, q, k, v, p, eps=1e-6).name == "reference"


def test_dispatch_records_what_ran(monkeypatch):
    """A benchmark records the backends that ran (a missing Triton install on a GPU would show as the reference)."""
    q, k, v, p = _inputs(1, 1, 4, 4, dtype=torch.float32)
    monkeypatch.delenv("STPCORE_BACKEND", raising=False)
    ops.dispatch.forget_choices()
    ops.policy_attention(q, k, v, p)
    automatic = ops.dispatch.chosen()
    assert list(automatic) == ["policy_attention"] and automatic["policy_attention"] != ["reference"]
    monkeypatch.setenv("STPCORE_BACKEND", "reference")
    ops.dispatch.forget_choices()
    ops.policy_attention(q, k, v, p)
    assert ops.dispatch.chosen() == {"policy_attention": ["reference"]}


@pytest.mark.parametrize("value, match", [("policy_atention=reference", "'policy_atention' is not an op; the ops"),
                                          ("reference,triton", "two backends for every op")])
def test_env_var_with_a_misspelt_op_is_an_error(monkeypatch, value, match):
    """A typo in an op's name used to leave that op unforced without a word (the user believes the reference
    runs); now every call says what is wrong."""
    q, k, v, p = _inputs(1, 1, 4, 4, dtype=torch.float32)
    monkeypatch.setenv("STPCORE_BACKEND", value)
    with pytest.raises(ValueError, match=match):
        ops.policy_attention(q, k, v, p)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8), (1, 5)), "policy must be"),
        (((1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 4, 8), (1, 4)), "equal B, H, N"),
        (((2, 4, 8), (2, 4, 8), (2, 4, 8), (2, 4)), r"\(B, H, N, D\)"),
    ],
    ids=["policy-shape", "kv-shape", "rank"],
)
def test_bad_shapes_raise(shapes, match):
    tensors = [torch.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        ops.policy_attention(*tensors)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 20), st.sampled_from([4, 8]), st.integers(0, 2**16))
def test_kept_set_permutation_invariance(B, H, N, D, seed):
    """Permuting tokens (queries, keys, values and policy together) permutes the output the same way."""
    q, k, v, p = _inputs(B, H, N, D, seed=seed)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    out = ops.policy_attention(q, k, v, p)
    out_perm = ops.policy_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], p[:, perm])
    torch.testing.assert_close(out_perm, out[:, :, perm])


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 16), st.integers(0, 2**16))
def test_dropped_keys_carry_only_eps_weight(N, seed):
    """A kept query's output does not depend on the values of dropped keys (beyond the eps/N term)."""
    q, k, v, p = _inputs(1, 1, N, 4, seed=seed)
    p[0, 0] = 1.0
    v2 = v.clone()
    v2[:, :, p[0] == 0] += 100.0
    out, out2 = ops.policy_attention(q, k, v, p, eps=0.0), ops.policy_attention(q, k, v2, p, eps=0.0)
    kept = p[0] == 1
    torch.testing.assert_close(out[:, :, kept], out2[:, :, kept])
