"""Fused hard straight-through Gumbel-softmax keep decision (the score predictor's tail), in Triton.

One elementwise pass per token: load the two log-probabilities, add Gumbel noise (injected, or drawn
in-kernel from Philox with a seed the kernel reads from a device tensor drawn from the caller's
torch.Generator, so a captured CUDA graph draws fresh noise on every replay), softmax over the pair with
temperature tau, take the argmax as a 0/1 keep decision (ties keep, as torch.argmax picks index 0), and
multiply by the previous decision. The forward writes only the (B, N) decision; the backward
recomputes the soft sample from the saved inputs (and regenerates in-kernel noise from its seed), so
nothing (B, N, 2)-sized is kept alive between the passes.

Bytes per token (fp32): forward 8 (log-probs) + 4 (prev_keep) + 4 (out), + 8 with injected noise;
backward adds 4 (grad_out) + 8 (grad_log_probs) + 4 (grad_prev_keep).

To mirror the reference's decisions bit for bit in fp16/bf16, every intermediate the reference rounds
to the input dtype (log_probs + noise, its division by tau, the softmax output) is rounded the same
way here before the comparison; the arithmetic itself is fp32. On the GPU that also needs the same
fp32 operations as torch's: an IEEE division (Triton's `/` is the approximate div.full.f32) and CUDA's
expf (tl.exp is ex2.approx), so the compiled branch of the INTERPRET constexpr uses tl.div_rn and
libdevice.exp; the interpreter runs numpy's exp, as it cannot call libdevice.

Backward of the straight-through expression ``(onehot + y - stopgrad(y))[..., 0] * prev_keep``, with
y = softmax((log_probs + g) / tau) and s = y0 * y1 / tau:
    d/d log_probs[..., 0] =  grad * prev_keep * s
    d/d log_probs[..., 1] = -grad * prev_keep * s
    d/d prev_keep         =  grad * onehot0        (grad * y0 for the soft sample)

The predictor ends in a log-softmax; since softmax((log_softmax(l) + g) / tau) = softmax((l + g) / tau)
and the gradient above sums to zero over the pair (so the log-softmax's Jacobian passes it unchanged),
:func:`gumbel_select_from_logits` runs the same kernels on the logits and skips the log-softmax.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from stpcore.kernels._launch import DTYPES, INTERPRET, device_guard, interpreter_reasons

_BLOCK = 1024  # tokens per program: a streaming elementwise op; 1024 keeps ~8 KB of loads in flight per CTA
# u in [0, 1) from Philox; clamping keeps -log(-log(u)) finite at both ends (|g| <= ~22 and ~17).
_U_MIN = 2.0**-32
_U_MAX = 1.0 - 2.0**-24


@triton.jit
def _gumbel_pair(seed, offs, U_MIN: tl.constexpr, U_MAX: tl.constexpr):
    """Two independent standard Gumbel samples per token from one Philox call (counter = token index)."""
    r0, r1, _, _ = tl.randint4x(seed, offs)
    u0 = tl.minimum(tl.maximum(tl.random.uint_to_uniform_float(r0), U_MIN), U_MAX)
    u1 = tl.minimum(tl.maximum(tl.random.uint_to_uniform_float(r1), U_MIN), U_MAX)
    return -tl.log(-tl.log(u0)), -tl.log(-tl.log(u1))


@triton.jit
def _exp(x, INTERPRET: tl.constexpr):
    """exp(x) as torch computes it on the GPU (CUDA's expf); numpy's in the interpreter."""
    if INTERPRET:
        y = tl.exp(x)
    else:
        y = libdevice.exp(x)
    return y


@triton.jit
def _soft_sample(lp_ptr, noise_ptr, seed_ptr, offs, mask, tau,
                 HAS_NOISE: tl.constexpr, U_MIN: tl.constexpr, U_MAX: tl.constexpr, INTERPRET: tl.constexpr):
    """(y0, y1) = softmax((log_probs + g) / tau), each step rounded to log_probs' dtype like the reference."""
    lp0 = tl.load(lp_ptr + 2 * offs, mask=mask, other=0.0)
    lp1 = tl.load(lp_ptr + 2 * offs + 1, mask=mask, other=0.0)
    dt = lp0.dtype
    if HAS_NOISE:
        g0 = tl.load(noise_ptr + 2 * offs, mask=mask, other=0.0).to(dt).to(tl.float32)
        g1 = tl.load(noise_ptr + 2 * offs + 1, mask=mask, other=0.0).to(dt).to(tl.float32)
    else:
        g0, g1 = _gumbel_pair(tl.load(seed_ptr), offs, U_MIN, U_MAX)
        g0 = g0.to(dt).to(tl.float32)
        g1 = g1.to(dt).to(tl.float32)
    z0 = (lp0.to(tl.float32) + g0).to(dt).to(tl.float32)
    z1 = (lp1.to(tl.float32) + g1).to(dt).to(tl.float32)
    # IEEE divisions, as the reference's (x * (1 / tau), or an approximate division, can differ by an ulp
    # and flip a near-tie).
    z0 = tl.div_rn(z0, tau).to(dt).to(tl.float32)
    z1 = tl.div_rn(z1, tau).to(dt).to(tl.float32)
    m = tl.maximum(z0, z1)
    e0 = _exp(z0 - m, INTERPRET)
    e1 = _exp(z1 - m, INTERPRET)
    y0 = tl.div_rn(e0, e0 + e1).to(dt).to(tl.float32)
    y1 = tl.div_rn(e1, e0 + e1).to(dt).to(tl.float32)
    return y0, y1


@triton.jit
def _gumbel_select_fwd_kernel(
    lp_ptr, noise_ptr, prev_ptr, out_ptr, seed_ptr,
    tau, n_tokens,
    HAS_NOISE: tl.constexpr, HARD: tl.constexpr, BLOCK: tl.constexpr,
    U_MIN: tl.constexpr, U_MAX: tl.constexpr, INTERPRET: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_tokens
    y0, y1 = _soft_sample(lp_ptr, noise_ptr, seed_ptr, offs, mask, tau, HAS_NOISE, U_MIN, U_MAX, INTERPRET)
    if HARD:
        keep = tl.where(y0 >= y1, 1.0, 0.0)  # ties keep: torch.argmax returns the first maximum
        keep = tl.where(y0 != y0, y0, keep)  # a NaN log-prob gives NaN, as the reference's does: never "drop"
    else:
        keep = y0
    prev = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offs, (keep * prev).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gumbel_select_bwd_kernel(
    lp_ptr, noise_ptr, prev_ptr, dout_ptr, dlp_ptr, dprev_ptr, seed_ptr,
    tau, n_tokens,
    HAS_NOISE: tl.constexpr, HARD: tl.constexpr, BLOCK: tl.constexpr,
    U_MIN: tl.constexpr, U_MAX: tl.constexpr, INTERPRET: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_tokens
    y0, y1 = _soft_sample(lp_ptr, noise_ptr, seed_ptr, offs, mask, tau, HAS_NOISE, U_MIN, U_MAX, INTERPRET)
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    prev = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(lp_ptr.dtype.element_ty).to(tl.float32)
    dz0 = tl.div_rn(dout * prev * y0 * y1, tau)  # d y0 / d z0 = y0 y1 = -d y0 / d z1; IEEE as torch's
    tl.store(dlp_ptr + 2 * offs, dz0.to(dlp_ptr.dtype.element_ty), mask=mask)
    tl.store(dlp_ptr + 2 * offs + 1, (-dz0).to(dlp_ptr.dtype.element_ty), mask=mask)
    if HARD:
        kept = tl.where(y0 >= y1, 1.0, 0.0)
        kept = tl.where(y0 != y0, y0, kept)
    else:
        kept = y0
    tl.store(dprev_ptr + offs, (dout * kept).to(dprev_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gumbel_noise_kernel(out_ptr, seed_ptr, n_tokens, BLOCK: tl.constexpr, U_MIN: tl.constexpr, U_MAX: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_tokens
    g0, g1 = _gumbel_pair(tl.load(seed_ptr), offs, U_MIN, U_MAX)
    tl.store(out_ptr + 2 * offs, g0, mask=mask)
    tl.store(out_ptr + 2 * offs + 1, g1, mask=mask)


def draw_seed(generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """A Philox seed in [0, 2**31 - 1), drawn from ``generator`` as a (1,) int64 tensor on ``device``, which the
    kernels read: no host sync, and inside a captured CUDA graph every replay draws a fresh seed.

    ``generator`` None: the default generator of ``device`` (so ``torch.manual_seed`` fixes the noise and the
    CUDA RNG state in a checkpoint reproduces it). A generator on another device draws there and the seed is
    copied over.
    """
    device = torch.device(device)
    where = generator.device if generator is not None else device
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=where, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


@functools.cache
def _no_seed(device: torch.device) -> torch.Tensor:
    """An int64 stand-in for the seed pointer when noise is given (never read): one pointer type per kernel
    signature, so the HAS_NOISE variants compile once, as the warm-up compiles them."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def _grid(n_tokens: int) -> tuple[int]:
    return (triton.cdiv(n_tokens, _BLOCK),)


def gumbel_noise(shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                 device: torch.device | str = "cuda") -> torch.Tensor:
    """The Gumbel noise :func:`gumbel_select` draws in-kernel for the same generator state, materialised.

    Args:
        shape: (B, N, 2).
        generator: consumed exactly as :func:`gumbel_select` consumes it (one seed draw).
        device: where to run the kernel.

    Returns:
        (B, N, 2) float32 standard Gumbel samples (for tests and debugging).
    """
    seed = draw_seed(generator, device)
    out = torch.empty(shape, device=device, dtype=torch.float32)
    n_tokens = out.numel() // 2
    if n_tokens:
        with device_guard(out):
            _gumbel_noise_kernel[_grid(n_tokens)](out, seed, n_tokens, BLOCK=_BLOCK, U_MIN=_U_MIN, U_MAX=_U_MAX)
    return out


def _gumbel_select_fwd(log_probs, noise, prev_keep, seed, tau, hard):
    out = torch.empty(log_probs.shape[:2], device=log_probs.device, dtype=log_probs.dtype)
    n_tokens = out.numel()
    if n_tokens:
        _gumbel_select_fwd_kernel[_grid(n_tokens)](
            log_probs, noise if noise is not None else log_probs, prev_keep, out,
            seed if seed is not None else _no_seed(log_probs.device), tau, n_tokens,
            HAS_NOISE=noise is not None, HARD=hard, BLOCK=_BLOCK, U_MIN=_U_MIN, U_MAX=_U_MAX, INTERPRET=INTERPRET,
        )
    return out


def _gumbel_select_bwd(log_probs, noise, prev_keep, grad_out, seed, tau, hard):
    grad_lp = torch.empty_like(log_probs)
    grad_prev = torch.empty_like(prev_keep)
    n_tokens = grad_out.numel()
    if n_tokens:
        _gumbel_select_bwd_kernel[_grid(n_tokens)](
            log_probs, noise if noise is not None else log_probs, prev_keep, grad_out, grad_lp, grad_prev,
            seed if seed is not None else _no_seed(log_probs.device), tau, n_tokens,
            HAS_NOISE=noise is not None, HARD=hard, BLOCK=_BLOCK, U_MIN=_U_MIN, U_MAX=_U_MAX, INTERPRET=INTERPRET,
        )
    return grad_lp, grad_prev


class _GumbelSelect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_probs, prev_keep, noise, seed, tau, hard):
        with device_guard(log_probs):
            out = _gumbel_select_fwd(log_probs, noise, prev_keep, seed, tau, hard)
        ctx.save_for_backward(log_probs, prev_keep, noise, seed)
        ctx.tau, ctx.hard = tau, hard
        return out

    @staticmethod
    def backward(ctx, grad_out):
        log_probs, prev_keep, noise, seed = ctx.saved_tensors
        with device_guard(log_probs):
            grad_lp, grad_prev = _gumbel_select_bwd(log_probs, noise, prev_keep, grad_out.contiguous(), seed,
                                                    ctx.tau, ctx.hard)
        return (
            grad_lp if ctx.needs_input_grad[0] else None,
            grad_prev if ctx.needs_input_grad[1] else None,
            # y depends on log_probs + noise, so a noise that requires grad gets log_probs' gradient.
            grad_lp.to(noise.dtype) if ctx.needs_input_grad[2] else None,
            None, None, None,
        )


def gumbel_select(
    log_probs: torch.Tensor,
    prev_keep: torch.Tensor,
    *,
    tau: float = 1.0,
    hard: bool = True,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep decision of one stage; see :func:`stpcore.ops.gumbel_select_ref`.

    Args:
        log_probs: (B, N, 2) fp16/bf16/fp32 log-probabilities (index 0: keep).
        prev_keep: (B, N) float, the previous cumulative decision (any float dtype).
        tau: softmax temperature (> 0).
        hard: straight-through one-hot (True) or the soft sample.
        noise: (B, N, 2) float standard Gumbel samples; when None they are drawn in-kernel from Philox,
            seeded by one draw from ``generator`` (the tensors' device's default generator when None) into a
            device tensor (:func:`draw_seed`), so the same generator state gives the same decisions (not the
            reference's: it draws differently).
        generator: see ``noise``.

    Returns:
        (B, N) in log_probs' dtype: exactly onehot0 * prev_keep (hard) or y0 * prev_keep (soft) in the
        forward; differentiable in log_probs and prev_keep.
    """
    seed = None if noise is not None else draw_seed(generator, log_probs.device)
    return _GumbelSelect.apply(
        log_probs.contiguous(), prev_keep.contiguous(), None if noise is None else noise.contiguous(),
        seed, float(tau), bool(hard),
    )


def gumbel_select_fwd(log_probs, prev_keep, noise, seed, tau: float, hard: bool) -> torch.Tensor:
    """The forward of ``torch.ops.stpcore.gumbel_select``: the (B, N) decision, from ``noise`` or, when it is
    None, from in-kernel noise seeded by ``seed`` ((1,) int64 on the device, :func:`draw_seed`)."""
    with device_guard(log_probs):
        return _gumbel_select_fwd(log_probs.contiguous(), None if noise is None else noise.contiguous(),
                                  prev_keep.contiguous(), seed, tau, hard)


def gumbel_select_bwd(log_probs, prev_keep, noise, seed, grad_out, tau: float, hard: bool):
    """The backward of ``torch.ops.stpcore.gumbel_select``: (grad_log_probs, grad_prev_keep, grad_noise); the
    noise's gradient is the log-probabilities' (zeros without noise)."""
    with device_guard(log_probs):
        grad_lp, grad_prev = _gumbel_select_bwd(log_probs.contiguous(),
                                                None if noise is None else noise.contiguous(),
                                                prev_keep.contiguous(), grad_out.contiguous(), seed, tau, hard)
    grad_noise = grad_lp.to(noise.dtype, copy=True) if noise is not None else log_probs.new_zeros(0)
    return grad_lp, grad_prev, grad_noise


def gumbel_select_from_logits(
    logits: torch.Tensor,
    prev_keep: torch.Tensor,
    *,
    tau: float = 1.0,
    hard: bool = True,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`gumbel_select` of ``logits.log_softmax(-1)``, without computing the log-softmax.

    Shift invariance of the softmax makes the decision and the soft sample independent of the
    log-softmax's constant; the straight-through gradient sums to zero over the pair, which the
    log-softmax's Jacobian (I - softmax) leaves unchanged. Only rounding differs from the two-step form.

    Args:
        logits: (B, N, 2) fp16/bf16/fp32 unnormalised scores (index 0: keep).
        prev_keep, tau, hard, noise, generator: as for :func:`gumbel_select`.

    Returns:
        (B, N) in logits' dtype, differentiable in logits and prev_keep.
    """
    return gumbel_select(logits, prev_keep, tau=tau, hard=hard, noise=noise, generator=generator)


def not_supported_reasons(
    log_probs: torch.Tensor,
    prev_keep: torch.Tensor,
    *,
    tau: float = 1.0,
    hard: bool = True,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Why the kernel cannot run these inputs (empty: it can); devices are checked by the dispatcher."""
    reasons = []
    if log_probs.dtype not in DTYPES:
        reasons.append(f"log_probs dtype {log_probs.dtype} is not one of fp16/bf16/fp32")
    if not prev_keep.is_floating_point():
        reasons.append(f"prev_keep must be a float tensor, got {prev_keep.dtype}")
    if noise is not None and not noise.is_floating_point():
        reasons.append(f"noise must be a float tensor, got {noise.dtype}")
    return reasons + interpreter_reasons(log_probs, prev_keep, noise)


def gumbel_select_fwd_reasons(log_probs, prev_keep, noise, seed, tau: float, hard: bool) -> list[str]:
    """:func:`not_supported_reasons` for the op's arguments (:func:`gumbel_select_fwd`)."""
    reasons = not_supported_reasons(log_probs, prev_keep, tau=tau, hard=hard, noise=noise)
    if noise is None and (seed is None or seed.dtype != torch.int64 or seed.numel() != 1):
        reasons.append("without noise, seed must be a (1,) int64 tensor")
    return reasons

