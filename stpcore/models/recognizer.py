"""The ViT video backbone shared by STPrivacy and the recognizers, and the video recognizer itself."""

from __future__ import annotations

import torch
from torch import nn

from stpcore import ops
from stpcore.layers import Block, TubeletEmbed
from stpcore.models.checkpoints import LoadReport, load_official_state_dict
from stpcore.models.config import BackboneConfig, RecognizerConfig
from stpcore.tubelets import check_clip, check_finite


class VideoTransformer(nn.Module):
    """Tubelet embedding + learnable positional embedding + ViT blocks (no CLS token).

    Module names equal the release's: ``patch_embed.proj`` (Conv3d), ``pos_embed`` (1, N, D),
    ``blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``. Subclasses add their heads and
    call :meth:`init_weights` at the end of their constructor.

    Initialisation [G, timm's ViT]: Linear weights truncated normal (std 0.02) with zero bias, LayerNorm
    ones / zeros, ``pos_embed`` truncated normal (std 0.02), the Conv3d PyTorch's default. In practice
    the backbone starts from an inflated ImageNet ViT (:func:`stpcore.models.load_inflated_2d_vit`).

    Args:
        cfg: the backbone's shapes.

    Attributes:
        validate: check the values of each input in ``forward`` (finite clips, keep masks in [0, 1]): a
            host sync per call, True by default for direct use. ``ClipAnonymizer`` and the trainer check
            their batches once at their boundary and turn it off; under ``torch.compile`` the value checks
            are skipped (a sync would break the graph), the shape checks stay.
    """

    # Modules stpcore adds that the release's model has no weights for: loading a release checkpoint
    # (:meth:`load_official_state_dict`) leaves them initialised and reports their keys as not_in_release.
    modules_not_in_release: tuple[str, ...] = ()

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.validate = True
        self.patch_embed = TubeletEmbed(cfg.embed_dim, cfg.tubelet)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))

    def init_weights(self) -> None:
        """(Re)initialise every parameter as documented in the class docstring."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def check_video(self, video: torch.Tensor) -> None:
        """Raise ValueError unless video is a finite float (B, 3, num_frames, image_size, image_size) clip."""
        cfg = self.cfg
        if not isinstance(video, torch.Tensor):
            raise ValueError(f"video must be a torch.Tensor (B, 3, T, H, W), got {type(video).__name__}")
        check_clip(video, cfg.tubelet, name="video")
        expected = (cfg.num_frames, cfg.image_size, cfg.image_size)
        if tuple(video.shape[2:]) != expected:
            raise ValueError(f"video must be (B, 3, {expected[0]}, {expected[1]}, {expected[2]}) for this config "
                             f"(T, H, W = num_frames, image_size, image_size), got shape {tuple(video.shape)}")
        if video.shape[0] < 1:
            raise ValueError("video must hold at least one clip (B >= 1), got B=0")
        if not video.is_floating_point():
            raise ValueError(f"video must be a float tensor, got {video.dtype}")
        if self.checks_values():
            check_finite(video)

    def checks_values(self) -> bool:
        """Whether ``forward`` checks its inputs' values (:attr:`validate`, and not while being compiled)."""
        return self.validate and not torch.compiler.is_compiling()

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, 3, T, H, W) float -> tokens (B, N, D) with positional embedding, t-major."""
        return self.patch_embed(video) + self.pos_embed

    def load_official_state_dict(self, state_dict: dict, strict: bool = True) -> LoadReport:
        """Load a state dict saved by the authors' release (or by stpcore); see
        :func:`stpcore.models.load_official_state_dict`. The release's keys are checked strictly; the
        modules in ``modules_not_in_release`` keep their initialisation when the state dict lacks them."""
        return load_official_state_dict(self, state_dict, strict=strict)


def masked_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over tokens: x (B, N, D), weights (B, N) in [0, 1] -> (B, D).

    Differentiable in both; a video whose weights are all zero pools to zeros, dividing by max(sum of weights, 1):
    the mean for 0/1 weights, and a bounded gradient there (as ``stpcore.ops.predictor_pool``).
    """
    w = weights.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


