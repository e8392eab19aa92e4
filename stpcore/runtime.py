"""Run-time helpers shared by training, evaluation and the demo. Each takes plain values, not a config.

- :func:`autocast`: bf16 autocast by the ``amp`` setting ("auto": on CUDA only, "bf16", "none").
- :func:`param_groups`, :func:`lr_factor`, :func:`make_optimizer`: AdamW with linear warm-up then cosine.
- :class:`DistInfo`, :func:`init_distributed`, :func:`shutdown_distributed`: the torchrun process group.
- :func:`unwrap`: the module inside DDP / torch.compile wrappers.
- :func:`clip_loader`: a dataset loader at a clip geometry (short side 8/7 of the crop unless given).
"""

from __future__ import annotations

import math
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

AMP_CHOICES = ("auto", "bf16", "none")


def autocast(device: torch.device, amp: str) -> AbstractContextManager:
    """bf16 autocast when ``amp`` is "bf16", or "auto" on a CUDA device; otherwise no autocast (fp32)."""
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else nullcontext()


# -- optimisation -----------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on norms, biases and positional embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("pos_embed") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def steps_per_epoch(loader, batch_size: int) -> int:
    """The number of batches an epoch of ``loader`` yields; ValueError when it yields none (a batch size above
    the videos a process sees, with the last partial batch dropped), which would otherwise train nothing."""
    steps = len(loader)
    if steps < 1:
        records = getattr(loader, "records", None)
        videos = f"the {len(records)} training videos" if records is not None else "the training videos"
        raise ValueError(
            f"the training loader yields no batch: batch_size {batch_size} is more than {videos} one process sees "
            f"(the last partial batch is dropped); lower --batch-size, or add videos")
    return steps


def make_optimizer(model: nn.Module, lr: float, total_steps: int, warmup_steps: int, weight_decay: float,
                   min_lr_ratio: float) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and its per-step :func:`lr_factor` schedule [G: betas (0.9, 0.999), no decay
    on norms, biases and positional embeddings, as DeiT and VideoMAE]."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup_steps, min_lr_ratio))
    return opt, sched


# -- distributed ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def shutdown_distributed() -> None:
    """Leave the process group in order (a barrier, then destroy it), rather than while the process exits,
    where gloo can abort on a peer that already closed its sockets."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- data -------------------------------------------------------------------------------------------


def clip_loader(root, *, train: bool, num_frames: int, crop: int, short_side: int | None = None, **fields):
    """A loader of ``root``'s clips (``stpcore.data.get_loader``) at this geometry: the short side resized to
    ``short_side`` (default: the working scale, 8/7 of the crop; see ``stpcore.data.preprocess``), ``drop_last``
    in train mode.

    Args:
        fields: other ``stpcore.data.DataConfig`` fields (labels, batch_size, stride, decoder, seed, ...).
    """
    from stpcore.data import DataConfig, get_loader

    config = DataConfig(root=root, train=train, num_frames=num_frames, crop=crop,
                        short_side=short_side, **{"drop_last": train, **fields})
    return get_loader(config)
