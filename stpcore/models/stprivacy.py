"""STPrivacy: token sparsification (3 score predictors), anonymization blocks and reconstruction.

One forward, three behaviours:

- train mode (``model.train()``): every token stays in the sequence. At each prune location a score
  predictor reads (tokens, previous decision) and ``stpcore.ops.gumbel_select`` draws a hard,
  straight-through keep decision; every block from the first prune location on uses
  ``stpcore.ops.policy_attention`` with the current decision as policy. All tokens are decoded; the
  final keep mask travels alongside (``STPrivacyOutput.keep``; ``masked_video`` zeros the dropped
  tubelets).
- eval mode: per temporal slot the top-k tokens by keep score survive each stage (k = int(tokens per
  slot x alpha^stage), 34/24/16 for ViT-S); they are gathered with their original positions, the
  following blocks run plain attention on the shorter sequence, and only kept tokens are decoded and
  scattered back: dropped tubelets are exactly zero.
- adaptive mode (eval with ``adaptive_threshold=t``): tokens whose keep probability exceeds t survive
  (cumulatively), a variable number per video; the following blocks run on packed tokens with
  ``stpcore.ops.varlen_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from stpcore import ops
from stpcore.models.config import STPrivacyConfig
from stpcore.models.predictor import ScorePredictor
from stpcore.models.recognizer import VideoTransformer, masked_mean
from stpcore.tubelets import from_tubelets, grid_shape, keep_to_pixels


@dataclass
class STPrivacyOutput:
    """What :meth:`STPrivacy.forward` returns.

    Attributes:
        video: (B, 3, T, H, W) reconstructed clip in the input's dtype. Train mode: every tubelet is
            decoded (use ``masked_video`` or ``keep`` to hide dropped ones). Eval / adaptive: dropped
            tubelets are exactly zero.
        keep: (B, N) final cumulative keep mask, exactly 0/1, original (t-major) token order. Train
            mode: differentiable (straight-through) in the predictors.
        decisions: one (B, N) 0/1 cumulative mask per stage, original order; non-increasing over stages.
        action_logits: (B, num_classes) from the model's own head (keep-weighted mean of the final
            tokens -> fc_norm -> head).
        keep_log_probs: one (B, N) tensor per stage, the predictor's log-probability of "keep" in
            original order. Train mode: defined (finite) for every token, also for tokens an earlier
            stage dropped (their values are not used by the decision, which multiplies by the previous
            one). Eval / adaptive: -inf for tokens that did not enter the stage.
        kept_positions: eval (top-k) mode only: (B, K) int64 original positions of the final kept
            tokens, ascending (K = num_slots x k of the last stage); None otherwise.
        tubelet: the tubelet size, for ``masked_video``.
    """

    video: torch.Tensor
    keep: torch.Tensor
    decisions: list[torch.Tensor]
    action_logits: torch.Tensor
    keep_log_probs: list[torch.Tensor]
    kept_positions: torch.Tensor | None = None
    tubelet: tuple[int, int, int] = (2, 16, 16)

    @property
    def masked_video(self) -> torch.Tensor:
        """(B, 3, T, H, W) the video with dropped tubelets set to zero (differentiable in keep in train mode)."""
        grid = grid_shape(self.video.shape, self.tubelet)
        return self.video * keep_to_pixels(self.keep.to(self.video.dtype), grid, self.tubelet)


def is_real(value) -> bool:
    """A real number as a setting (Python or NumPy int/float, Fraction), not a bool or a tensor."""
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class STPrivacy(VideoTransformer):
    """The STPrivacy video anonymizer (see the module docstring for the three modes).

    Module names equal the authors' release: ``patch_embed.proj``, ``pos_embed``, ``blocks.<i>``,
    ``score_predictor.<s>`` (one per prune location), ``norm_recon``, ``head_recon``; plus the action
    head of phase 1, ``fc_norm`` and ``head`` [G: masked mean pool of the final tokens -> LayerNorm ->
    Linear]. The release's STPrivacy has no such head, so its checkpoints carry no weights for it:
    :meth:`load_official_state_dict` leaves it initialised and reports it (``modules_not_in_release``).
    The anonymization block is ``blocks[prune_locations[-1]:]`` (blocks 9-11 for ViT-S).

    Args:
        cfg: the model config (``STPrivacyConfig.from_name("vit_small")`` for the paper's model).
    """

    # The phase-1 action head is stpcore's own; the release's STPrivacy has no classifier.
    modules_not_in_release = ("fc_norm", "head")

    def __init__(self, cfg: STPrivacyConfig) -> None:
        super().__init__(cfg)
        self.cfg: STPrivacyConfig = cfg
        self.score_predictor = nn.ModuleList(ScorePredictor(cfg.embed_dim) for _ in cfg.prune_locations)
        self.norm_recon = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head_recon = nn.Linear(cfg.embed_dim, cfg.tubelet_dim)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.init_weights()

    def forward(
        self,
        video: torch.Tensor,
        gumbel_noise: list[torch.Tensor] | None = None,
        *,
        keep_ratio: float | None = None,
        adaptive_threshold: float | None = None,
        reconstruct: bool = True,
        classify: bool = True,
    ) -> STPrivacyOutput:
        """Sparsify, anonymize and reconstruct a batch of clips.

        Args:
            video: (B, 3, T, H, W) float, T = num_frames, H = W = image_size.
            gumbel_noise: train mode only: one (B, N, 2) standard-Gumbel tensor per stage, to reproduce
                a training step exactly; drawn from the global RNG when None.
            keep_ratio: eval mode only: alpha in (0, 1] overriding cfg.keep_ratio (no retraining).
            adaptive_threshold: eval mode only: t in (0, 1); keep tokens whose keep probability > t,
                a variable number per video (cannot be combined with keep_ratio).

        Returns:
            :class:`STPrivacyOutput`.
        """
        self.check_video(video)
        if self.training:
            for name, value in (("keep_ratio", keep_ratio), ("adaptive_threshold", adaptive_threshold)):
                if value is not None:
                    raise ValueError(f"{name} applies in eval mode only (call model.eval()); in train mode the "
                                     f"Gumbel decisions set the kept tokens")
            return self._forward_train(video, self._check_noise(gumbel_noise, video), reconstruct, classify)
        if gumbel_noise is not None:
            raise ValueError("gumbel_noise applies in train mode only (call model.train()); eval mode is deterministic")
        self.check_keep_setting(keep_ratio, adaptive_threshold)
        if adaptive_threshold is not None:
            return self._forward_adaptive(video, float(adaptive_threshold))
        return self._forward_topk(video, float(self.cfg.keep_ratio if keep_ratio is None else keep_ratio))

    def check_keep_setting(self, keep_ratio: float | None = None, adaptive_threshold: float | None = None) -> None:
        """ValueError unless the inference setting is valid: at most one of them, keep_ratio in (0, 1],
        adaptive_threshold in (0, 1). Callers that run many forwards check it once, up front."""
        if adaptive_threshold is not None:
            if keep_ratio is not None:
                raise ValueError("keep_ratio and adaptive_threshold cannot be combined; pass one of them")
            if not (is_real(adaptive_threshold) and 0 < adaptive_threshold < 1):
                raise ValueError(f"adaptive_threshold must be a real number in (0, 1) (a Python or NumPy float), got "
                                 f"{adaptive_threshold!r}")
            return
        ratio = self.cfg.keep_ratio if keep_ratio is None else keep_ratio
        if not (is_real(ratio) and 0 < ratio <= 1):
            raise ValueError(f"keep_ratio must be a real number in (0, 1] (a Python or NumPy float), got "
                             f"{keep_ratio!r}")

    # -- helpers ---------------------------------------------------------------------------------------

    def _check_noise(self, gumbel_noise: list[torch.Tensor] | None, video: torch.Tensor) -> list[torch.Tensor] | None:
        if gumbel_noise is None:
            return None
        stages = self.cfg.num_stages
        expected = (video.shape[0], self.cfg.num_tokens, 2)
        if not isinstance(gumbel_noise, (list, tuple)) or len(gumbel_noise) != stages:
            got = len(gumbel_noise) if isinstance(gumbel_noise, (list, tuple)) else type(gumbel_noise).__name__
            raise ValueError(f"gumbel_noise must be a list of {stages} tensors (one per stage) of shape {expected}, "
                             f"got {got}")
        for s, g in enumerate(gumbel_noise):
            if not isinstance(g, torch.Tensor) or tuple(g.shape) != expected:
                shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(f"gumbel_noise[{s}] must have shape (B, N, 2) = {expected}, got {shape}")
        return list(gumbel_noise)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final tokens (..., D) -> tubelet pixels (..., pt*ph*pw*3) (channel innermost); with
        ``zero_mean_tubelets``, each tubelet's mean colour removed; with ``binary_output``, two grey levels (with
        ``sign_free_tubelets``, each tubelet's majority at -1)."""
        pixels = self.head_recon(self.norm_recon(tokens))
        if self.cfg.zero_mean_tubelets:
            per_channel = pixels.unflatten(-1, (-1, 3))  # (..., pt*ph*pw, 3)
            pixels = (per_channel - per_channel.mean(dim=-2, keepdim=True)).flatten(-2)
        if self.cfg.binary_output:
            grey = pixels.unflatten(-1, (-1, 3)).mean(dim=-1, keepdim=True)  # (..., pt*ph*pw, 1)
            # Forward: sign(grey), with a tie at 0 counted as +1 (two levels, never the dropped 0); backward: the
            # identity (straight-through), so that a pixel far from 0 can still be moved across it.
            levels = grey + (torch.where(grey >= 0, 1.0, -1.0).to(grey.dtype) - grey).detach()
            if self.cfg.sign_free_tubelets:  # each tubelet's majority level becomes -1
                flip = torch.where(levels.detach().sum(dim=-2, keepdim=True) >= 0, -1.0, 1.0).to(levels.dtype)
                levels = levels * flip
            pixels = levels.expand(*grey.shape[:-1], 3).flatten(-2)
        return pixels

    def _classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(pooled))

    def _output(self, pixels: torch.Tensor, keep: torch.Tensor, decisions, logits, log_probs, positions=None):
        """Assemble the output from (B, N, pt*ph*pw*3) pixels in original token order."""
        video = from_tubelets(pixels, self.cfg.grid, self.cfg.tubelet)  # (B, 3, T, H, W)
        return STPrivacyOutput(video, keep, decisions, logits, log_probs, positions, self.cfg.tubelet)

    # -- the three modes -------------------------------------------------------------------------------

    def _forward_train(self, video: torch.Tensor, noise: list[torch.Tensor] | None, reconstruct: bool = True,
                       classify: bool = True) -> STPrivacyOutput:
        cfg = self.cfg
        x = self.embed(video)  # (B, N, D)
        B, N, _ = x.shape
        keep = x.new_ones(B, N)  # stage 1's predictor sees an all-ones policy
        policy = None  # plain attention before the first prune location
        decisions, log_probs = [], []
        stage = 0
        for i, blk in enumerate(self.blocks):
            if stage < cfg.num_stages and i == cfg.prune_locations[stage]:
                lp = self.score_predictor[stage](x, keep, cfg.num_slots)  # (B, N, 2)
                keep = ops.gumbel_select(lp, keep, tau=cfg.tau, noise=None if noise is None else noise[stage])
                decisions.append(keep)
                log_probs.append(lp[..., 0])
                policy = keep
                stage += 1
            x = blk(x, policy=policy, eps=cfg.attn_eps)
        logits = self._classify(masked_mean(x, keep)) if classify else None
        if not reconstruct:
            return STPrivacyOutput(None, keep, decisions, logits, log_probs, None, self.cfg.tubelet)
        return self._output(self._decode(x), keep, decisions, logits, log_probs)

    def _forward_topk(self, video: torch.Tensor, ratio: float) -> STPrivacyOutput:
        cfg = self.cfg
        x = self.embed(video)  # (B, N, D)
        B, N, _ = x.shape
        S = cfg.num_slots
        kept = cfg.kept_per_slot(ratio)
        positions = torch.arange(N, device=x.device).repeat(B, 1)  # (B, K) original position of each token
        decisions, log_probs = [], []
        stage = 0
        for i, blk in enumerate(self.blocks):
            if stage < cfg.num_stages and i == cfg.prune_locations[stage]:
                # Gathered slots stay contiguous and equal-sized, so the predictor needs no mask.
                lp = self.score_predictor[stage](x, x.new_ones(x.shape[:2]), S)  # (B, K, 2)
                scores = lp[..., 0]  # (B, K)
                log_probs.append(scores.new_full((B, N), -math.inf).scatter(1, positions, scores))
                k = min(kept[stage], x.shape[1] // S)
                sel, x = ops.slot_topk_gather(scores, x, S, k)  # (B, S*k), (B, S*k, D)
                positions = positions.gather(1, sel)  # ascending: sel and positions both are
                decisions.append(x.new_zeros(B, N).scatter(1, positions, 1.0))
                stage += 1
            x = blk(x)
        keep = decisions[-1] if decisions else x.new_ones(B, N)
        logits = self._classify(x.mean(dim=1))
        pixels = ops.scatter_tokens(self._decode(x), positions, N)  # (B, N, P), zero where dropped
        return self._output(pixels, keep, decisions, logits, log_probs, positions)

    def _forward_adaptive(self, video: torch.Tensor, threshold: float) -> STPrivacyOutput:
        cfg = self.cfg
        x = self.embed(video)  # (B, N, D) dense until the first stage, then packed (total, D)
        B, N, D = x.shape
        keep = torch.ones(B, N, dtype=torch.bool, device=x.device)
        packed: ops.PackedTokens | None = None
        decisions, log_probs = [], []
        stage = 0
        for i, blk in enumerate(self.blocks):
            if stage < cfg.num_stages and i == cfg.prune_locations[stage]:
                # The predictor runs on the unpacked grid (dropped rows zero, masked out of the pools).
                grid = x if packed is None else ops.unpack(x, packed.indices, B, N)  # (B, N, D)
                lp = self.score_predictor[stage](grid, keep.to(grid.dtype), cfg.num_slots)[..., 0]  # (B, N)
                log_probs.append(lp.masked_fill(~keep, -math.inf))
                keep = keep & (lp.exp() > threshold)
                decisions.append(keep.to(x.dtype))
                # N bounds every kept set: no read-back of the longest (pack's nonzero is the one sync left).
                packed = ops.pack(grid, keep, seqlen_bound=N)
                x = packed.values  # (total, D)
                stage += 1
            if packed is None:
                x = blk(x)
            elif x.shape[0] > 0:  # every video may have dropped everything
                x = blk(x, cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen)
        if packed is None:
            final, pixels = x, self._decode(x)
        else:
            final = ops.unpack(x, packed.indices, B, N)  # (B, N, D), zero rows where dropped
            pixels = ops.unpack(self._decode(x), packed.indices, B, N)  # (B, N, P)
        keep_f = keep.to(x.dtype)
        # A video with nothing kept pools to zeros; its logits are the head's response to LayerNorm(0).
        logits = self._classify(masked_mean(final, keep_f))
        return self._output(pixels, keep_f, decisions, logits, log_probs)
