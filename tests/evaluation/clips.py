"""In-memory test videos for the phase-3 tests (the real loader's batches, without files)."""

from __future__ import annotations

import torch

from stpcore.data import Batch

T, S, C = 8, 32, 3  # the "tiny" preset's clips; 3 action classes


class BandLoader:
    """In-memory videos whose action is a bright band (row depends on the class), as RandomClipLoader.

    Train mode: one random clip per video per batch entry. Test mode: ``views`` clips per video kept together
    in one batch, with video_index / clip_index / video_ids like the real loader. Every fifth video has no
    privacy labels; privacy attribute 0 follows the class (so a privacy recognizer can learn it).
    """

    def __init__(self, num_videos: int, batch_videos: int, train: bool, views: int = 3, seed: int = 0):
        self.num_videos, self.batch_videos, self.train = num_videos, batch_videos, train
        self.views = 1 if train else views
        self.seed = seed
        self.classes = [f"class{i}" for i in range(C)]
        self.epoch = 0
        g = torch.Generator().manual_seed(self.label_seed + seed)
        self.actions = torch.arange(num_videos) % C
        self.privacy = torch.randint(0, 2, (num_videos, 5), generator=g).float()
        self.label_privacy()

    label_seed = 1000

    def label_privacy(self) -> None:
        """Attribute 0 follows the class; every fifth video has no privacy labels."""
        self.privacy[:, 0] = (self.actions == 0).float()
        self.has = torch.arange(self.num_videos) % 5 != 4

    def paint(self, clip: torch.Tensor, video: int) -> None:
        """Write the video's content into its clip (the action's band)."""
        a = int(self.actions[video])
        clip[:, :, a * (S // C):(a + 1) * (S // C)] += 2.0

    def __len__(self) -> int:
        return -(-self.num_videos // self.batch_videos)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + (self.epoch if self.train else 0))
        order = torch.randperm(self.num_videos, generator=g) if self.train else torch.arange(self.num_videos)
        for start in range(0, self.num_videos, self.batch_videos):
            vids = order[start:start + self.batch_videos].repeat_interleave(self.views)  # (B,) views together
            clips = torch.randn(len(vids), 3, T, S, S, generator=g) * 0.5
            for i, v in enumerate(vids.tolist()):
                self.paint(clips[i], v)
            yield Batch(
                clips=clips, actions=self.actions[vids], privacy=self.privacy[vids] * self.has[vids, None],
                has_privacy=self.has[vids], video_index=vids, clip_index=torch.arange(len(vids)) % self.views,
                video_ids=[f"class{int(self.actions[v])}/v{v}" for v in vids.tolist()],
            )


class TintLoader(BandLoader):
    """As :class:`BandLoader`, but privacy attribute 0 (skin_color) is a red tint over the whole clip, independent
    of the action, every video is labelled, and the other attributes are random labels with nothing in the pixels
    (chance)."""

    label_seed = 500

    def label_privacy(self) -> None:
        self.privacy[:, 0] = (torch.arange(self.num_videos) // C) % 2  # balanced, independent of the action
        self.has = torch.ones(self.num_videos, dtype=torch.bool)

    def paint(self, clip: torch.Tensor, video: int) -> None:
        super().paint(clip, video)
        clip[0] += 1.0 * self.privacy[video, 0]
