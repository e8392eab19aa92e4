"""The privacy nullspace projection at the end of training (``TrainConfig.privacy_nullspace``, off by default).

After phase 2, linear probes (L2 logistic regression) are fitted to read each privacy attribute from the input of
the reconstruction head, LayerNorm(final kept token), over two passes of the training loader with the eval-mode
(top-k) model (each pass drops the loader's last partial batch, as training does: 128 of the demo's 140 videos);
each probe's unit direction is projected out before the next probe is fitted, for K rounds over the attributes
(iterative nullspace projection, INLP: Ravfogel et al., ACL 2020). The product P of the projections is folded into
the head, W <- W P^T, so in fp32 the head writes nothing along any of the 5K directions (a bf16 copy of the weight
keeps them only at its rounding level). Nothing else changes: the keep decisions, the anonymizer and the action path
are the trained model's, and nothing is retrained.

Why: phase 2's adversarial game leaves attributes readable along directions that the co-trained privacy recognizer
stopped using but a fresh phase-3 recognizer finds; a linear read-out of the tokens finds many of them
(BENCHMARKS.md, "A lead: linear privacy directions projected out of the decoder" and "The privacy nullspace
projection in training").

The probes are fitted in torch (Newton steps, sums in float64 over chunks of rows; the features are kept in float32,
N x D x 4 bytes on the training device: 1.4 GB for vit_small on HMDB51), so training needs no scikit-learn. With
several processes every rank collects its own shard, the sums run over the ranks, and rank 0's Newton step is the one
every rank takes, so all ranks fit the same probes and leave their loops together.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from stpcore.data.labels import PRIVACY_ATTRIBUTES
from stpcore.models import STPrivacy
from stpcore.runtime import DistInfo, autocast
from stpcore.training.distributed import AgreedPass, PassStopped

CHUNK_ROWS = 1 << 16  # rows per float64 chunk: 65536 x 385 x 8 bytes = 200 MB for vit_small's D = 384


def check_rounds(rounds: int, dim: int) -> None:
    """ValueError when K rounds over the attributes would remove every one of the head's ``dim`` input directions."""
    removed = len(PRIVACY_ATTRIBUTES) * rounds
    if removed >= dim:
        raise ValueError(f"privacy_nullspace={rounds} would remove {removed} of the reconstruction head's {dim} input "
                         f"directions, leaving nothing to write; use at most {(dim - 1) // len(PRIVACY_ATTRIBUTES)} "
                         f"rounds")


