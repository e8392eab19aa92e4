"""Model files: the deployed STPrivacy's own format, the authors' released weights, and an ImageNet 2D ViT
inflated into the video backbone.

- :func:`save_anonymizer` / :func:`load_anonymizer`: the trained STPrivacy alone ("stpcore-stprivacy-v1",
  ``stprivacy.pt``), what ``stpcore anonymize --checkpoint`` reads; :func:`load_anonymizer` also takes a
  training checkpoint ("stpcore-train-v1", ``last.pt``) and picks the anonymizer out of it.
- :func:`load_official_state_dict`: the release's state dicts; :func:`load_inflated_2d_vit`: DeiT / timm.

Files are read with ``torch.load(..., weights_only=True)``: a checkpoint is data, and unpickling
arbitrary objects could run code.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from stpcore.media import atomic_path
from stpcore.models.config import BackboneConfig

if TYPE_CHECKING:
    from stpcore.models.stprivacy import STPrivacy

STPRIVACY_FORMAT = "stpcore-stprivacy-v1"  # the deployed model: weights, config, class names
TRAIN_FORMAT = "stpcore-train-v1"  # a training run's checkpoint (stpcore.training.state)

# Wrappers training scripts put around a state dict, unwrapped in this order.
_WRAPPER_KEYS = ("model", "state_dict", "module")
# Parameters the inflated 2D ViT provides; everything else (predictors, heads) starts fresh.
_BACKBONE_PREFIXES = ("patch_embed.", "pos_embed", "blocks.")


class LoadReport(NamedTuple):
    """What a load did, as sorted key lists.

    Attributes:
        missing: keys the state dict should provide and lacks (they keep their initialisation): the
            release's keys, and for a state dict saved by stpcore also its stpcore-only ones.
        unexpected: keys of the state dict the model does not have (not loaded).
        not_in_release: keys of stpcore-only modules (``model.modules_not_in_release``, e.g. STPrivacy's
            phase-1 action head) that the state dict does not provide: the release has no weights for
            them, so they keep their initialisation. Never an error.
    """

    missing: list[str]
    unexpected: list[str]
    not_in_release: list[str]


def load_weights_only(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """``torch.load(path, weights_only=True)`` with errors that say what is wrong with the file.

    Raises:
        ValueError: no such file; a file holding more than tensors and plain data (refused: loading it
            could run code); or not a torch checkpoint at all (damaged, another format).
    """
    import pickle

    if not os.path.isfile(path):
        raise ValueError(f"{os.fspath(path)}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the refused global as "Unsupported global: GLOBAL x.y was not an allowed global" or, for
        # modules it blocks outright (os, posix, subprocess, ...), "unsupported GLOBAL posix.system whose module".
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(exc))
        if found is None:  # no refused global: the reader stopped at bytes that are not a checkpoint's
            operand = re.search(r"Unsupported operand \S+|invalid load key[^\n]*", str(exc))
            raise ValueError(
                f"{os.fspath(path)}: not a torch checkpoint (the weights-only reader stopped: "
                f"{operand.group(0) if operand else 'unreadable'}); give a .pt file written by stpcore or torch.save"
            ) from None
        raise ValueError(
            f"{os.fspath(path)}: refused: the checkpoint holds Python objects besides tensors and plain data"
            f" ({found.group(1)}), and stpcore never unpickles those (it could run code). Use a file written by "
            f"stpcore, or re-save the model's state_dict() with torch.save") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types (KeyError, RuntimeError, EOFError) for non-checkpoints
        raise ValueError(f"{os.fspath(path)}: not a readable torch checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from exc


def unwrap_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """The plain {name: tensor} dict inside a checkpoint.

    Unwraps {"model": ...} / {"state_dict": ...} / {"module": ...} and strips a leading "module."
    (DataParallel / DistributedDataParallel) from every key.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"state_dict must be a mapping of names to tensors, got {type(obj).__name__}")
    while True:
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state_dict: entry {key!r} is a {type(value).__name__}, expected a tensor")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def _key_list(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _stpcore_only_keys(model: nn.Module, keys: Iterable[str]) -> set[str]:
    """The ``keys`` (of the model's state dict) that belong to modules the release does not have.

    A model names them in its ``modules_not_in_release`` class attribute (module names such as
    ``"head"``; a key belongs to one when it equals the name or starts with the name and a dot, so
    ``head_recon.weight`` is not ``head``'s).
    """
    modules = tuple(getattr(model, "modules_not_in_release", ()))
    return {k for k in keys if any(k == m or k.startswith(m + ".") for m in modules)}


