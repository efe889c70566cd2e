"""View captions: read a PLA-format JSON ``{scene_id: {frame_index: text}}`` and embed the texts.

Frames without a caption get an empty text and a zero embedding and are listed by the caller in
the scene attrs (``frames_without_caption``); no caption is ever invented.

This module is imported by the Dask workers, so it does not import torch: a run embeds its
captions once in the driver (``preprocessing.caption_embed``) and ships each scene a
``CaptionEmbeddings`` table that ``embed_captions`` looks the texts up in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from storage.errors import InputError

if TYPE_CHECKING:
    from preprocessing.text import TextEncoder

log = logging.getLogger(__name__)


def read_json_file(path: Path, what: str, hint: str = "") -> object:
    """The parsed JSON of a caption-like file; InputError naming the file when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} file not found" + (f" ({hint})" if hint else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a valid {what} JSON ({error})") from error


def load_captions(path: Path) -> dict[str, dict[int, str]]:
    """scene -> frame index -> caption; InputError on a missing or malformed file."""
    raw = read_json_file(path, "caption", "pass --captions PATH, or --captions none")
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected an object {{scene_id: {{frame: text}}}}")
    out: dict[str, dict[int, str]] = {}
    for scene, frames in raw.items():
        if not isinstance(frames, dict):
            raise InputError(f"{path}: scene {scene!r} must map frame indices to captions")
        scene_caps: dict[int, str] = {}
        for frame, text in frames.items():
            try:
                index = int(frame)
            except ValueError as error:
                raise InputError(f"{path}: scene {scene!r}: frame key {frame!r} is not an integer") from error
            if not isinstance(text, str):
                raise InputError(f"{path}: scene {scene!r} frame {frame}: caption is not a string")
            scene_caps[index] = text
        out[str(scene)] = scene_caps
    return out


def scene_captions(captions: dict[str, dict[int, str]], scene_id: str, frame_indices: list[int],
                   source: Path | str = "captions") -> tuple[list[str], list[int]]:
    """Caption text per kept frame ('' when missing) and the frame indices without one."""
    if scene_id not in captions:
        raise InputError(f"{source}: no captions for scene {scene_id} (use --captions none to run without)")
    caps = captions[scene_id]
    texts = [caps.get(int(i), "") for i in frame_indices]
    missing = [int(i) for i, t in zip(frame_indices, texts, strict=True) if not t.strip()]
    return texts, missing


@dataclass(frozen=True)
class CaptionEmbeddings:
    """Embeddings of caption texts computed once by the driver; workers look texts up in it.

    ``encoder``: the text encoder's name (recorded in the store); ``texts`` unique, non-blank;
    ``vectors`` float16 [T, D], row i embeds ``texts[i]``.
    """

    encoder: str
    texts: tuple[str, ...]
    vectors: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @cached_property
    def _rows(self) -> dict[str, int]:
        return {text: i for i, text in enumerate(self.texts)}

    def select(self, texts: list[str] | set[str]) -> CaptionEmbeddings:
        """The rows of ``texts`` only (what one scene needs, so a task carries kilobytes)."""
        keep = sorted({self._rows[t] for t in texts if t in self._rows})
        return CaptionEmbeddings(self.encoder, tuple(self.texts[i] for i in keep), self.vectors[keep])

    def lookup(self, texts: list[str]) -> np.ndarray:
        """float16 [K, D]: the row of each text, a zero row for a blank one."""
        out = np.zeros((len(texts), self.dim), np.float16)
        for k, text in enumerate(texts):
            if text.strip():
                row = self._rows.get(text)
                if row is None:
                    raise ValueError(f"caption {text[:60]!r} was not embedded by the driver "
                                     f"({len(self.texts)} texts in the table)")
                out[k] = self.vectors[row]
        return out


def embed_captions(texts: list[str], encoder: TextEncoder | CaptionEmbeddings,
                   batch_size: int = 64) -> np.ndarray:
    """float16 [K, D] embeddings; empty texts get a zero row (not embedded).

    ``encoder``: a ``CaptionEmbeddings`` table (a lookup, no torch: the Dask workers' case) or a
    text encoder loaded in this process. The encoder runs torch single-threaded: the reduction
    order of a matmul depends on the thread count, and the bits must not depend on the machine.
    """
    if isinstance(encoder, CaptionEmbeddings):
        return encoder.lookup(texts)
    import torch  # heavy: only the process that embeds imports it (never a preprocessing worker)

    out = np.zeros((len(texts), encoder.dim), np.float16)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for lo in range(0, len(keep), batch_size):
            idx = keep[lo:lo + batch_size]
            emb = encoder.encode([texts[i] for i in idx])
            out[idx] = emb.numpy().astype(np.float16)
    finally:
        torch.set_num_threads(threads)
    return out


def resolve_captions(raw_dir: Path, captions: str | Path | None) -> Path | None:
    """``None`` -> ``raw_dir/captions.json`` if present; ``'none'`` -> no captions; else the path."""
    if captions is None:
        default = Path(raw_dir) / "captions.json"
        if default.is_file():
            return default
        log.warning("%s: no captions.json; preprocessing without captions", raw_dir)
        return None
    if str(captions).lower() == "none":
        return None
    path = Path(captions)
    if not path.is_file():
        raise InputError(f"{path}: caption file not found (pass --captions none to run without)")
    return path


def resolve_region_captions(raw_dir: Path, region_captions: str | Path | None) -> Path | None:
    """``None`` -> ``raw_dir/region_captions.json`` if present; ``'none'`` -> none; else the path."""
    if region_captions is None:
        default = Path(raw_dir) / "region_captions.json"
        return default if default.is_file() else None
    if str(region_captions).lower() == "none":
        return None
    path = Path(region_captions)
    if not path.is_file():
        raise InputError(f"{path}: region caption file not found "
                         "(pass --region-captions none to run without)")
    return path