def _all_reduce(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.broadcast(t, src=0)
    return t


def logistic_probe(x: torch.Tensor, y: torch.Tensor, info: DistInfo | None = None, c: float = 1.0,
                   max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """An L2-regularised logistic regression, ``min_w,b  0.5 |w|^2 + c * sum_i logloss(x_i w + b, y_i)`` (the
    intercept unpenalised: scikit-learn's ``LogisticRegression(C=c)``), by Newton's method with backtracking. The
    objective is strictly convex, so a handful of steps reach its minimum; each sums a (D+1)^2 Hessian over the rows,
    in float64, CHUNK_ROWS rows at a time.

    Args:
        x: (N, D) float32 or float64 features (this rank's rows).
        y: (N,) 0/1 labels.
        info: with world_size > 1, the sums run over every rank's rows (each rank calls this with its own).
        c: inverse regularisation strength.
        max_iter: Newton steps at most.

    Returns:
        w: (D,) float64.
        b: () float64.
        converged: whether the Newton decrement fell below 1e-14, or below 1e-8 where no step along the Newton
            direction lowered the objective any more (rounding); else max_iter ran out, or the line search failed
            far from the minimum, which keeps the last point that lowered it. The same on every rank.
    """
    info = info or DistInfo()
    n, dim = x.shape
    device = x.device
    total = float(_all_reduce(torch.tensor(float(n), dtype=torch.float64, device=device), info))
    reg = 1.0 / (c * total)  # the objective divided by c * N: the same minimiser, values of order 1
    theta = torch.zeros(dim + 1, dtype=torch.float64, device=device)  # (w, b)

    def sums(t: torch.Tensor, derivatives: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The objective at t, and with ``derivatives`` its gradient and Hessian, over every rank's rows."""
        w, b = t[:-1], t[-1]
        packed = torch.zeros(1 + (dim + 1) + (dim + 1) ** 2 if derivatives else 1, dtype=torch.float64, device=device)
        for i in range(0, n, CHUNK_ROWS):
            xc, yc = x[i:i + CHUNK_ROWS].double(), y[i:i + CHUNK_ROWS].double()
            z = xc @ w + b
            packed[0] += torch.nn.functional.binary_cross_entropy_with_logits(z, yc, reduction="sum")
            if derivatives:
                p = torch.sigmoid(z)
                grad, hess = packed[1:dim + 2], packed[dim + 2:].view(dim + 1, dim + 1)
                grad[:-1] += xc.T @ (p - yc)
                grad[-1] += (p - yc).sum()
                weighted = xc * (p * (1 - p))[:, None]
                column = weighted.sum(0)
                hess[:-1, :-1] += weighted.T @ xc
                hess[:-1, -1] += column
                hess[-1, :-1] += column
                hess[-1, -1] += (p * (1 - p)).sum()
        packed = _all_reduce(packed, info) / total
        value = packed[0] + 0.5 * reg * (w * w).sum()
        if not derivatives:
            return value, None, None
        penalty = torch.full((dim + 1,), reg, dtype=torch.float64, device=device)
        penalty[-1] = 0.0  # the intercept is not penalised
        grad = packed[1:dim + 2] + penalty * t
        hess = packed[dim + 2:].view(dim + 1, dim + 1) + torch.diag(penalty)
        return value, grad, hess

    eye = torch.eye(dim + 1, dtype=torch.float64, device=device)
    converged = False
    for _ in range(max_iter):
        value, grad, hess = sums(theta, derivatives=True)
        # The tiny ridge keeps the solve defined where every row is on one side (the bias direction is flat there).
        # Rank 0's step for all: every rank then takes the same decisions below, whatever its own rounding.
        step = _broadcast(torch.linalg.solve(hess + 1e-12 * eye, grad), info)
        decrement = float(grad @ step)  # the Newton decrement squared: twice the predicted decrease
        if not decrement >= 1e-14:  # converged: the predicted decrease is at float64's rounding of the sums
            converged = decrement < 1e-14  # (NaN: not converged; stop where we are)
            break
        size, accepted = 1.0, False
        while size >= 1e-8:  # backtracking (Armijo): a full step is taken near the minimum
            candidate = theta - size * step
            if float(sums(candidate, derivatives=False)[0]) <= float(value) - 0.25 * size * decrement:
                theta, accepted = candidate, True
                break
            size *= 0.5
        if not accepted:  # no step lowers the objective: theta is as good as rounding allows, if the step was tiny
            converged = decrement < 1e-8
            break
    return theta[:-1], theta[-1], converged


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                   info: DistInfo | None = None) -> float:
    """The fraction of rows (over all ranks) whose label the probe gets right."""
    info = info or DistInfo()
    right = torch.zeros(2, dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], CHUNK_ROWS):
        predicted = (x[i:i + CHUNK_ROWS].double() @ w + b > 0).double()
        right[0] += (predicted == y[i:i + CHUNK_ROWS].double()).sum()
    right[1] = x.shape[0]
    right = _all_reduce(right, info)
    return float(right[0] / right[1].clamp(min=1))


def privacy_nullspace(features: torch.Tensor, labels: torch.Tensor, rounds: int,
                      info: DistInfo | None = None) -> tuple[torch.Tensor, list[list[float | None]], int]:
    """K rounds of INLP over the attributes. ``features`` is projected in place as the rounds go.

    Args:
        features: (N, D) float32 or float64, this rank's rows; overwritten with the projected rows.
        labels: (N, A) 0/1.
        rounds: K; each round fits one probe per attribute on the projected features and removes its direction.
        info: several processes: see :func:`logistic_probe`.

    Returns:
        projection: (D, D) float64, P = I - U U^T, U the removed unit directions, each orthogonalised against the
            ones removed before it (as it would be in exact arithmetic): the product of the rank-one removals
            (I - w w^T), symmetric, idempotent, of rank D minus the directions removed. A row vector x becomes x P.
        accuracies: (K, A) each probe's training accuracy before its direction was removed (None where an attribute
            has one class only over all rows, which trains no probe).
        unconverged: probes whose Newton iteration stopped before convergence (their directions are removed all
            the same).
    """
    info = info or DistInfo()
    dim = features.shape[1]
    device = features.device
    removed = torch.zeros(dim, 0, dtype=torch.float64, device=device)  # (D, k) the unit directions removed so far
    positives = _all_reduce(labels.double().sum(0), info)
    count = _all_reduce(torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=device), info)
    accuracies: list[list[float | None]] = []
    unconverged = 0
    for _ in range(rounds):
        row: list[float | None] = []
        for a in range(labels.shape[1]):
            if positives[a] == 0 or positives[a] == count:
                row.append(None)
                continue
            w, b, converged = logistic_probe(features, labels[:, a], info)
            unconverged += not converged
            row.append(probe_accuracy(features, labels[:, a], w, b, info))
            # In exact arithmetic w lies in the span of the projected rows, orthogonal to every direction removed
            # before; in float32 rows the rounding left along those directions, which the weak L2 term there
            # (1 / (c N)) amplifies, tilts w by up to ~1e-3. Orthogonalise it (twice: classical Gram-Schmidt needs
            # the second pass) so that P stays an exact orthogonal projection.
            found = w.norm()
            for _ in range(2):
                w = w - removed @ (removed.T @ w)
            norm = w.norm()
            if not norm > 1e-9 * found:  # nothing new to read (or a zero or NaN probe): no direction to remove
                continue
            w = w / norm
            removed = torch.cat([removed, w[:, None]], dim=1)
            for i in range(0, features.shape[0], CHUNK_ROWS):  # the rows the same way, one chunk at a time
                chunk = features[i:i + CHUNK_ROWS]
                along = chunk.double() @ w
                chunk -= (along[:, None] * w[None, :]).to(chunk.dtype)
        accuracies.append(row)
    projection = torch.eye(dim, dtype=torch.float64, device=device) - removed @ removed.T
    return projection, accuracies, unconverged


