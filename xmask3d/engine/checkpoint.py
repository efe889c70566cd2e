"""Training checkpoints: one file with everything needed to continue bit-for-bit on CPU.

Format (`torch.save` of a dict, loadable with ``weights_only=True``):
``format`` (= FORMAT), ``model`` / ``optimizer`` / ``scheduler`` state dicts, ``step`` (optimizer
steps done), ``epoch`` (epoch the next step belongs to), ``rng`` (python, numpy, torch CPU and,
when present, CUDA generator states), ``train_config`` (the TrainConfig as a dict), ``preset``,
``benchmark``, ``text_encoder`` ({name, dim}) and ``extra`` (free-form plain data).

Files are written to a temporary name in the same directory, flushed, then renamed, so a crash
while saving never leaves a truncated checkpoint under the final name.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from storage.errors import InputError

FORMAT = "xmask3d-checkpoint-v1"
LAST_NAME = "last.pt"


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator training touches, as plain data and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (plus the format tag) atomically to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; InputError if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST_NAME
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt/foreign files
        raise InputError(f"{path}: not a readable checkpoint ({type(error).__name__})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path}: not an xmask3d checkpoint (expected format {FORMAT})")
    return payload


def check_compatible(payload: dict[str, Any], path: Path, *, preset: str, benchmark: str) -> None:
    """Refuse to resume/evaluate a checkpoint made for another preset or benchmark."""
    if payload.get("preset") != preset:
        raise InputError(f"{path}: checkpoint is for preset {payload.get('preset')!r}, not {preset!r}")
    if payload.get("benchmark") != benchmark:
        raise InputError(f"{path}: checkpoint is for benchmark {payload.get('benchmark')!r}, "
                         f"not {benchmark!r}")


def model_state(model: nn.Module, skip_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The state dict without the keys under `skip_prefixes` (weights that reload from files)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(skip_prefixes)}


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], skip_prefixes: tuple[str, ...] = ()
                     ) -> None:
    """Load a checkpoint's weights; only keys under `skip_prefixes` may be missing."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(skip_prefixes)]
    if missing or result.unexpected_keys:
        raise InputError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected "
                         f"{list(result.unexpected_keys)[:5]}")


def pretrained_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of frozen parts loaded from local pretrained files (not checkpointed).

    Random-init frozen parts (the `tiny`/`small` presets) stay in the checkpoint: they cannot be
    rebuilt from a file.
    """
    cfg = model.cfg
    prefixes = []
    if getattr(cfg.mask_generator, "unet_path", None):
        prefixes.append("mask_generator.unet.")
    if getattr(cfg.mask_generator, "vae_path", None):
        prefixes.append("mask_generator.vae.")
    if getattr(cfg.clip, "checkpoint", None):
        prefixes.append("clip.visual.")
    return tuple(prefixes)
