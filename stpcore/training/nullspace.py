"""The privacy nullspace projection at the end of training (``TrainConfig.privacy_nullspace``, off by default).

After phase 2, linear probes (L2 logistic regression) are fitted to read each privacy attribute from the input of
the reconstruction head, LayerNorm(final kept token), over two passes of the training data with the eval-mode (top-k)
model; each probe's unit direction is projected out before the next probe is fitted, for K rounds over the
attributes (iterative nullspace projection, INLP: Ravfogel et al., ACL 2020). The product P of the projections is
folded into the head, W <- W P, so the model then writes no pixel along any of the 5K directions. Nothing else
changes: the keep decisions, the anonymizer and the action path are the trained model's, and nothing is retrained.

Why: phase 2's adversarial game leaves attributes readable along directions that the co-trained privacy recognizer
stopped using but a fresh phase-3 recognizer finds; a linear read-out of the tokens finds many of them
(BENCHMARKS.md, "The privacy nullspace projection").

The probes are fitted in torch (float64, Newton steps), so training needs no scikit-learn; with several processes
every rank collects its own shard and the sums (loss, gradient, Hessian) run over the ranks, so all ranks fit the
same probes.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from stpcore.models import STPrivacy
from stpcore.runtime import DistInfo, autocast


def _all_reduce(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(t)
    return t


def logistic_probe(x: torch.Tensor, y: torch.Tensor, info: DistInfo | None = None, c: float = 1.0,
                   max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """An L2-regularised logistic regression, ``min_w,b  0.5 |w|^2 + c * sum_i logloss(x_i w + b, y_i)`` (the
    intercept unpenalised: scikit-learn's ``LogisticRegression(C=c)``), by Newton's method with backtracking in
    float64. The objective is strictly convex, so a handful of steps reach the minimum to machine precision; each
    costs one (D+1)^2 Hessian over the rows.

    Args:
        x: (N, D) float64 features (this rank's rows).
        y: (N,) 0/1 labels.
        info: with world_size > 1, the sums run over every rank's rows (each rank calls this with its own).
        c: inverse regularisation strength.
        max_iter: Newton steps at most.

    Returns:
        w: (D,) float64, b: () float64; the same on every rank.
    """
    info = info or DistInfo()
    x1 = torch.cat([x.double(), torch.ones_like(x[:, :1], dtype=torch.float64)], dim=1)  # (N, D + 1)
    y = y.double()
    total = float(_all_reduce(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device), info))
    # The objective divided by c * N (the same minimiser, values of order 1); the bias is not penalised.
    reg = torch.full((x1.shape[1],), 1.0 / (c * total), dtype=torch.float64, device=x.device)
    reg[-1] = 0.0
    theta = torch.zeros(x1.shape[1], dtype=torch.float64, device=x.device)

    def objective(t: torch.Tensor) -> torch.Tensor:
        data = torch.nn.functional.binary_cross_entropy_with_logits(x1 @ t, y, reduction="sum")
        return _all_reduce(data, info) / total + 0.5 * (reg * t * t).sum()

    value = objective(theta)
    for _ in range(max_iter):
        p = torch.sigmoid(x1 @ theta)
        grad = _all_reduce(x1.T @ (p - y), info) / total + reg * theta
        hess = _all_reduce((x1 * (p * (1 - p))[:, None]).T @ x1, info) / total + torch.diag(reg)
        # The tiny ridge keeps the solve defined where every row is on one side (the bias direction is flat there).
        step = torch.linalg.solve(hess + 1e-12 * torch.eye(len(theta), dtype=torch.float64, device=x.device), grad)
        decrement = float(grad @ step)  # the Newton decrement squared: twice the predicted decrease
        if decrement < 1e-20:
            break
        size = 1.0
        while True:  # backtracking (Armijo): a full step is taken near the minimum
            candidate = theta - size * step
            new_value = objective(candidate)
            if new_value <= value - 0.25 * size * decrement or size < 1e-8:
                break
            size *= 0.5
        theta, value = candidate, new_value
    return theta[:-1], theta[-1]


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, info: DistInfo) -> float:
    """The fraction of rows (over all ranks) whose label the probe gets right."""
    right = torch.tensor([float(((x @ w + b > 0).double() == y.double()).sum()), float(x.shape[0])],
                         dtype=torch.float64, device=x.device)
    right = _all_reduce(right, info)
    return float(right[0] / right[1].clamp(min=1))


def privacy_nullspace(features: torch.Tensor, labels: torch.Tensor, rounds: int,
                      info: DistInfo | None = None) -> tuple[torch.Tensor, list[list[float | None]]]:
    """K rounds of INLP over the attributes.

    Args:
        features: (N, D) float64, this rank's rows.
        labels: (N, A) 0/1.
        rounds: K; each round fits one probe per attribute on the projected features and removes its direction.
        info: several processes: see :func:`logistic_probe`.

    Returns:
        projection: (D, D) float64, the product of the rank-one removals (I - w w^T); a row vector x becomes x P.
        accuracies: (K, A) each probe's training accuracy before its direction was removed (None where an attribute
            has one class only over all rows, which trains no probe).
    """
    info = info or DistInfo()
    dim = features.shape[1]
    eye = torch.eye(dim, dtype=torch.float64, device=features.device)
    projection = eye.clone()
    positives = _all_reduce(labels.double().sum(0), info)
    count = _all_reduce(torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=features.device), info)
    accuracies: list[list[float | None]] = []
    for _ in range(rounds):
        row: list[float | None] = []
        for a in range(labels.shape[1]):
            if positives[a] == 0 or positives[a] == count:
                row.append(None)
                continue
            projected = features @ projection
            w, b = logistic_probe(projected, labels[:, a], info)
            row.append(probe_accuracy(projected, labels[:, a], w, b, info))
            norm = w.norm()
            if norm == 0:  # the probe found nothing to read (all directions already gone)
                continue
            w = w / norm
            projection = projection @ (eye - torch.outer(w, w))
        accuracies.append(row)
    return projection, accuracies


def collect_decoder_inputs(model: STPrivacy, loader, device: torch.device, amp: str, passes: int,
                           first_epoch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The reconstruction head's input for every kept token of the eval-mode (top-k) model over ``passes`` passes
    of ``loader`` (epochs ``first_epoch``, ``first_epoch + 1``, ...: random crops differ between passes), labelled
    with its video's privacy attributes; videos without privacy labels are left out.

    Returns:
        features: (M, D) float64, labels: (M, 5), and the labelled clips seen (this rank).
    """
    from stpcore.tubelets import check_finite

    captured: list[torch.Tensor] = []
    features, labels = [], []
    clips_seen = 0
    hook = model.norm_recon.register_forward_hook(lambda mod, args, out: captured.append(out))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, amp):
            for p in range(passes):
                loader.set_epoch(first_epoch + p)
                for batch in loader:
                    clips = batch.clips.to(device)
                    check_finite(clips, name="video")
                    captured.clear()
                    model(clips)
                    feats = captured[0].double()  # (B, K, D)
                    labelled = batch.has_privacy.to(device).bool()
                    if not labelled.any():
                        continue
                    clips_seen += int(labelled.sum())
                    kept = feats.shape[1]
                    features.append(feats[labelled].reshape(-1, feats.shape[-1]))
                    labels.append(batch.privacy.to(device)[labelled].double().repeat_interleave(kept, dim=0))
    finally:
        hook.remove()
        model.train(was_training)
    if not features:
        dim = model.cfg.embed_dim
        return (torch.zeros(0, dim, dtype=torch.float64, device=device),
                torch.zeros(0, 5, dtype=torch.float64, device=device), 0)
    return torch.cat(features), torch.cat(labels), clips_seen