def collect_decoder_inputs(model: STPrivacy, loader, device: torch.device, amp: str, passes: int,
                           first_epoch: int, info: DistInfo | None = None,
                           stop=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The reconstruction head's input for every kept token of the eval-mode (top-k) model over ``passes`` passes
    of ``loader`` (a clip loader, as ``Trainer`` takes; epochs ``first_epoch``, ``first_epoch + 1``, ...: the random
    crops differ between passes), labelled with its video's privacy attributes; videos without privacy labels are
    left out. Rows are in loader order, a video's kept tokens together. ``info``: the ranks (one process when None),
    which agree before each batch (:class:`~stpcore.training.distributed.AgreedPass`) on a bad clip and on ``stop``,
    a callable: when it is true on any rank, the passes end there on every rank and
    :class:`~stpcore.training.distributed.PassStopped` is raised on every rank.

    Returns:
        features: (M, D) float32.
        labels: (M, 5) float32, each row its video's attributes.
        clips: the labelled clips seen (this rank).

    Raises:
        ValueError: a clip holds NaN or Inf (on every rank when one rank finds one, so no rank waits for another).
    """
    from stpcore.tubelets import check_finite

    captured: list[torch.Tensor] = []
    features, labels = [], []
    clips_seen = 0
    agreed = AgreedPass(info or DistInfo(), device, stop)
    hook = model.norm_recon.register_forward_hook(lambda mod, args, out: captured.append(out))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, amp):
            for p in range(passes):
                loader.set_epoch(first_epoch + p)
                for batch in agreed.batches(loader):
                    clips = batch.clips.to(device)
                    try:
                        check_finite(clips, name="video")
                    except ValueError as exc:  # every rank ends the passes at the next batch
                        agreed.fail(exc)
                        continue
                    labelled = batch.has_privacy.to(device).bool()
                    if not labelled.any():
                        continue
                    captured.clear()
                    model(clips)
                    feats = captured[0].float()  # (B, K, D)
                    clips_seen += int(labelled.sum())
                    kept = feats.shape[1]
                    features.append(feats[labelled].reshape(-1, feats.shape[-1]))
                    labels.append(batch.privacy.to(device)[labelled].float().repeat_interleave(kept, dim=0))
                if agreed.stopped or agreed.failed:
                    break
    finally:
        hook.remove()
        model.train(was_training)
    if agreed.failed:
        raise agreed.error or ValueError("privacy_nullspace: another rank read a clip with NaN or Inf values; its "
                                         "message names the video")
    if agreed.stopped:
        raise PassStopped("the privacy-nullspace passes")
    if not features:
        dim = model.cfg.embed_dim
        return (torch.zeros(0, dim, device=device), torch.zeros(0, len(PRIVACY_ATTRIBUTES), device=device), 0)
    return torch.cat(features), torch.cat(labels), clips_seen


def project_privacy_out(model: STPrivacy, loader, device: torch.device, amp: str, info: DistInfo, rounds: int,
                        first_epoch: int, passes: int = 2, stop=None) -> dict:
    """Fit K rounds of probes (:func:`privacy_nullspace`) on the training data and fold the projection into
    ``model.head_recon`` (its weight W becomes W P^T; the bias stays). Every rank ends with the same head.

    Args:
        model: the (unwrapped) STPrivacy; loader: a clip loader as ``Trainer`` takes; device, amp: the trainer's.
        info: the process group's ranks; rounds: K; first_epoch, passes, stop: see :func:`collect_decoder_inputs`.

    Returns:
        a record for the metrics log: clips and tokens the probes saw, each round's probe accuracies and the probes
        that did not converge; with no labelled clip on any rank the head is left as it is (a warning says so) and
        ``clips`` is 0.

    Raises:
        ValueError: 5K >= embed_dim (nothing would be left for the head to write).
        RuntimeError: the projection came out non-finite (the head is left as it was).
    """
    check_rounds(rounds, model.cfg.embed_dim)
    features, labels, clips = collect_decoder_inputs(model, loader, device, amp, passes, first_epoch, info, stop)
    seen = _all_reduce(torch.tensor([float(clips), float(features.shape[0])], dtype=torch.float64, device=device),
                       info)
    if seen[0] == 0:
        warnings.warn("privacy_nullspace: no training clip with privacy labels was read, so no probe could be "
                      "fitted; the reconstruction head is left as trained. Check that the label keys "
                      "(<class>/<video>) match the videos", RuntimeWarning, stacklevel=3)
        return {"clips": 0, "tokens": 0, "probe_accuracy": [], "unconverged": 0}
    projection, accuracies, unconverged = privacy_nullspace(features, labels, rounds, info)
    del features
    if not torch.isfinite(projection).all():  # the same P on every rank (rank 0's steps), so all raise together
        raise RuntimeError("privacy_nullspace: the probes' projection is not finite (non-finite features?); the "
                           "reconstruction head is left as trained. Resume with --privacy-nullspace 0 to finish the "
                           "run without the projection")
    if unconverged:
        warnings.warn(f"privacy_nullspace: {unconverged} probe(s) stopped before convergence; their directions were "
                      f"removed as found", RuntimeWarning, stacklevel=3)
    with torch.no_grad():
        weight = model.head_recon.weight.double() @ projection.T  # (P, D) @ (D, D): x W^T becomes (x P) W^T
        model.head_recon.weight.copy_(weight.to(model.head_recon.weight.dtype))
    return {"clips": int(seen[0]), "tokens": int(seen[1]), "probe_accuracy": accuracies, "unconverged": unconverged}
