"""The configuration of a phase-3 evaluation: :class:`EvalConfig`, and the clip geometry a checkpoint fixes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from stpcore.models import BackboneConfig
from stpcore.runtime import AMP_CHOICES


@dataclass(frozen=True)
class EvalConfig:
    """Everything a phase-3 evaluation needs (the single source of truth; a JSON file may supply it).

    Args:
        data_root: dataset root in the HMDB51 or UCF101 layout (another dataset than training's for the
            unseen-actions protocol).
        labels: privacy label file (.pickle or .csv); without it the privacy metrics are NaN.
        kind: dataset layout: "auto" (from the split files), "hmdb51" or "ucf101".
        split: the official split, 1 to 3.
        preset: the recognizers' backbone preset; None: the STPrivacy checkpoint's backbone (same tubelet
            grid, needed to read its keep mask), or "vit_small" without a checkpoint.
        num_frames, image_size: clip size overrides (None: the checkpoint's, else the preset's); must equal
            the checkpoint's when one is used.
        epochs: recognizer training epochs (the paper's 80).
        batch_size: train clips per step.
        test_batch_size: test videos per batch (each brings 5 x 3 = 15 clips).
        workers: data loader workers.
        decoder: "auto", "pyav" or "dali".
        stride: frame stride (None: the dataset's default).
        short_side: resize target of the short side before cropping (None: 8/7 of the crop).
        base_lr: lr = base_lr * batch_size / 512 (the paper's 1e-3).
        weight_decay: AdamW weight decay (0.05), none on norms, biases and positional embeddings.
        warmup_epochs: linear warm-up, then cosine to min_lr_ratio * lr [G: 5 epochs].
        min_lr_ratio: floor of the cosine schedule [G: 0.01].
        clip_grad: max gradient norm (0 disables) [G: 1.0].
        amp: "auto" (bf16 autocast on CUDA, none on CPU) [G], "bf16" or "none".
        init_2d: an ImageNet 2D ViT checkpoint inflated into both recognizers (None: random init).
        out_dir: where eval_metrics.jsonl, results.* and sweep.* go.
        seed: recognizer initialisation and data order; the same for every method, so methods differ only
            in their transform.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        progress: progress (a bar on a terminal, a line per epoch in a log).
        attackers: the privacy attackers trained and scored, comma separated, from
            ``stpcore.evaluation.attackers.ATTACKERS`` ("vit", "frame_cnn", "stats"; default all). The table gives
            each one's scores and the worst case; the top-level cMAP / F1 / AP are vit's when it runs.
    """

    data_root: str
    labels: str | None = None
    kind: str = "auto"
    split: int = 1
    preset: str | None = None
    num_frames: int | None = None
    image_size: int | None = None
    epochs: int = 80
    batch_size: int = 32
    test_batch_size: int = 4
    workers: int = 2
    decoder: str = "auto"
    stride: int | None = None
    short_side: int | None = None
    base_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    min_lr_ratio: float = 0.01
    clip_grad: float = 1.0
    amp: str = "auto"
    init_2d: str | None = None
    out_dir: str = "runs/eval"
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    attackers: str = "vit,frame_cnn,stats"

    @property
    def attacker_names(self) -> tuple[str, ...]:
        from stpcore.evaluation.attackers import check_attackers

        return check_attackers([a.strip() for a in self.attackers.split(",") if a.strip()])

    def __post_init__(self) -> None:
        self.attacker_names  # noqa: B018 - validates: an unknown name is a ValueError listing the choices
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.test_batch_size < 1:
            raise ValueError(f"batch_size and test_batch_size must be >= 1, got {self.batch_size}, "
                             f"{self.test_batch_size}")
        if not 0 < self.base_lr < math.inf:
            raise ValueError(f"base_lr must be > 0 and finite, got {self.base_lr}")
        bad = {name: getattr(self, name) for name in ("weight_decay", "warmup_epochs", "clip_grad", "workers")
               if not 0 <= getattr(self, name) < math.inf}  # NaN too
        if bad:
            raise ValueError(f"these settings must be >= 0 and finite: {bad}")
        if not 0 <= self.min_lr_ratio <= 1:  # below 0 the cosine's end would be a negative lr: gradient ascent
            raise ValueError(f"min_lr_ratio (the cosine schedule's floor, a fraction of the lr) must be in [0, 1], "
                             f"got {self.min_lr_ratio}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1 frame (None: the dataset's default), got {self.stride}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {self.amp!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


def check_geometry(model_cfg: BackboneConfig, cfg: EvalConfig, source: str = "the checkpoint") -> tuple[int, int]:
    """(num_frames, image_size) of the evaluation clips; ValueError when cfg asks for another size than the
    STPrivacy model was trained on (its positional embeddings and token grid fix the clip size)."""
    wanted = {"num_frames": cfg.num_frames, "image_size": cfg.image_size}
    bad = [f"{k}={v} (model: {getattr(model_cfg, k)})" for k, v in wanted.items()
           if v is not None and v != getattr(model_cfg, k)]
    if bad:
        raise ValueError(
            f"clip geometry mismatch: {source} was trained on {model_cfg.num_frames} x {model_cfg.image_size} x "
            f"{model_cfg.image_size} clips but the data config asks for {', '.join(bad)}; drop the num_frames / "
            f"image_size overrides or use a checkpoint trained at that size"
        )
    return model_cfg.num_frames, model_cfg.image_size
