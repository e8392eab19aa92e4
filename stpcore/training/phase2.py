"""Phase-2 extras, each off by default (the paper's phase 2): the ridge-regression start of the reconstruction
head (``decoder_init="lstsq"``) and fresh privacy recognizers (``privacy_restart_every``)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from stpcore.models import STPrivacy, VideoRecognizer
from stpcore.runtime import DistInfo, autocast
from stpcore.training.config import TrainConfig
from stpcore.training.distributed import AgreedPass, PassStopped


def fit_decoder(model: STPrivacy, loader, device: torch.device, amp: str, info: DistInfo,
                ridge: float = 1e-3, stop=None) -> int:
    """Set ``model.head_recon`` to the ridge-regression map from LayerNorm(final kept tokens) of the eval-mode
    (top-k) model to the input tubelets' pixels, over one pass of ``loader`` (set to the current epoch by the
    caller). Normal equations in float64, summed over ranks, so every rank gets the same decoder.

    ``stop``: a callable checked before each batch; when it is true on any rank, the pass ends there on every rank
    (:class:`~stpcore.training.distributed.AgreedPass`) and :class:`~stpcore.training.distributed.PassStopped` is
    raised on every rank, the head unchanged.

    Returns:
        the clips seen over all ranks; 0 means no fit (the head keeps its initialisation, with a warning).
    """
    from stpcore.tubelets import check_finite, to_tubelets

    cfg = model.cfg
    dim, pixels = cfg.embed_dim, cfg.tubelet_dim
    xtx = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=device)
    xty = torch.zeros(dim + 1, pixels, dtype=torch.float64, device=device)
    captured: list[torch.Tensor] = []
    seen = 0
    agreed = AgreedPass(info, device, stop)
    hook = model.norm_recon.register_forward_hook(lambda mod, args, out: captured.append(out))
    model.eval()
    try:
        with torch.no_grad(), autocast(device, amp):
            for batch in agreed.batches(loader):
                clips = batch.clips.to(device)
                try:
                    check_finite(clips, name="video")  # the model's own check is off in training (Trainer._clips)
                except ValueError as exc:  # every rank ends the pass at the next batch
                    agreed.fail(exc)
                    continue
                seen += clips.shape[0]
                captured.clear()
                out = model(clips)
                feats = captured[0].double()  # (B, K, D), the kept tokens after the final LayerNorm
                target = to_tubelets(clips, cfg.tubelet).double()  # (B, N, P)
                target = target.gather(1, out.kept_positions[..., None].expand(-1, -1, pixels))
                x = torch.cat([feats, torch.ones_like(feats[..., :1])], dim=-1).reshape(-1, dim + 1)
                xtx += x.T @ x
                xty += x.T @ target.reshape(-1, pixels)
    finally:
        hook.remove()
        model.train()
    if agreed.failed:  # on every rank at the same batch (raised on one alone, it left the others in the sums below)
        raise agreed.error or ValueError("decoder_init='lstsq': another rank read a clip with NaN or Inf values; "
                                         "its message names the video")
    if agreed.stopped:
        raise PassStopped("the lstsq decoder fit")
    if info.world_size > 1:
        dist.all_reduce(xtx)
        dist.all_reduce(xty)
        total = torch.tensor([seen], dtype=torch.int64, device=device)
        dist.all_reduce(total)
        seen = int(total.item())  # the same on every rank, so all fit (or all keep) the head together
    if seen == 0:
        warnings.warn("decoder_init='lstsq': the training loader yielded no batches (fewer clips than one "
                      "batch with drop_last?); the reconstruction head keeps its random initialisation",
                      RuntimeWarning, stacklevel=3)
        return 0
    reg = ridge * xtx.diagonal().mean() * torch.eye(dim + 1, dtype=torch.float64, device=device)
    solution = torch.linalg.solve(xtx + reg, xty)  # (D + 1, P)
    with torch.no_grad():
        model.head_recon.weight.copy_(solution[:-1].T)
        model.head_recon.bias.copy_(solution[-1])
    return seen


def restart_due(cfg: TrainConfig, phase: str, epoch: int, step_in_epoch: int) -> bool:
    """At the start of every privacy_restart_every-th phase-2 epoch after the recognizer warm-up."""
    every, first = cfg.privacy_restart_every, cfg.recognizer_warmup_epochs
    return bool(phase == "phase2" and every and step_in_epoch == 0 and epoch > first and (epoch - first) % every == 0)


def restart_target(cfg: TrainConfig, epoch: int) -> str:
    """The privacy recognizer restarted at a restart epoch: with several (privacy_adversaries), each in turn,
    the first at the first restart ("privacy", then "privacy_1", ...)."""
    turn = (epoch - cfg.recognizer_warmup_epochs) // cfg.privacy_restart_every - 1
    index = turn % cfg.privacy_adversaries
    return "privacy" if index == 0 else f"privacy_{index}"


def fresh_privacy_recognizer(cfg: TrainConfig, epoch: int) -> dict:
    """The weights of a new privacy recognizer, seeded by (seed, epoch) so a resumed run restarts to the same."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 7919 + epoch)
        fresh = VideoRecognizer(cfg.recognizer_config(5))
    if cfg.init_2d:
        from stpcore.models import load_inflated_2d_vit

        load_inflated_2d_vit(fresh, cfg.init_2d)
    return fresh.state_dict()
