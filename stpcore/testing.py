"""Helpers for comparing kernels with their references: one tolerance table, informative failures.

The rule (flash-attention's): a kernel's error against the fp32 reference may be at most about twice
the error of the PyTorch reference run in the same low precision, plus a small absolute floor. Where
no low-precision reference run is at hand, the table below gives absolute/relative tolerances per op
and dtype.
"""

from __future__ import annotations

import torch

# (op, dtype) -> (atol, rtol), against the fp32 (or fp64) reference. Ops not listed use "default".
TOLERANCES: dict[tuple[str, torch.dtype], tuple[float, float]] = {
    ("default", torch.float64): (1e-10, 1e-8),
    ("default", torch.float32): (2e-5, 1e-4),
    ("default", torch.float16): (2e-3, 1e-2),
    ("default", torch.bfloat16): (1.6e-2, 2e-2),
    # Attention outputs and gradients sum over N keys; gradients sum over N queries and H heads.
    ("policy_attention", torch.float32): (1e-4, 1e-3),
    ("policy_attention", torch.float16): (5e-3, 2e-2),
    ("policy_attention", torch.bfloat16): (3e-2, 5e-2),
    ("varlen_attention", torch.float32): (1e-4, 1e-3),
    ("varlen_attention", torch.float16): (5e-3, 2e-2),
    ("varlen_attention", torch.bfloat16): (3e-2, 5e-2),
    ("predictor_pool", torch.float32): (1e-5, 1e-4),
    ("predictor_pool", torch.float16): (3e-3, 1e-2),
    ("predictor_pool", torch.bfloat16): (2e-2, 2e-2),
    # Token moves are exact.
    ("gather_tokens", torch.float32): (0.0, 0.0),
    ("scatter_tokens", torch.float32): (0.0, 0.0),
    ("gather_tokens", torch.float16): (0.0, 0.0),
    ("scatter_tokens", torch.float16): (0.0, 0.0),
    ("gather_tokens", torch.bfloat16): (0.0, 0.0),
    ("scatter_tokens", torch.bfloat16): (0.0, 0.0),
}

# A kernel may be this many times worse than the same-precision PyTorch reference (plus the floor).
LOWP_FACTOR = 2.0


