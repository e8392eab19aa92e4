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
    """Standard Gumbel samples -log(E), E ~ Exp(1) (never infinite)."""
    e = torch.empty(shape, device=device, dtype=dtype).exponential_(generator=generator)
    return -e.log()


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


dispatch.register(
    "gumbel_select",
    dispatch.triton_backend("gumbel_select", "gumbel_select", lambda lp, pk, **k: [lp, pk, k.get("noise")]),
)
dispatch.register("gumbel_select", dispatch.Backend("reference", gumbel_select_ref))


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

    With ``noise`` given, every backend returns the same decision. Without it, each backend draws its
    own noise (the reference from ``generator``; Triton from a counter-based RNG seeded from it), so
    the decisions are deterministic per seed but differ between backends.
    """
    _check(log_probs, prev_keep, tau, noise)
    return dispatch.call("gumbel_select", backend, log_probs, prev_keep, tau=tau, hard=hard, noise=noise,
                         generator=generator)
