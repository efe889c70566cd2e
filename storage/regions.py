"""Region captions of one scene: phrases, where they were seen and the points they name.

A region caption is what a 2D detector + captioner (RegionPLC) or an entity caption (PLA) gives:
a phrase, optionally the view and box it was read from, and the set of scene points it covers.
The store keeps them per scene as the optional ``captions/region_*`` arrays (storage.schema);
training pools point features over each set and contrasts the pooled feature with the phrases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage.errors import InputError


@dataclass
class RegionCaptions:
    """R regions: ``frame`` int32[R] (-1 = none), ``box`` float32[R,4] (x_min, y_min, x_max, y_max in
    stored-frame pixels, NaN = no box), ``text`` R phrases, ``clip`` float16[R,D] embeddings,
    ``offsets`` int64[R+1] / ``point`` int32[M]: the CSR point sets (sorted within a region)."""

    frame: np.ndarray
    box: np.ndarray
    text: list[str]
    clip: np.ndarray
    offsets: np.ndarray
    point: np.ndarray

    def __len__(self) -> int:
        return len(self.text)

    @classmethod
    def from_sets(cls, text: list[str], point_sets: list[np.ndarray], clip: np.ndarray,
                  frame: np.ndarray | None = None, box: np.ndarray | None = None) -> RegionCaptions:
        """Build from per-region point-index arrays (sorted and de-duplicated here)."""
        sets = [np.unique(np.asarray(p, np.int64)).astype(np.int32) for p in point_sets]
        n = len(sets)
        offsets = np.zeros(n + 1, np.int64)
        offsets[1:] = np.cumsum([len(p) for p in sets])
        return cls(
            frame=np.full(n, -1, np.int32) if frame is None else np.asarray(frame, np.int32),
            box=np.full((n, 4), np.nan, np.float32) if box is None else np.asarray(box, np.float32),
            text=list(text),
            clip=np.asarray(clip, np.float16),
            offsets=offsets,
            point=np.concatenate(sets) if sets else np.zeros(0, np.int32),
        )

    def points_of(self, i: int) -> np.ndarray:
        return self.point[self.offsets[i]:self.offsets[i + 1]]

    def check(self, num_points: int, num_frames: int, source: str) -> None:
        """InputError when the arrays disagree with each other or with the scene."""
        n = len(self.text)
        if not (len(self.frame) == len(self.box) == len(self.clip) == len(self.offsets) - 1 == n):
            raise InputError(f"{source}: region caption arrays have different lengths")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.point) or np.any(np.diff(self.offsets) < 0):
            raise InputError(f"{source}: region offsets are not a valid CSR")
        if len(self.point) and (self.point.min() < 0 or self.point.max() >= num_points):
            raise InputError(f"{source}: region point index out of range 0..{num_points - 1}")
        if n and (self.frame.min() < -1 or self.frame.max() >= num_frames):
            raise InputError(f"{source}: region frame out of range -1..{num_frames - 1}")