def tolerance(op: str, dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for ``op`` at ``dtype``."""
    return TOLERANCES.get((op, dtype), TOLERANCES[("default", dtype)])


def error_report(actual: torch.Tensor, expected: torch.Tensor) -> str:
    a, e = actual.detach().double(), expected.detach().double()
    diff = (a - e).abs()
    rel_rms = (diff.pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-30)).item()
    return (
        f"max abs err {diff.max().item():.3e}, mean abs err {diff.mean().item():.3e}, relative RMS {rel_rms:.3e}, "
        f"max |expected| {e.abs().max().item():.3e}"
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, op: str, dtype: torch.dtype | None = None,
                 name: str = "output", lowp_reference: torch.Tensor | None = None) -> None:
    """Assert ``actual`` (a kernel result) matches ``expected`` (the fp32 reference).

    Args:
        actual: kernel result, any float dtype.
        expected: reference result in fp32 (or fp64).
        op: key of the tolerance table.
        dtype: the precision the kernel ran in (default: actual.dtype).
        name: what is compared ("out", "dq", ...), for the message.
        lowp_reference: the PyTorch reference run in ``dtype``; when given, the kernel's max error may be
            at most LOWP_FACTOR times that reference's max error plus the table's atol.
    """
    dtype = dtype or actual.dtype
    if actual.shape != expected.shape:
        raise AssertionError(f"{op} {name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    atol, rtol = tolerance(op, dtype)
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(a).all() and torch.isfinite(e).all():
        raise AssertionError(f"{op} {name} ({dtype}): non-finite values where the reference is finite")
    err = (a - e).abs()
    if lowp_reference is not None:
        ref_err = (lowp_reference.detach().double() - e).abs().max().item()
        bound = LOWP_FACTOR * ref_err + atol
        if err.numel() and err.max().item() > bound:
            raise AssertionError(
                f"{op} {name} ({dtype}): {error_report(a, e)}; allowed {bound:.3e} = {LOWP_FACTOR} x the "
                f"{dtype} reference's {ref_err:.3e} + {atol:.1e}"
            )
        return
    bad = err > atol + rtol * e.abs()
    if bad.any():
        raise AssertionError(
            f"{op} {name} ({dtype}): {int(bad.sum())} of {bad.numel()} elements outside atol={atol:.1e}, "
            f"rtol={rtol:.1e}; {error_report(a, e)}"
        )


class RandomClipLoader:
    """An in-memory stand-in for a clip loader (tests and benchmarks): random clips, deterministic per epoch.

    Yields :class:`stpcore.data.Batch` batches: clips (B, 3, T, S, S), actions (B,), privacy (B, 5),
    has_privacy (B,), one clip per video (video_index counts the clips of an epoch, clip_index is 0). The
    action is written into the clip (a bright band whose row depends on the class) so that a model can learn
    it.
    """

    def __init__(self, num_batches: int, batch_size: int, num_frames: int, size: int, num_classes: int = 3,
                 seed: int = 0) -> None:
        self.num_batches, self.batch_size = num_batches, batch_size
        self.num_frames, self.size, self.seed = num_frames, size, seed
        self.classes = [f"class{i}" for i in range(num_classes)]
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        from stpcore.data import Batch

        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        B, C = self.batch_size, len(self.classes)
        for n in range(self.num_batches):
            actions = torch.randint(0, C, (B,), generator=g)
            clips = torch.randn(B, 3, self.num_frames, self.size, self.size, generator=g) * 0.5
            band = self.size // C
            for i, a in enumerate(actions.tolist()):
                clips[i, :, :, a * band : (a + 1) * band] += 2.0
            index = torch.arange(n * B, (n + 1) * B)
            yield Batch(
                clips=clips, actions=actions, privacy=torch.randint(0, 2, (B, 5), generator=g).float(),
                has_privacy=torch.ones(B, dtype=torch.bool), video_index=index,
                clip_index=torch.zeros(B, dtype=torch.int64),
                video_ids=[f"{self.classes[a]}/v{i}" for a, i in zip(actions.tolist(), index.tolist(), strict=True)],
            )


def separate_keep_scores(model, scale: float = 100.0):
    """Give an STPrivacy model's score predictors keep scores far apart (the tests' stand-in for trained weights).

    With the default initialisation (std 0.02) the predictors' logits are ~1e-5 apart, so rounding differences
    between two code paths (kernel and reference, compiled and eager, fp32 and bf16) can reorder them and flip
    a keep decision. Unit-gain weights with zero biases (activations of order 1, about half kept per stage, so
    comparisons are not trivial) and the last Linear scaled by ``scale`` put the logits far apart. At 100 most
    kept tokens' log-probs round to exactly 0.0 in fp32; comparisons of low-precision top-k use 10, so that
    they measure precision rather than tie-breaking. Modifies ``model`` in place and returns it.
    """
    with torch.no_grad():
        for pred in model.score_predictor:
            for layer in (pred.in_conv[1], pred.out_conv[0], pred.out_conv[2], pred.out_conv[4]):
                torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
                layer.bias.zero_()
            pred.out_conv[4].weight.mul_(scale)
    return model



class StopAfter:
    """Wraps a loader (tests): asks the trainer to stop, as SIGTERM would, after ``n`` batches in all. Set
    ``trainer`` once the Trainer exists."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n, self.trainer, self.seen = loader, n, None, 0
        self.classes = loader.classes
        if hasattr(loader, "report"):  # what it skipped (stpcore's loaders say), saved in checkpoints
            self.report = loader.report

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for batch in self.loader:
            self.seen += 1
            if self.seen == self.n:
                self.trainer._stop_signal = 15
            yield batch
