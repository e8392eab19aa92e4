"""Hard straight-through Gumbel-softmax keep decisions (STPrivacy training, one stage).

    y    = softmax((log_probs + g) / tau)              g: standard Gumbel noise, (B, N, 2)
    hard = onehot(argmax y)                            index 0 means "keep"; ties keep
    keep = (hard + (y - stopgrad(y)))[..., 0] * prev_keep

In the forward ``keep`` is exactly 0 or 1 (times prev_keep); the gradient is the softmax's
(straight-through). A dropped token (prev_keep == 0) is never revived.
"""

from __future__ import annotations

import torch

from stpcore.ops import dispatch


def sample_gumbel(shape: tuple[int, ...], *, generator: torch.Generator | None = None, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard Gumbel samples -log(E), E ~ Exp(1) (never infinite): drawn in fp32 at least and then cast, since
    in fp16 an E below about 3e-8 rounds to 0 (3 in 1e8 draws) and its sample was +inf (a NaN decision)."""
    e = torch.empty(shape, device=device, dtype=torch.promote_types(dtype, torch.float32)).exponential_(
        generator=generator)
    return (-e.log()).to(dtype)


def draw_seed(generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """A Philox seed in [0, 2**31 - 1) as a (1,) int64 tensor on ``device``, drawn from ``generator`` (the
    device's default generator when None; another device's generator draws there and the seed is copied):
    no host sync, and a fresh seed on every replay of a captured CUDA graph. The same draw as
    ``stpcore.kernels.gumbel_select.draw_seed``, which the kernel module's own entry points use."""
    device = torch.device(device)
    where = generator.device if generator is not None else device
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=where, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


def gumbel_select_ref(
    log_probs: torch.Tensor,
    prev_keep: torch.Tensor,
    *,
    tau: float = 1.0,
    hard: bool = True,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reference keep decision for one stage.

    Args:
        log_probs: (B, N, 2) float, log-probabilities (index 0: keep).
        prev_keep: (B, N) float in {0, 1} (or [0, 1]), the previous cumulative decision.
        tau: softmax temperature.
        hard: straight-through one-hot (True, the release) or the soft sample.
        noise: (B, N, 2) standard Gumbel samples; drawn with ``generator`` when None.

    Returns:
        (B, N) keep decision in log_probs' dtype, differentiable in log_probs and prev_keep.
    """
    if noise is None:
        noise = sample_gumbel(tuple(log_probs.shape), generator=generator, device=log_probs.device,
                              dtype=log_probs.dtype)
    y = ((log_probs + noise.to(log_probs.dtype)) / tau).softmax(dim=-1)
    if hard:
        onehot = torch.zeros_like(y).scatter_(-1, y.argmax(dim=-1, keepdim=True), 1.0)
        # onehot + (y - y.detach()) is exactly onehot in the forward (x - x == 0), unlike the usual
        # onehot - y.detach() + y, whose rounding can give 0.99999994.
        y = onehot + (y - y.detach())
    return y[..., 0] * prev_keep.to(y.dtype)


def _check(log_probs, prev_keep, tau, noise):
    if log_probs.dim() != 3 or log_probs.shape[-1] != 2:
        raise ValueError(f"gumbel_select: log_probs must be (B, N, 2), got {tuple(log_probs.shape)}")
    if prev_keep.shape != log_probs.shape[:2]:
        raise ValueError(
            f"gumbel_select: prev_keep must be (B, N) = {tuple(log_probs.shape[:2])}, got {tuple(prev_keep.shape)}"
        )
    if noise is not None and noise.shape != log_probs.shape:
        raise ValueError(f"gumbel_select: noise must be {tuple(log_probs.shape)}, got {tuple(noise.shape)}")
    if not tau > 0:
        raise ValueError(f"gumbel_select: tau must be > 0, got {tau}")


def _reference_fwd(log_probs, prev_keep, noise, seed, tau, hard):
    """The reference as the op runs it. Given a seed instead of noise (a CUDA call forced to the reference),
    it draws the noise from a generator seeded with it: one host sync, only in that case."""
    if noise is None:
        generator = torch.Generator(device=log_probs.device).manual_seed(int(seed.item()))
        noise = sample_gumbel(tuple(log_probs.shape), generator=generator, device=log_probs.device,
                              dtype=log_probs.dtype)
    return gumbel_select_ref(log_probs, prev_keep, tau=tau, hard=hard, noise=noise)


dispatch.register("gumbel_select", dispatch.triton_backend(
    "gumbel_select", "gumbel_select_fwd", lambda lp, pk, noise, seed, *a, **k: [lp, pk, noise, seed],
    reasons="gumbel_select_fwd_reasons", bwd="gumbel_select_bwd"))
dispatch.register("gumbel_select", dispatch.Backend("reference", _reference_fwd))


@torch.library.custom_op("stpcore::gumbel_select", mutates_args=())
def _op(log_probs: torch.Tensor, prev_keep: torch.Tensor, noise: torch.Tensor | None, seed: torch.Tensor | None,
        tau: float, hard: bool, backend: str) -> torch.Tensor:
    chosen = dispatch.select("gumbel_select", backend or None, log_probs, prev_keep, noise, seed, tau, hard)
    return chosen.fn(log_probs, prev_keep, noise, seed, tau, hard)


@_op.register_fake
def _(log_probs, prev_keep, noise, seed, tau, hard, backend):
    return log_probs.new_empty(log_probs.shape[:2])


@torch.library.custom_op("stpcore::gumbel_select_backward", mutates_args=())
def _backward_op(log_probs: torch.Tensor, prev_keep: torch.Tensor, noise: torch.Tensor | None,
                 seed: torch.Tensor | None, grad_out: torch.Tensor, tau: float, hard: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = dispatch.select("gumbel_select", backend or None, log_probs, prev_keep, noise, seed, tau, hard)
    if chosen.bwd is not None:
        return tuple(chosen.bwd(log_probs, prev_keep, noise, seed, grad_out, tau, hard))
    d_lp, d_prev, d_noise, _ = dispatch.recompute_backward(dispatch.reference("gumbel_select").fn,
                                                           (log_probs, prev_keep, noise, seed), (grad_out,), tau, hard)
    return d_lp, d_prev, d_noise if noise is not None else log_probs.new_zeros(0)


@_backward_op.register_fake
def _(log_probs, prev_keep, noise, seed, grad_out, tau, hard, backend):
    d_noise = noise.new_empty(noise.shape) if noise is not None else log_probs.new_empty(0)
    return log_probs.new_empty(log_probs.shape), prev_keep.new_empty(prev_keep.shape), d_noise


def _setup_context(ctx, inputs, output):
    log_probs, prev_keep, noise, seed, tau, hard, backend = inputs
    ctx.save_for_backward(log_probs, prev_keep, noise, seed)
    ctx.tau, ctx.hard, ctx.backend = tau, hard, backend


def _backward(ctx, grad_out):
    log_probs, prev_keep, noise, seed = ctx.saved_tensors
    d_lp, d_prev, d_noise = torch.ops.stpcore.gumbel_select_backward(log_probs, prev_keep, noise, seed, grad_out,
                                                                      ctx.tau, ctx.hard, ctx.backend)
    needs = ctx.needs_input_grad
    return (d_lp if needs[0] else None, d_prev if needs[1] else None,
            d_noise.to(noise.dtype) if noise is not None and needs[2] else None, None, None, None, None)


_op.register_autograd(_backward, setup_context=_setup_context)


def gumbel_select(
    log_probs: torch.Tensor,
    prev_keep: torch.Tensor,
    *,
    tau: float = 1.0,
    hard: bool = True,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Keep decision of one sparsification stage (see :func:`gumbel_select_ref`).

    With ``noise`` given, every backend returns the same decision. Without it, the noise is drawn here:
    for CUDA tensors (unless the reference is named) as a seed on the device from ``generator`` (its
    default generator when None), which the Triton kernel expands in-kernel, with no host sync, and afresh
    on every replay of a captured CUDA graph; otherwise as Gumbel samples from ``generator``. So the
    decisions are deterministic per seed but differ between the two. The op is
    ``torch.ops.stpcore.gumbel_select(log_probs, prev_keep, noise, seed, tau, hard, backend)``.
    """
    _check(log_probs, prev_keep, tau, noise)
    seed = None
    if noise is None:
        if backend == "triton" or (log_probs.device.type == "cuda" and backend != "reference"):
            seed = draw_seed(generator, log_probs.device)
        else:
            noise = sample_gumbel(tuple(log_probs.shape), generator=generator, device=log_probs.device,
                                  dtype=log_probs.dtype)
    if dispatch.direct_reference("gumbel_select", backend, log_probs, prev_keep, noise, seed, float(tau), bool(hard)):
        return _reference_fwd(log_probs, prev_keep, noise, seed, float(tau), bool(hard))  # plain autograd
    return torch.ops.stpcore.gumbel_select(log_probs, prev_keep, noise, seed, float(tau), bool(hard), backend or "")
