"""The Triton Gumbel keep decision against gumbel_select_ref: decisions, gradients, seeded statistics."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from stpcore.kernels import gumbel_select as kgs  # noqa: E402
from stpcore.ops import dispatch, gumbel_select, gumbel_select_ref, sample_gumbel  # noqa: E402
from stpcore.testing import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP = "gumbel_select"


def _inputs(B, N, dtype, device=DEVICE, drop=0.3):
    log_probs = torch.randn(B, N, 2, device=device).log_softmax(-1).to(dtype).requires_grad_()
    prev_keep = (torch.rand(B, N, device=device) > drop).to(dtype).requires_grad_()
    noise = sample_gumbel((B, N, 2), device=device)
    return log_probs, prev_keep, noise


def _run(fn, log_probs, prev_keep, grad, dtype=None, **kwargs):
    """Output and (d log_probs, d prev_keep) of fn on copies of the inputs cast to dtype."""
    dtype = dtype or log_probs.dtype
    lp = log_probs.detach().to(dtype).requires_grad_()
    pk = prev_keep.detach().to(dtype).requires_grad_()
    out = fn(lp, pk, **kwargs)
    d_lp, d_pk = torch.autograd.grad(out, (lp, pk), grad.to(out.dtype))
    return out, d_lp, d_pk


def _check_against_reference(log_probs, prev_keep, noise, tau, hard):
    dtype = log_probs.dtype
    grad = torch.randn(prev_keep.shape, device=prev_keep.device)
    out, d_lp, d_pk = _run(gumbel_select, log_probs, prev_keep, grad, tau=tau, hard=hard, noise=noise, backend="triton")
    same = _run(gumbel_select_ref, log_probs, prev_keep, grad, tau=tau, hard=hard, noise=noise)
    if hard:
        # Decisions are exactly the reference's run in the same precision (the kernel mirrors its rounding).
        assert torch.equal(out, same[0]), f"{int((out != same[0]).sum())} decisions differ"
    ref = _run(gumbel_select_ref, log_probs, prev_keep, grad, dtype=torch.float32, tau=tau, hard=hard,
               noise=noise.to(dtype))
    lowp = dtype != torch.float32
    for name, a, r, s in zip(("out", "d_log_probs", "d_prev_keep"), (out, d_lp, d_pk), ref, same, strict=True):
        assert a.dtype == dtype
        assert_close(a, r, op=OP, dtype=dtype, name=name, lowp_reference=s if lowp else None)


@pytest.mark.parametrize("tau", [1.0, 0.5], ids=["tau1", "tau0.5"])
@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,N", [(1, 1), (2, 97), (3, 392)], ids=["B1-N1", "B2-N97", "B3-N392"])
def test_injected_noise_matches_reference(B, N, dtype, hard, tau):
    _check_against_reference(*_inputs(B, N, dtype), tau=tau, hard=hard)


def test_seeded_matches_reference_with_the_kernels_noise():
    """In-kernel Philox noise, materialised by gumbel_noise for the same generator state, fed to the reference."""
    log_probs, prev_keep, _ = _inputs(2, 300, torch.float32)
    grad = torch.randn(2, 300, device=DEVICE)
    out = _run(gumbel_select, log_probs, prev_keep, grad, generator=torch.Generator().manual_seed(7), backend="triton")
    noise = kgs.gumbel_noise((2, 300, 2), generator=torch.Generator().manual_seed(7), device=DEVICE)
    ref = _run(gumbel_select_ref, log_probs, prev_keep, grad, noise=noise)
    assert torch.equal(out[0], ref[0])
    for name, a, r in zip(("d_log_probs", "d_prev_keep"), out[1:], ref[1:], strict=True):
        assert_close(a, r, op=OP, name=name)


@pytest.mark.parametrize("hard", [True, False])
def test_noise_that_requires_grad_gets_the_references_gradient(hard):
    log_probs, prev_keep, noise = _inputs(2, 40, torch.float32, DEVICE)
    grad = torch.randn(2, 40, device=DEVICE)
    grads = []
    for fn, kw in ((gumbel_select, {"backend": "triton"}), (gumbel_select_ref, {})):
        lp, n = log_probs.detach().clone().requires_grad_(), noise.clone().requires_grad_()
        out = fn(lp, prev_keep, tau=0.7, hard=hard, noise=n, **kw)
        grads.append(torch.autograd.grad(out, (lp, n), grad))
    (d_lp, d_noise), (d_lp_ref, d_noise_ref) = grads
    assert_close(d_noise, d_noise_ref, op="gumbel_select_backward", name="d_noise")
    assert_close(d_lp, d_lp_ref, op="gumbel_select_backward", name="d_log_probs")


@pytest.mark.parametrize("hard", [True, False])
def test_nan_log_probs_give_nan_like_the_reference(hard):
    """A diverging predictor must show up as NaN (and trip the trainer's guard), not as a silent "drop"."""
    log_probs, prev_keep, noise = _inputs(1, 6, torch.float32)
    lp = log_probs.detach().clone()
    lp[0, 1, 0] = float("nan")
    lp[0, 4, 1] = float("nan")
    out = gumbel_select(lp, prev_keep.detach(), hard=hard, noise=noise, backend="triton")
    ref = gumbel_select_ref(lp, prev_keep.detach(), hard=hard, noise=noise)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().sum() == 2
    torch.testing.assert_close(out[~out.isnan()], ref[~ref.isnan()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_ties_keep(dtype):
    """Equal keep/drop scores keep the token (torch.argmax returns the first maximum), in the kernel and the
    reference alike; the straight-through gradient to prev_keep is then dout."""
    log_probs = torch.full((2, 5, 2), math.log(0.5), device=DEVICE, dtype=dtype)
    prev_keep = torch.ones(2, 5, device=DEVICE, dtype=dtype)
    noise = torch.zeros(2, 5, 2, device=DEVICE)
    grad = torch.randn(2, 5, device=DEVICE)
    for fn, kw in ((gumbel_select, {"backend": "triton"}), (gumbel_select_ref, {})):
        out, _, d_pk = _run(fn, log_probs, prev_keep, grad, noise=noise, **kw)
        assert out.tolist() == [[1.0] * 5] * 2, fn
        assert torch.equal(d_pk, grad.to(dtype)), fn


def test_hard_decisions_are_binary_and_never_revive():
    log_probs, prev_keep, _ = _inputs(4, 500, torch.float32, drop=0.5)
    out = gumbel_select(log_probs, prev_keep, generator=torch.Generator().manual_seed(1), backend="triton")
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert (out[prev_keep == 0] == 0).all()
    assert 0 < out.sum() < prev_keep.sum()  # some kept, some newly dropped


def test_seeded_is_deterministic_per_generator_state():
    log_probs = torch.zeros(2, 1000, 2, device=DEVICE)  # p(keep) = 1/2: every token is a coin flip
    prev_keep = torch.ones(2, 1000, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    first = gumbel_select(log_probs, prev_keep, generator=gen, backend="triton")
    second = gumbel_select(log_probs, prev_keep, generator=gen, backend="triton")  # state has advanced
    again = gumbel_select(log_probs, prev_keep, generator=torch.Generator().manual_seed(3), backend="triton")
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    torch.manual_seed(11)
    default_a = gumbel_select(log_probs, prev_keep, backend="triton")
    torch.manual_seed(11)
    assert torch.equal(default_a, gumbel_select(log_probs, prev_keep, backend="triton"))


@pytest.mark.parametrize("tau", [1.0, 0.3], ids=["tau1", "tau0.3"])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_keep_frequency_matches_softmax(p, tau):
    """Gumbel-max: P(keep) = softmax(log_probs)[0] for any tau; 4 x 4096 tokens, 5-sigma binomial bound."""
    n_tokens = 4 * 4096
    log_probs = torch.tensor([math.log(p), math.log(1 - p)], device=DEVICE).expand(4, 4096, 2).contiguous()
    prev_keep = torch.ones(4, 4096, device=DEVICE)
    out = gumbel_select(log_probs, prev_keep, tau=tau, generator=torch.Generator().manual_seed(5), backend="triton")
    freq = out.mean().item()
    sigma = math.sqrt(p * (1 - p) / n_tokens)
    assert abs(freq - p) < 5 * sigma, f"keep frequency {freq:.4f} vs p={p} (5 sigma = {5 * sigma:.4f})"


def test_from_logits_equals_selection_of_log_softmax():
    logits = (2 * torch.randn(3, 200, 2, device=DEVICE)).requires_grad_()
    prev_keep = (torch.rand(3, 200, device=DEVICE) > 0.2).float().requires_grad_()
    noise = sample_gumbel((3, 200, 2), device=DEVICE)
    grad = torch.randn(3, 200, device=DEVICE)
    out = kgs.gumbel_select_from_logits(logits, prev_keep, noise=noise)
    ref = gumbel_select_ref(logits.log_softmax(-1), prev_keep, noise=noise)
    assert torch.equal(out, ref)
    for name, a, r in zip(("d_logits", "d_prev_keep"), torch.autograd.grad(out, (logits, prev_keep), grad),
                          torch.autograd.grad(ref, (logits, prev_keep), grad), strict=True):
        assert_close(a, r, op=OP, name=name)


def test_not_supported_reasons():
    lp = torch.zeros(2, 3, 2)
    assert kgs.not_supported_reasons(lp, torch.ones(2, 3)) == []
    assert kgs.not_supported_reasons(lp.double(), torch.ones(2, 3))
    assert kgs.not_supported_reasons(lp, torch.ones(2, 3, dtype=torch.bool))
    if dispatch.triton_interpret():
        assert kgs.not_supported_reasons(lp.bfloat16(), torch.ones(2, 3))


def test_dispatch_picks_reference_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    lp, pk = torch.zeros(2, 3, 2), torch.ones(2, 3)
    assert dispatch.select("gumbel_select", None, lp, pk, None, torch.zeros(1, dtype=torch.int64), 1.0, True).name == (
        "reference"
    )


# Reduced matrix (the GPU script's): N = 392 in every dtype, hard and soft; the other sizes in bf16, hard; the
# rest runs with STPCORE_FULL_MATRIX=1.
GPU_CASES = [
    pytest.param(N, dtype, hard, id=f"N{N}-{name}-{'hard' if hard else 'soft'}",
                 marks=() if N == 392 or (dtype == torch.bfloat16 and hard) else pytest.mark.full_matrix)
    for N in (392, 272, 192, 393)
    for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16"))
    for hard in (True, False)
]


@pytest.mark.gpu
@pytest.mark.parametrize("N, dtype, hard", GPU_CASES)
def test_gpu_matrix(N, dtype, hard):
    _check_against_reference(*_inputs(32, N, dtype, device="cuda"), tau=1.0, hard=hard)
