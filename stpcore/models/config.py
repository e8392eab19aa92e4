"""Frozen configs of the STPrivacy model and the video recognizers, with named presets.

The configs are the single source of truth for shapes: ``grid``, ``num_slots``, ``tokens_per_slot``
and ``num_tokens`` are derived from the clip size and the tubelet, never stored twice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeVar

_C = TypeVar("_C", bound="BackboneConfig")


@dataclass(frozen=True)
class BackboneConfig:
    """The ViT video backbone shared by STPrivacy and the recognizers.

    Args:
        num_frames: frames T per clip.
        image_size: clip height = width.
        tubelet: (pt, ph, pw) frames x pixels per token.
        embed_dim: token channels D; divisible by num_heads and by 12 (the score predictor splits D in
            thirds and narrows it to D/2 and D/4).
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden channels / D.
    """

    num_frames: int = 16
    image_size: int = 112
    tubelet: tuple[int, int, int] = (2, 16, 16)
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        # Accept lists (from JSON/YAML config files) but store tuples so the config stays hashable.
        object.__setattr__(self, "tubelet", tuple(int(v) for v in self.tubelet))
        if len(self.tubelet) != 3 or min(self.tubelet) < 1:
            raise ValueError(f"tubelet must be 3 positive ints (pt, ph, pw), got {self.tubelet}")
        for name in ("num_frames", "image_size", "embed_dim", "depth", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)}")
        if self.num_frames % self.tubelet[0]:
            raise ValueError(f"num_frames={self.num_frames} must be divisible by the tubelet's pt={self.tubelet[0]}")
        if self.image_size % self.tubelet[1] or self.image_size % self.tubelet[2]:
            raise ValueError(f"image_size={self.image_size} must be divisible by the tubelet's ph, pw = "
                             f"{self.tubelet[1:]}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if self.embed_dim % 12:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by 12 (the score predictor uses D/3, "
                             f"D/2 and D/4 channels)")
        if not (math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")

    @property
    def grid(self) -> tuple[int, int, int]:
        """(slots, rows, cols) of the tubelet grid."""
        pt, ph, pw = self.tubelet
        return self.num_frames // pt, self.image_size // ph, self.image_size // pw

    @property
    def num_slots(self) -> int:
        """Temporal slots (T / pt)."""
        return self.grid[0]

    @property
    def tokens_per_slot(self) -> int:
        """Spatial positions per slot ((H / ph) * (W / pw))."""
        return self.grid[1] * self.grid[2]

    @property
    def num_tokens(self) -> int:
        """Tokens N per clip (392 for ViT-S at 16 x 112 x 112)."""
        return self.num_slots * self.tokens_per_slot

    @property
    def tubelet_dim(self) -> int:
        """Pixel values per tubelet, pt * ph * pw * 3 (the reconstruction head's width)."""
        pt, ph, pw = self.tubelet
        return pt * ph * pw * 3

    @classmethod
    def from_name(cls: type[_C], name: str, **overrides: Any) -> _C:
        """The preset ``name`` of this config class, with fields replaced by ``overrides``."""
        presets = _PRESETS[cls]
        if name not in presets:
            raise ValueError(f"{cls.__name__}: unknown preset name={name!r}; choose one of {sorted(presets)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; fields are {sorted(fields)}")
        for key, value in overrides.items():  # of the preset's type (config files give JSON: "4" is no int)
            _check_type(cls.__name__, key, value, getattr(presets[name], key))
        return dataclasses.replace(presets[name], **overrides)


def _check_type(owner: str, key: str, value: Any, like: Any) -> None:
    """ValueError naming the field when ``value`` is not of the type of the preset's value ``like``."""
    if isinstance(like, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(like, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(like, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(like, (tuple, list)):
        ok = isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        kind = "a list of integers"
    else:
        return
    if not ok:
        raise ValueError(f"{owner}: field {key!r} must be {kind} (as the preset's {like!r}), got {value!r}")


@dataclass(frozen=True)
class STPrivacyConfig(BackboneConfig):
    """STPrivacy: backbone + 3-stage token sparsification + reconstruction + its own action head.

    Args (beyond :class:`BackboneConfig`):
        prune_locations: block indices before which a score predictor runs (3, 6, 9 [G, strongly
            implied]); strictly increasing, in [0, depth). The blocks from the last one on form the
            anonymization block.
        keep_ratio: alpha, the fraction of the tokens entering a stage that it keeps (0.7; cumulative
            0.7, 0.49, 0.343).
        num_classes: classes of the model's own action head (51 for HMDB51).
        attn_eps: smoothing of the training-mode policy attention (1e-6).
        tau: Gumbel-softmax temperature (1.0).
        zero_mean_tubelets: subtract from each reconstructed tubelet its own mean colour (per channel, over its
            pixels), so a kept tubelet carries structure and motion but no colour of its own: its mean is the
            normalised 0 that dropped tubelets hold at inference (in training they are masked, not zeroed)
            [G: False, the paper's free reconstruction; issue 16].
        binary_output: each reconstructed pixel is one of two levels, +1 or -1 in normalised units and the same
            in the three channels (after de-normalisation two tones, not pure greys): the sign of the decoded
            pixel's channel mean (0 counts as +1), with a straight-through gradient (the identity, that of the
            mean). A kept tubelet then shows a two-level shape and its motion, and no colour or small-amplitude
            code; dropped tubelets stay 0 [G: False, the paper's free reconstruction; issue 11]. Applied after
            ``zero_mean_tubelets`` when both are set.
        sign_free_tubelets: with ``binary_output``, each kept tubelet is flipped so that its majority level is -1
            (a tie counts as a majority of +1, which is then flipped): which side of an edge was brighter is lost,
            so a light shape on a dark ground and a dark shape on a light ground look the same. The flip is
            constant for the gradient [G: False; issue 11].
    """

    prune_locations: tuple[int, ...] = (3, 6, 9)
    keep_ratio: float = 0.7
    num_classes: int = 51
    attn_eps: float = 1e-6
    tau: float = 1.0
    zero_mean_tubelets: bool = False
    binary_output: bool = False
    sign_free_tubelets: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "prune_locations", tuple(int(v) for v in self.prune_locations))
        locs = self.prune_locations
        if any(b <= a for a, b in zip(locs, locs[1:], strict=False)):
            raise ValueError(f"prune_locations must be strictly increasing, got {locs}")
        if locs and (locs[0] < 0 or locs[-1] >= self.depth):
            raise ValueError(f"prune_locations must lie in [0, depth={self.depth}), got {locs}")
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.sign_free_tubelets and not self.binary_output:
            raise ValueError("sign_free_tubelets flips two-level tubelets: set binary_output=True with it")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not (math.isfinite(self.attn_eps) and self.attn_eps >= 0):
            raise ValueError(f"attn_eps must be a finite number >= 0, got {self.attn_eps}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be > 0, got {self.tau}")

    @property
    def num_stages(self) -> int:
        """Sparsification stages (score predictors)."""
        return len(self.prune_locations)

    def kept_per_slot(self, keep_ratio: float | None = None) -> tuple[int, ...]:
        """Tokens kept per temporal slot after each stage at inference: int(tokens_per_slot * ratio**(s+1)),
        at least 1 ((34, 24, 16) for ViT-S at 0.7). ``keep_ratio`` overrides the configured alpha."""
        ratio = self.keep_ratio if keep_ratio is None else keep_ratio
        if not 0 < ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {ratio}")
        # The small slack keeps e.g. 49 * 0.7**2 = 24.009999... and exact products like 16 * 0.5 = 8
        # from being floored one below the intended value by rounding.
        return tuple(max(1, int(self.tokens_per_slot * ratio ** (s + 1) + 1e-9)) for s in range(self.num_stages))


@dataclass(frozen=True)
class RecognizerConfig(BackboneConfig):
    """A ViT video classifier (action: num_outputs = classes; privacy: 5 attributes, sigmoid in the loss).

    Args (beyond :class:`BackboneConfig`):
        num_outputs: logits of the ``head_new`` classifier.
        attn_eps: smoothing of the policy attention in ``mode="policy"`` (1e-6, as in STPrivacy).
    """

    num_outputs: int = 51
    attn_eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {self.num_outputs}")
        if not (math.isfinite(self.attn_eps) and self.attn_eps >= 0):
            raise ValueError(f"attn_eps must be a finite number >= 0, got {self.attn_eps}")


_BACKBONES: dict[str, dict[str, Any]] = {
    # The paper's backbone: ViT-S on 16 x 112 x 112 clips, 2 x 16 x 16 tubelets, 8 slots x 49 tokens.
    "vit_small": {},
    "vit_base": {"embed_dim": 768, "num_heads": 12},
    # For tests and CPU demos: 8 x 32 x 32 clips, 2 x 8 x 8 tubelets -> 4 slots x 16 = 64 tokens.
    "tiny": {"num_frames": 8, "image_size": 32, "tubelet": (2, 8, 8), "embed_dim": 48, "depth": 4, "num_heads": 2},
}

STPRIVACY_PRESETS: dict[str, STPrivacyConfig] = {
    "vit_small": STPrivacyConfig(**_BACKBONES["vit_small"]),
    "vit_base": STPrivacyConfig(**_BACKBONES["vit_base"]),
    "tiny": STPrivacyConfig(**_BACKBONES["tiny"], prune_locations=(1, 2, 3)),
}

RECOGNIZER_PRESETS: dict[str, RecognizerConfig] = {name: RecognizerConfig(**kw) for name, kw in _BACKBONES.items()}

_PRESETS: dict[type, dict[str, Any]] = {
    BackboneConfig: {name: BackboneConfig(**kw) for name, kw in _BACKBONES.items()},
    STPrivacyConfig: STPRIVACY_PRESETS,
    RecognizerConfig: RECOGNIZER_PRESETS,
}