def load_official_state_dict(model: nn.Module, state_dict: Mapping, strict: bool = True) -> LoadReport:
    """Load a state dict written by the authors' release (same module names) into ``model``.

    The release's key set is the model's minus its stpcore-only modules (``model.modules_not_in_release``:
    STPrivacy's phase-1 action head ``fc_norm`` / ``head``; nothing for the recognizers). Those keys are
    checked strictly; the stpcore-only ones are optional and, when absent, keep their initialisation and
    are listed in ``not_in_release``. A state dict that provides some of them (one saved by stpcore) must
    provide all of them: the rest count as missing.

    Args:
        model: an :class:`~stpcore.models.STPrivacy` or :class:`~stpcore.models.VideoRecognizer`.
        state_dict: {name: tensor}, possibly wrapped (see :func:`unwrap_state_dict`).
        strict: raise when keys are missing or unexpected; otherwise load the common keys and report.

    Returns:
        LoadReport(missing, unexpected, not_in_release), sorted key lists.

    Raises:
        ValueError: a shape differs (always), or keys are missing / unexpected (strict); the message
        lists the keys. Nothing is loaded when it raises.
    """
    sd = unwrap_state_dict(state_dict)
    own = model.state_dict()
    only_stpcore = _stpcore_only_keys(model, own)
    given = set(sd)
    # A release checkpoint has none of the stpcore-only keys; one saved by stpcore has them all.
    required = set(own) if given & only_stpcore else set(own) - only_stpcore
    missing = sorted(required - given)
    unexpected = sorted(given - set(own))
    not_in_release = sorted(only_stpcore - given - required)
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(given & set(own)) if sd[k].shape != own[k].shape]
    if mismatched:
        raise ValueError(f"state_dict: {len(mismatched)} shape mismatch(es) (is the config right?): "
                         f"{_key_list(mismatched)}")
    if strict and (missing or unexpected):
        raise ValueError(
            f"state_dict does not match the model: {len(missing)} missing key(s) [{_key_list(missing)}], "
            f"{len(unexpected)} unexpected key(s) [{_key_list(unexpected)}]; pass strict=False to load the rest"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return LoadReport(missing, unexpected, not_in_release)


def inflate_2d_vit(state_dict_2d: Mapping, cfg: BackboneConfig) -> dict[str, torch.Tensor]:
    """Convert an ImageNet 2D ViT (DeiT / timm layout) into the video backbone's parameters.

    - ``patch_embed.proj.weight`` (D, 3, ph, pw) -> (D, 3, pt, ph, pw): repeated over the pt frames and
      divided by pt, so a temporally constant clip embeds as the 2D image would; the bias is copied.
    - ``pos_embed`` (1, P + g*g, D), P = 1 with a CLS token (2 with DeiT's distillation token): the
      prefix entries are dropped, the g x g grid resized to the tubelet grid (bicubic as the spec says, without
      antialiasing, as timm's older resize_pos_embed; today's resample_abs_pos_embed also antialiases) and
      repeated over the temporal slots (t-major).
    - ``blocks.*`` copied unchanged; the block count must equal cfg.depth.
    - ``cls_token``, ``dist_token``, ``norm.*``, ``fc_norm.*``, ``head*`` and any other key are dropped.

    Args:
        state_dict_2d: the 2D model's {name: tensor} (wrappers and "module." are removed).
        cfg: the video model's config (embed_dim, depth, tubelet, grid).

    Returns:
        {name: tensor} with keys ``patch_embed.proj.weight``, ``patch_embed.proj.bias`` (if present),
        ``pos_embed`` (1, N, D) and ``blocks.*``, in the 2D weights' dtype.
    """
    sd = unwrap_state_dict(state_dict_2d)
    for key in ("patch_embed.proj.weight", "pos_embed"):
        if key not in sd:
            raise ValueError(f"state_dict_2d: no {key!r}; is this a DeiT/timm ViT state dict?")
    D = cfg.embed_dim
    pt, ph, pw = cfg.tubelet
    w2d = sd["patch_embed.proj.weight"]
    if w2d.dim() != 4 or w2d.shape[0] != D or tuple(w2d.shape[2:]) != (ph, pw):
        raise ValueError(f"state_dict_2d: patch_embed.proj.weight must be (D, C, ph, pw) = ({D}, C, {ph}, {pw}) for "
                         f"this config, got {tuple(w2d.shape)}")
    out: dict[str, torch.Tensor] = {}
    out["patch_embed.proj.weight"] = w2d.unsqueeze(2).repeat(1, 1, pt, 1, 1) / pt  # (D, C, pt, ph, pw)
    if "patch_embed.proj.bias" in sd:
        out["patch_embed.proj.bias"] = sd["patch_embed.proj.bias"].clone()

    pos = sd["pos_embed"]
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != D:
        raise ValueError(f"state_dict_2d: pos_embed must be (1, L, {D}), got {tuple(pos.shape)}")
    prefix = int("cls_token" in sd) + int("dist_token" in sd)
    if prefix == 0 and math.isqrt(pos.shape[1]) ** 2 != pos.shape[1]:
        prefix = 1  # a CLS entry without a stored cls_token (some exports drop it)
    g = math.isqrt(pos.shape[1] - prefix)
    if g * g != pos.shape[1] - prefix:
        raise ValueError(f"state_dict_2d: pos_embed has {pos.shape[1]} entries; after {prefix} prefix token(s) they "
                         f"do not form a square grid")
    _, h, w = cfg.grid
    grid = pos[:, prefix:].reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    if (g, g) != (h, w):
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(pos.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, D)  # (1, h*w, D), row-major like the tokens
    out["pos_embed"] = grid.repeat(1, cfg.num_slots, 1)  # (1, N, D): slot-major copies

    blocks = {k: v for k, v in sd.items() if k.startswith("blocks.")}
    found = sorted({int(k.split(".")[1]) for k in blocks})
    if found != list(range(cfg.depth)):
        raise ValueError(f"state_dict_2d: blocks {found[:3]}...{found[-3:]} ({len(found)}) do not match "
                         f"depth={cfg.depth}")
    out.update({k: v.clone() for k, v in blocks.items()})
    return out


def load_inflated_2d_vit(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Initialise ``model``'s backbone from a 2D ViT checkpoint file (see :func:`inflate_2d_vit`).

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``. Every backbone
    parameter (patch_embed, pos_embed, blocks) must be provided; the other modules keep their
    initialisation: the release's (score predictors, reconstruction head, recognizer heads) are listed
    in the report's ``missing``, stpcore-only ones (STPrivacy's phase-1 head) in ``not_in_release``.

    Args:
        model: an STPrivacy or VideoRecognizer (anything with ``cfg`` and the release's module names).
        path: a .pth/.pt file holding the 2D ViT's state dict (optionally wrapped).

    Returns:
        LoadReport(missing, unexpected, not_in_release) with unexpected empty.
    """
    obj = load_weights_only(path)
    inflated = inflate_2d_vit(obj, model.cfg)
    # Check before loading anything, so a failed load leaves the model untouched.
    own = model.state_dict()
    absent = sorted(k for k in own if k.startswith(_BACKBONE_PREFIXES) and k not in inflated)
    unexpected = sorted(set(inflated) - set(own))
    if absent or unexpected:
        raise ValueError(f"{os.fspath(path)}: the inflated ViT does not fit the backbone: missing "
                         f"[{_key_list(absent)}], unexpected [{_key_list(unexpected)}]")
    return load_official_state_dict(model, inflated, strict=False)


def save_anonymizer(model: STPrivacy, path: str | os.PathLike, classes: Iterable[str] = (),
                    reconstruction_trained: bool | None = None) -> Path:
    """Save an STPrivacy model's weights and config (read back with :func:`load_anonymizer`);
    ``reconstruction_trained``: whether its reconstruction head was trained (the trainer says; False makes
    :func:`load_anonymizer` warn)."""
    state = {"format": STPRIVACY_FORMAT, "model_config": dataclasses.asdict(model.cfg),
             "state_dict": model.state_dict(), "classes": list(classes)}
    if reconstruction_trained is not None:
        state["reconstruction_trained"] = bool(reconstruction_trained)
    save_atomically(state, path)
    return Path(path)


def save_atomically(obj, path: str | os.PathLike) -> None:
    """torch.save ``obj`` to a temporary file renamed to ``path`` when complete (media.atomic_path), through a file
    object: a full disk is then an OSError (torch.save given a path raises a RuntimeError, "unexpected pos")."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_anonymizer(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> STPrivacy:
    """An STPrivacy model from :func:`save_anonymizer`'s file or a training checkpoint (weights_only)."""
    from stpcore.models.config import STPrivacyConfig
    from stpcore.models.stprivacy import STPrivacy

    state = load_weights_only(path, map_location)
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt not in (STPRIVACY_FORMAT, TRAIN_FORMAT):
        raise ValueError(f"{path}: not an stpcore STPrivacy checkpoint (format {fmt!r}); expected a file written "
                         f"by `stpcore train` (stprivacy.pt or last.pt)")
    # A file of the right kind may still be damaged or from another stpcore version: one clear error, not a
    # traceback (a missing key, a config field this version does not know, weights that do not fit the config).
    try:
        weights = state["state_dict"] if fmt == STPRIVACY_FORMAT else state["models"]["anonymizer"]
        model = STPrivacy(STPrivacyConfig(**state["model_config"]))  # the config turns the saved lists into tuples
        model.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        # load_state_dict's message starts "Error(s) in loading state_dict for STPrivacy:" and names the keys on the
        # lines after it: keep those (the first few), on one line.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = f"missing entry {exc}" if isinstance(exc, KeyError) else " ".join(lines)[:400] or type(exc).__name__
        raise ValueError(f"{path}: an stpcore checkpoint ({fmt}) that this version cannot load: {detail}; was it "
                         f"written by another stpcore version, or damaged? Retrain or re-save it with this "
                         f"version") from exc
    if _reconstruction_trained(state, fmt) is False:
        warnings.warn(f"{path}: this model had no phase-2 training (phase 1 trains the selection alone), so its "
                      f"reconstruction head is untrained and the video it outputs is not an anonymized one; train "
                      f"phase 2 (with privacy labels) before deploying it", RuntimeWarning, stacklevel=2)
    return model.eval()


def reconstruction_trained(phase: str, epoch: int, step_in_epoch: int, phase2_epochs: int, warmup_epochs: int,
                           decoder_init: str = "random") -> bool:
    """Whether STPrivacy's reconstruction head has been trained at a training position (``phase`` "phase1",
    "phase2" or "done"): phase 1 does not train it, nor does phase 2's recognizer warm-up (STPrivacy only transforms
    then); decoder_init "lstsq" fits it when phase 2 starts."""
    if phase == "phase1":
        return False
    if decoder_init == "lstsq":
        return True
    if phase != "phase2":
        epoch, step_in_epoch = phase2_epochs, 0
    return epoch > warmup_epochs or (epoch == warmup_epochs and step_in_epoch > 0)


def _reconstruction_trained(state: dict, fmt: str) -> bool | None:
    """Whether the saved model's reconstruction head was trained; None when the file does not say (saved before
    it was recorded)."""
    if fmt == STPRIVACY_FORMAT:
        return state.get("reconstruction_trained")
    pos, cfg = state.get("position", {}), state.get("config", {})
    if "phase" not in pos or "phase2_epochs" not in cfg:
        return None
    return reconstruction_trained(pos["phase"], pos.get("epoch", 0), pos.get("step_in_epoch", 0), cfg["phase2_epochs"],
                                  cfg.get("recognizer_warmup_epochs", 0), cfg.get("decoder_init", "random"))
