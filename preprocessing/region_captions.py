"""Region captions from 2D boxes: a detector-captioner's phrases per frame -> point sets.

Input file (``region_captions.json``, written by ``xmask3d synth scannet`` the way a 2D detector
+ captioner would report a frame; docs/openvocab.md)::

    {"format": "xmask3d-region-captions/1",
     "scenes": {scene_id: {frame_number: [{"text": "a wooden chair",
                                           "box": [x_min, y_min, x_max, y_max]}, ...]}}}

Boxes are in colour-image pixels of the raw frame. A region's point set is RegionPLC's rule
(CAPTION_SUPERVISION_SPEC.md §2): the points visible in that frame (depth test of the projection)
whose pixel lies strictly inside the box, the box first rescaled from the colour size to the
stored frame size along each axis separately (x by width, y by height). Empty sets are dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocessing.captions import read_json_file
from storage.errors import InputError

REGION_FORMAT = "xmask3d-region-captions/1"

Box = tuple[float, float, float, float]


def load_region_captions(path: Path) -> dict[str, dict[int, list[tuple[str, Box]]]]:
    """scene -> frame number -> [(text, box)]; InputError naming the file on anything malformed."""
    raw = read_json_file(path, "region caption", "pass --region-captions none to run without")
    if not isinstance(raw, dict) or raw.get("format") != REGION_FORMAT \
            or not isinstance(raw.get("scenes"), dict):
        raise InputError(f"{path}: expected {{'format': '{REGION_FORMAT}', 'scenes': {{...}}}}")
    out: dict[str, dict[int, list[tuple[str, Box]]]] = {}
    for scene, frames in raw["scenes"].items():
        if not isinstance(frames, dict):
            raise InputError(f"{path}: scene {scene!r} must map frame numbers to region lists")
        per_frame: dict[int, list[tuple[str, Box]]] = {}
        for frame, regions in frames.items():
            try:
                number = int(frame)
            except ValueError as error:
                raise InputError(f"{path}: scene {scene!r}: frame key {frame!r} is not an integer") from error
            if not isinstance(regions, list):
                raise InputError(f"{path}: scene {scene!r} frame {frame}: expected a list of regions")
            parsed = []
            for k, region in enumerate(regions):
                text = region.get("text") if isinstance(region, dict) else None
                box = region.get("box") if isinstance(region, dict) else None
                if not isinstance(text, str) or not isinstance(box, list) or len(box) != 4 \
                        or not all(isinstance(v, int | float) for v in box):
                    raise InputError(f"{path}: scene {scene!r} frame {frame} region {k}: expected "
                                     "{'text': str, 'box': [x_min, y_min, x_max, y_max]}")
                x0, y0, x1, y1 = (float(v) for v in box)
                if not (np.isfinite([x0, y0, x1, y1]).all() and x1 > x0 and y1 > y0):
                    raise InputError(f"{path}: scene {scene!r} frame {frame} region {k}: empty or "
                                     f"non-finite box {box}")
                if text.strip():
                    parsed.append((text, (x0, y0, x1, y1)))
            per_frame[number] = parsed
        out[str(scene)] = per_frame
    return out


def box_point_sets(offsets: np.ndarray, point: np.ndarray, uv: np.ndarray, frame_rows: list[int],
                   boxes: np.ndarray) -> list[np.ndarray]:
    """Visible points of frame ``frame_rows[r]`` whose pixel centre is strictly inside ``boxes[r]``.

    offsets/point/uv: the scene's CSR projection (uv = column, row in the stored frame); boxes
    float [R,4] (x_min, y_min, x_max, y_max) in stored-frame pixels. -> R int32 arrays.
    """
    sets = []
    for row, (x0, y0, x1, y1) in zip(frame_rows, np.asarray(boxes, np.float64), strict=True):
        lo, hi = int(offsets[row]), int(offsets[row + 1])
        u = uv[lo:hi, 0].astype(np.float64) + 0.5
        v = uv[lo:hi, 1].astype(np.float64) + 0.5
        inside = (u > x0) & (u < x1) & (v > y0) & (v < y1)
        sets.append(point[lo:hi][inside].astype(np.int32))
    return sets


def scene_region_sets(regions: dict[int, list[tuple[str, Box]]], frame_numbers: list[int],
                      colour_size: tuple[int, int], stored_size: tuple[int, int], offsets: np.ndarray,
                      point: np.ndarray, uv: np.ndarray
                      ) -> tuple[list[str], list[np.ndarray], np.ndarray, np.ndarray]:
    """Regions of the kept frames: (texts, point sets, frame rows int32[R], boxes float32[R,4] in
    stored pixels); regions whose box holds no visible point are dropped."""
    (cw, ch), (w, h) = colour_size, stored_size
    scale = np.array([w / cw, h / ch, w / cw, h / ch])
    texts, rows, boxes = [], [], []
    for row, number in enumerate(frame_numbers):
        for text, box in regions.get(int(number), []):
            texts.append(text)
            rows.append(row)
            boxes.append(np.asarray(box) * scale)
    box_array = np.asarray(boxes, np.float32).reshape(-1, 4)
    sets = box_point_sets(offsets, point, uv, rows, box_array)
    keep = [i for i, s in enumerate(sets) if len(s)]
    return ([texts[i] for i in keep], [sets[i] for i in keep], np.asarray(rows, np.int32)[keep],
            box_array[keep])
