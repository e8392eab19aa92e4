"""State-dict key names and tensor shapes of the authors' release, written down as test data.

Read from github.com/ming1993li/stprivacy at commit c64b6deace120d338b57bbd37ad4910905fe9bad:

- ``stprivacy.py``, class ``STPrivacy`` (with its ``PatchEmbed``, ``Block``, ``Attention``, ``Mlp`` and
  ``PredictorLG``), built as the paper's ViT-S: img_size=112, patch_size=16, tubelet_size=2,
  all_frames=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
  representation_size=None (``pre_logits`` is an Identity), three prune locations (3, 6, 9).
  It has no CLS token (``cls_token = None``) and no classifier: ``num_classes`` is overwritten by the
  reconstruction width 16 * 16 * 2 * 3 = 1536 for ``head_recon``; ``head`` only appears through
  ``reset_classifier``, which the release never calls.
- ``action.py``, class ``VisionTransformer`` through ``vit_small_patch16`` (embed_dim=384, depth=12,
  num_heads=6, qkv_bias=True, LayerNorm eps 1e-6), the action and privacy recognizer, with
  img_size=112, all_frames=16, tubelet_size=2 and the defaults init_values=0 (no ``gamma_1/2``),
  use_learnable_pos_emb=True (``pos_embed`` is a parameter) and use_mean_pooling=True (``norm`` is an
  Identity; ``fc_norm`` a LayerNorm). Its classifier is ``head_new``: 51 outputs for HMDB51 actions,
  5 for the privacy attributes. (The release has no training script, so img_size=112 and the output
  counts come from the paper; the names do not depend on them.)

The listing was also checked by instantiating both classes outside this repository with parameter-free
stand-ins for the three timm helpers they import (DropPath, to_2tuple, trunc_normal_), which add no
state: 181 keys for STPrivacy, 151 for each recognizer.
"""

from __future__ import annotations

DEPTH = 12
NUM_PRUNE_LOCATIONS = 3

# One transformer block (the release's Block; the same names in stprivacy.py and action.py).
_BLOCK: dict[str, tuple[int, ...]] = {
    "norm1.weight": (384,),
    "norm1.bias": (384,),
    "attn.qkv.weight": (1152, 384),
    "attn.qkv.bias": (1152,),
    "attn.proj.weight": (384, 384),
    "attn.proj.bias": (384,),
    "norm2.weight": (384,),
    "norm2.bias": (384,),
    "mlp.fc1.weight": (1536, 384),
    "mlp.fc1.bias": (1536,),
    "mlp.fc2.weight": (384, 1536),
    "mlp.fc2.bias": (384,),
}

# One PredictorLG: in_conv = (LayerNorm, Linear, GELU), out_conv = (Linear, GELU, Linear, GELU, Linear, LogSoftmax).
_PREDICTOR: dict[str, tuple[int, ...]] = {
    "in_conv.0.weight": (384,),
    "in_conv.0.bias": (384,),
    "in_conv.1.weight": (384, 384),
    "in_conv.1.bias": (384,),
    "out_conv.0.weight": (192, 384),
    "out_conv.0.bias": (192,),
    "out_conv.2.weight": (96, 192),
    "out_conv.2.bias": (96,),
    "out_conv.4.weight": (2, 96),
    "out_conv.4.bias": (2,),
}

_EMBEDDING: dict[str, tuple[int, ...]] = {
    "pos_embed": (1, 392, 384),  # 8 slots x 7 x 7 positions, no CLS entry
    "patch_embed.proj.weight": (384, 3, 2, 16, 16),  # Conv3d, kernel = stride = tubelet
    "patch_embed.proj.bias": (384,),
}


def _blocks() -> dict[str, tuple[int, ...]]:
    return {f"blocks.{i}.{name}": shape for i in range(DEPTH) for name, shape in _BLOCK.items()}


def stprivacy_vit_small() -> dict[str, tuple[int, ...]]:
    """{key: shape} of the release's ``STPrivacy(...).state_dict()`` for ViT-S (181 keys), in its order."""
    keys = {**_EMBEDDING, **_blocks()}
    keys["norm_recon.weight"] = (384,)
    keys["norm_recon.bias"] = (384,)
    keys["head_recon.weight"] = (1536, 384)  # 2 x 16 x 16 x 3 pixels per tubelet
    keys["head_recon.bias"] = (1536,)
    for s in range(NUM_PRUNE_LOCATIONS):
        keys.update({f"score_predictor.{s}.{name}": shape for name, shape in _PREDICTOR.items()})
    return keys


def recognizer_vit_small(num_classes: int) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the release's ``vit_small_patch16(num_classes=...).state_dict()`` (151 keys), in its order."""
    keys = {**_EMBEDDING, **_blocks()}
    keys["fc_norm.weight"] = (384,)
    keys["fc_norm.bias"] = (384,)
    keys["head_new.weight"] = (num_classes, 384)
    keys["head_new.bias"] = (num_classes,)
    return keys