class VideoRecognizer(VideoTransformer):
    """ViT video classifier reading only kept tubelets (action recognizer, or privacy with num_outputs=5;
    the privacy sigmoid belongs to the loss, not the model).

    Heads: mean pool -> ``fc_norm`` (LayerNorm) -> ``head_new`` (Linear), the release's names. Every
    parameter has a counterpart in the release's recognizer (``action.py``, ``VisionTransformer`` with
    mean pooling), so its checkpoints load with no key left over.

    Args:
        cfg: the recognizer's config.
    """

    def __init__(self, cfg: RecognizerConfig) -> None:
        super().__init__(cfg)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head_new = nn.Linear(cfg.embed_dim, cfg.num_outputs)
        self.init_weights()

    def forward(self, video: torch.Tensor, keep: torch.Tensor | None = None, *, mode: str = "policy") -> torch.Tensor:
        """Classify a clip from its kept tubelets.

        Args:
            video: (B, 3, T, H, W) float, T/H/W as configured.
            keep: (B, N) keep mask over the tubelet tokens (t-major), or None for all tokens.
            mode: how the mask is applied (ignored when keep is None):
                "gather": keep must be 0/1 with the same count in every video; the kept tokens (with
                their positional embeddings) are gathered and run with plain attention, then mean
                pooled. Inference.
                "policy": all tokens stay; every block uses ``stpcore.ops.policy_attention`` with keep
                as the policy, and the final tokens are pooled with a keep-weighted mean. keep may be
                soft or vary per video; differentiable in keep and in the video. Training.

        Returns:
            (B, num_outputs) logits in the video's dtype.
        """
        self.check_video(video)
        if mode not in ("policy", "gather"):
            raise ValueError(f"mode must be 'policy' or 'gather', got {mode!r}")
        x = self.embed(video)  # (B, N, D)
        B, N, _ = x.shape
        if keep is None:
            for blk in self.blocks:
                x = blk(x)
            pooled = x.mean(dim=1)
        else:
            _check_keep(keep, B, N, values=self.checks_values())
            if mode == "gather":
                idx = _equal_count_indices(keep)  # (B, K)
                x = ops.gather_tokens(x, idx)  # (B, K, D)
                for blk in self.blocks:
                    x = blk(x)
                pooled = x.mean(dim=1)
            else:
                policy = keep.to(x.dtype)
                for blk in self.blocks:
                    x = blk(x, policy=policy, eps=self.cfg.attn_eps)
                pooled = masked_mean(x, policy)
        return self.head_new(self.fc_norm(pooled))


def _check_keep(keep: torch.Tensor, batch: int, num_tokens: int, values: bool = True) -> None:
    if not isinstance(keep, torch.Tensor) or tuple(keep.shape) != (batch, num_tokens):
        shape = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"keep must be a (B, N) = ({batch}, {num_tokens}) tensor, got {shape}")
    if keep.dtype != torch.bool:
        if not keep.is_floating_point():
            raise ValueError(f"keep must be a bool or float tensor, got {keep.dtype}")
        if values and not bool(((keep >= 0) & (keep <= 1)).all()):
            raise ValueError("keep must lie in [0, 1] (and be finite)")


def _equal_count_indices(keep: torch.Tensor) -> torch.Tensor:
    """(B, N) 0/1 mask with equal counts per row -> (B, K) int64 kept positions, ascending."""
    kept = keep != 0
    if keep.dtype != torch.bool and not bool(((keep == 0) | (keep == 1)).all()):
        raise ValueError("keep must be exactly 0/1 in mode='gather' (use mode='policy' for soft masks)")
    counts = kept.sum(dim=1)
    if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
        raise ValueError(f"keep: mode='gather' needs the same, nonzero number of kept tokens in every video, got "
                         f"counts {counts.tolist()}; use mode='policy' for variable counts")
    # nonzero() is row-major, so each row's positions come out ascending.
    return kept.nonzero()[:, 1].reshape(keep.shape[0], int(counts[0]))
