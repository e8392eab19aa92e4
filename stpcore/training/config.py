"""The configuration of a training run (phases 1 and 2): :class:`TrainConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from stpcore.models import RecognizerConfig, STPrivacyConfig
from stpcore.runtime import AMP_CHOICES


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs (the single source of truth; a JSON config file may supply it).

    Args:
        data_root: dataset root in the HMDB51 or UCF101 layout.
        labels: privacy label file (.pickle or .csv); needed for phase 2.
        out_dir: where checkpoints, metrics.jsonl and the final model go.
        kind: dataset layout: "auto" (from the split files), "hmdb51" or "ucf101".
        split: the official split, 1 to 3.
        preset: model preset of STPrivacy and both recognizers ("vit_small" is the paper's).
        num_frames, image_size: override the preset's clip size (None: the preset's).
        batch_size: clips per step and process [G: 32].
        workers: data loader workers.
        decoder: "auto", "pyav" or "dali".
        stride: frame stride (None: the dataset's default, 2 for HMDB51, 4 for UCF101).
        short_side: resize target of the clips' short side before cropping (None: 8/7 of the crop).
        phase1_epochs, phase2_epochs: the paper's 80 and 40.
        base_lr: lr = base_lr * batch_size * world_size / 512 (the paper's 1e-3).
        weight_decay: AdamW weight decay (0.05), none on norms, biases and positional embeddings.
        warmup_epochs: linear warm-up, then cosine decay to min_lr_ratio * lr, per phase [G: 5 epochs].
        min_lr_ratio: floor of the cosine schedule [G: 0.01].
        clip_grad: max gradient norm (0 disables) [G: 1.0].
        action_weight, privacy_weight: phase-2 weights of CE(action) and BCE(privacy) (the paper's 0.5).
        decoder_init: how phase 2 starts the reconstruction head (LayerNorm -> Linear to tubelet pixels),
            which phase 1 never trains: "random" (its initialisation) or "lstsq" (fitted once, when phase 2
            begins, as the ridge-regression decoder from the frozen phase-1 model's kept final tokens to the
            input tubelets' pixels over one pass of the training data). The fit touches only that Linear
            layer and adds no loss: from then on only the adversarial objective shapes the output, as the
            paper says, but the game starts from a video that looks like the input instead of a random
            projection of features, which fresh recognizers read far better [G: "random"].
        privacy_objective: STPrivacy's privacy term in phase 2: "bce" (the paper: maximise the privacy
            recognizer's BCE) or "entropy" (maximise the binary entropy of its predictions, as in Wu et al.,
            TPAMI 2020: the optimum is an uncertain recognizer, not a confidently wrong one) [P: "bce"].
        sparsity_weight: weight of the sparsity loss in phases 1 and 2 [G: 1.0, the paper writes no weight].
            A larger weight holds the training-time keep fraction near alpha^m against the adversarial
            terms, so that it matches the per-slot top-k of inference.
        recognizer_lr_scale: recognizers' lr relative to STPrivacy's [G: 1.0].
        recognizer_warmup_epochs: the first phase-2 epochs train only the two recognizers, on the outputs of
            the (frozen) phase-1 STPrivacy, so that the adversarial game starts against informed recognizers
            rather than random ones [G: 0, the paper starts the game at once]. Part of phase2_epochs.
        privacy_restart_every: re-initialise the privacy recognizer (weights and optimizer state) every this
            many phase-2 epochs after the warm-up, so STPrivacy must hide the attributes from fresh
            recognizers (as phase 3 trains) rather than from the one it co-adapted with ("model restarting",
            Wu et al., TPAMI 2020) [G: 0, off]. With several adversaries (``privacy_adversaries``), one is
            restarted at a time, in turn, so the others keep what they learned.
        privacy_adversaries: ViT privacy recognizers trained side by side from different initialisations;
            STPrivacy's privacy term is the worst case over them (the one that reads the attributes best), as in
            SPAct's model ensemble (Dave et al., CVPR 2022) [G: 1, the paper's single adversary].
        stats_adversary_weight: weight of a second privacy term, from an appearance-statistics adversary
            (``stpcore.training.adversaries.StatsAdversary``: colour moments and soft histograms of the kept
            pixels, then an MLP), trained beside the ViT adversary with BCE; STPrivacy's term against it follows
            ``privacy_objective`` and is scaled by this weight alone (not by ``privacy_weight``). It is never
            restarted [G: 0, off].
        privacy_steps: updates of each privacy adversary per phase-2 step, on the same (detached) batch, so the
            adversaries catch up with a moving anonymizer faster than one step each allows [G: 1, the paper's].
        adversary_noise: standard deviation of Gaussian noise (in normalised pixel units) added to the video the
            privacy adversaries read, in STPrivacy's step and in theirs: an adversary that ignores small
            perturbations can only be fooled by changes larger than the noise [G: 0, off].
        privacy_replay: past phase-2 batches (STPrivacy's detached outputs, stored in fp16, with their labels) kept
            in a buffer; each privacy-adversary update adds one drawn from it, so the adversaries keep reading the
            codes STPrivacy used before and it cannot escape them by moving to a new one (the image history of
            Shrivastava et al., CVPR 2017). The buffer lives on the training device and is part of the checkpoint
            (every rank's own: with several processes, each rank resumes with its buffer, exactly); its size
            is n x one batch of videos in fp16 (the demo's: 0.8 MB a batch; vit_small at batch 32: 39 MB a batch)
            [G: 0, off].
        colour_spread_weight: weight of a penalty on how much the kept pixels' colour statistics vary between
            the clips of a batch (``adversaries.colour_spread``): a constraint on what STPrivacy may write into
            the kept tubelets, whatever the attributes [G: 0, off].
        amp: "auto" (bf16 autocast on CUDA, none on CPU) [G], "bf16" or "none".
        compile: torch.compile the models.
        checkpoint_every: steps between checkpoints (0: epoch ends only).
        log_every: steps between metrics lines.
        seed: seeds model init, Gumbel noise and data order.
        deterministic: torch.use_deterministic_algorithms (for exact resume checks; on CUDA with a fixed cuBLAS
            workspace, and an operation without a deterministic kernel warns rather than stops the run).
        init_2d: path of an ImageNet 2D ViT checkpoint (DeiT/timm layout) to inflate into all three models
            [G: None, random initialisation; the paper starts from an ImageNet ViT-S, which needs this file].
        progress: progress on rank 0 (a bar on a terminal, a line per epoch in a log).
        model_overrides: STPrivacyConfig fields changed from the preset (config file only, e.g.
            {"tau": 0.5}); those the recognizers share (the backbone's) apply to them too.
        validation: the fraction of the training videos held out for model selection and never trained on
            (``stpcore.data.splits.validation_partition``; 0: train on all) [G: 0].
        candidate_every: phase-2 epochs between candidate checkpoints, ``candidates/phase2-epochNNN.pt`` (the
            deployable format; 0: none). The last phase-2 epoch is always a candidate when this is set [G: 0].
            None is taken during the recognizer warm-up while the reconstruction head is untrained (decoder_init
            "random"): such a model outputs no anonymized video.
            Candidates are taken before ``privacy_nullspace`` (they are the phase-2 models as trained).
        privacy_nullspace: after phase 2, K rounds of linear probes for the privacy attributes on the reconstruction
            head's input, each probe's direction projected out of the head (``stpcore.training.nullspace``; 5K of
            the embed_dim directions go; no retraining) [G: 0, off; the demo uses 8].
    """

    data_root: str
    out_dir: str
    labels: str | None = None
    kind: str = "auto"
    split: int = 1
    preset: str = "vit_small"
    num_frames: int | None = None
    image_size: int | None = None
    batch_size: int = 32
    workers: int = 2
    decoder: str = "auto"
    stride: int | None = None
    short_side: int | None = None
    phase1_epochs: int = 80
    phase2_epochs: int = 40
    base_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    min_lr_ratio: float = 0.01
    clip_grad: float = 1.0
    action_weight: float = 0.5
    privacy_weight: float = 0.5
    sparsity_weight: float = 1.0
    decoder_init: str = "random"
    privacy_objective: str = "bce"
    recognizer_lr_scale: float = 1.0
    recognizer_warmup_epochs: int = 0
    privacy_restart_every: int = 0
    privacy_adversaries: int = 1
    stats_adversary_weight: float = 0.0
    privacy_steps: int = 1
    adversary_noise: float = 0.0
    privacy_replay: int = 0
    colour_spread_weight: float = 0.0
    amp: str = "auto"
    compile: bool = False
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    deterministic: bool = False
    init_2d: str | None = None
    progress: bool = True
    model_overrides: dict[str, Any] = field(default_factory=dict)
    validation: float = 0.0
    candidate_every: int = 0
    privacy_nullspace: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.validation < 1:
            raise ValueError(f"validation must be a fraction in [0, 1), got {self.validation}")
        if self.privacy_nullspace < 0:
            raise ValueError(f"privacy_nullspace must be >= 0 rounds (0: off), got {self.privacy_nullspace}")
        if self.candidate_every < 0:
            raise ValueError(f"candidate_every must be >= 0 (0: no candidates), got {self.candidate_every}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1 frame (None: the dataset's default), got {self.stride}")
        if self.phase1_epochs < 0 or self.phase2_epochs < 0:
            raise ValueError("phase1_epochs and phase2_epochs must be >= 0")
        if not 0 <= self.recognizer_warmup_epochs <= self.phase2_epochs:
            raise ValueError(f"recognizer_warmup_epochs must be in [0, phase2_epochs={self.phase2_epochs}], got "
                             f"{self.recognizer_warmup_epochs}")
        if self.privacy_objective not in ("bce", "entropy"):
            raise ValueError(f"privacy_objective must be 'bce' or 'entropy', got {self.privacy_objective!r}")
        if self.decoder_init not in ("random", "lstsq"):
            raise ValueError(f"decoder_init must be 'random' or 'lstsq', got {self.decoder_init!r}")
        if self.privacy_restart_every < 0:
            raise ValueError(f"privacy_restart_every must be >= 0 (0: off), got {self.privacy_restart_every}")
        if self.privacy_adversaries < 1:
            raise ValueError(f"privacy_adversaries must be >= 1, got {self.privacy_adversaries}")
        if self.privacy_replay < 0:
            raise ValueError(f"privacy_replay must be >= 0 (0: off), got {self.privacy_replay}")
        if self.privacy_steps < 1:
            raise ValueError(f"privacy_steps must be >= 1, got {self.privacy_steps}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {self.amp!r}")
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        negative = {name: getattr(self, name) for name in (
            "weight_decay", "warmup_epochs", "min_lr_ratio", "clip_grad", "action_weight", "privacy_weight",
            "sparsity_weight", "stats_adversary_weight", "colour_spread_weight", "adversary_noise",
            "recognizer_lr_scale", "checkpoint_every", "log_every", "workers")
            if not getattr(self, name) >= 0}  # NaN too
        if negative:
            raise ValueError(f"these settings must be >= 0 (a negative weight would flip its loss): {negative}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio (the cosine schedule's floor, a fraction of the lr) must be in [0, 1], "
                             f"got {self.min_lr_ratio}")

    def model_config(self, num_classes: int) -> STPrivacyConfig:
        extra = {k: v for k, v in (("num_frames", self.num_frames), ("image_size", self.image_size)) if v is not None}
        return STPrivacyConfig.from_name(self.preset, num_classes=num_classes, **extra, **self.model_overrides)

    def recognizer_config(self, num_outputs: int) -> RecognizerConfig:
        extra = {k: v for k, v in (("num_frames", self.num_frames), ("image_size", self.image_size)) if v is not None}
        backbone = {k: v for k, v in self.model_overrides.items() if k in {f.name for f in
                                                                          dataclasses.fields(RecognizerConfig)}}
        return RecognizerConfig.from_name(self.preset, num_outputs=num_outputs, **extra, **backbone)