def project_privacy_out(model: STPrivacy, loader, device: torch.device, amp: str, info: DistInfo, rounds: int,
                        first_epoch: int, passes: int = 2) -> dict:
    """Fit K rounds of probes (:func:`privacy_nullspace`) on the training data and fold the projection into
    ``model.head_recon`` (its weight becomes W P; the bias stays). Every rank ends with the same head.

    Returns:
        a record for the metrics log: clips and tokens the probes saw, and each round's probe accuracies; with no
        labelled clip on any rank the head is left as it is (a warning says so) and ``clips`` is 0.
    """
    features, labels, clips = collect_decoder_inputs(model, loader, device, amp, passes, first_epoch)
    seen = _all_reduce(torch.tensor([float(clips), float(features.shape[0])], dtype=torch.float64, device=device),
                       info)
    if seen[0] == 0:
        warnings.warn("privacy_nullspace: no training clip with privacy labels was read, so no probe could be "
                      "fitted; the reconstruction head is left as trained. Check that the label keys "
                      "(<class>/<video>) match the videos", RuntimeWarning, stacklevel=3)
        return {"clips": 0, "tokens": 0, "probe_accuracy": []}
    projection, accuracies = privacy_nullspace(features, labels, rounds, info)
    with torch.no_grad():
        weight = model.head_recon.weight.double() @ projection  # (P, D) @ (D, D)
        model.head_recon.weight.copy_(weight.to(model.head_recon.weight.dtype))
    return {"clips": int(seen[0]), "tokens": int(seen[1]), "probe_accuracy": accuracies}
