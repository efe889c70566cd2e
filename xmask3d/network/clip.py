"""Frozen open_clip image tower and MaskCLIP mask embeddings (spec §4).

``ClipImageTower.mask_embed`` embeds each predicted mask region in CLIP space with one forward pass
of the ViT: Q extra "mask tokens" (copies of the class token after ``ln_pre``) are prepended, and an
attention mask lets mask token q see only the image class token and the patches its mask covers
(mask resized to the tower's input, sigmoid, max-pooled per patch, >= 0.5). No token attends to a
mask token, so the image tokens evolve exactly as in a plain forward and a mask token whose mask
covers every patch reproduces the image embedding.

Weights load from local files only: an open_clip checkpoint file (``pretrained=path``) for a
built-in architecture, or an open_clip ``local-dir:`` folder (``open_clip_config.json`` + weights).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from storage.errors import InputError

log = logging.getLogger(__name__)

# Small random towers built from an open_clip model config dict (embed_dim is replaced by the text
# encoder's dimension). The text towers are minimal: only ``visual`` is kept.
_MINIMAL_TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": _MINIMAL_TEXT,
}
SMALL_CLIP_CFG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 384, "layers": 6, "head_width": 64},
    "text_cfg": _MINIMAL_TEXT,
}


@dataclass
class ClipConfig:
    """Which open_clip image tower. ``model_cfg`` (a custom config dict) takes precedence over
    ``model_name``; ``checkpoint`` = a weights file or an open_clip local-dir folder (None = random)."""

    model_name: str = "ViT-L-14-quickgelu"  # OpenAI CLIP ViT-L/14 (224 px, patch 14, QuickGELU)
    model_cfg: dict | None = None
    checkpoint: str | None = None

    @classmethod
    def paper(cls, checkpoint: str | Path | None = None) -> ClipConfig:
        return cls(checkpoint=None if checkpoint is None else str(checkpoint))

    @classmethod
    def small(cls) -> ClipConfig:
        return cls(model_name="", model_cfg=copy.deepcopy(SMALL_CLIP_CFG))

    @classmethod
    def tiny(cls) -> ClipConfig:
        return cls(model_name="", model_cfg=copy.deepcopy(TINY_CLIP_CFG))


def clip_preset(name: str) -> ClipConfig:
    """``tiny`` | ``small`` | ``paper`` (paper without weights: set ``checkpoint``)."""
    presets = {"tiny": ClipConfig.tiny, "small": ClipConfig.small, "paper": ClipConfig.paper}
    if name not in presets:
        raise InputError(f"unknown CLIP preset {name!r} (expected one of {sorted(presets)})")
    return presets[name]()


def build_clip_model(cfg: ClipConfig, embed_dim: int) -> nn.Module:
    """The full open_clip model described by ``cfg`` (weights from local files only)."""
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint is not None else None
    if ckpt is not None and ckpt.is_dir():
        if not (ckpt / "open_clip_config.json").is_file():
            raise InputError(f"{ckpt}: open_clip folder without open_clip_config.json")
        if not any(any(ckpt.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth")):
            raise InputError(f"{ckpt}: open_clip folder without a weights file")
        try:
            return open_clip.create_model(f"local-dir:{ckpt}")
        except ValueError as e:  # open_clip's message for a malformed open_clip_config.json
            raise InputError(f"{ckpt}: {e}") from e
    if ckpt is not None and not ckpt.is_file():
        raise InputError(f"{ckpt}: CLIP checkpoint not found")
    if cfg.model_cfg is not None:
        model = open_clip.CLIP(**{**copy.deepcopy(cfg.model_cfg), "embed_dim": embed_dim})
        if ckpt is not None:
            open_clip.load_checkpoint(model, str(ckpt))
    else:
        if cfg.model_name not in open_clip.list_models():
            raise InputError(f"unknown open_clip model {cfg.model_name!r}")
        # a file path as `pretrained` is loaded as is (never a hub tag: checked above)
        model = open_clip.create_model(cfg.model_name, pretrained=None if ckpt is None else str(ckpt))
    if ckpt is None:
        log.info("CLIP image tower: random init (no checkpoint)")
    return model


class ClipImageTower(nn.Module):
    """Frozen open_clip ViT image tower: ``encode_image`` and MaskCLIP ``mask_embed``."""

    def __init__(self, cfg: ClipConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        visual = build_clip_model(cfg, embed_dim).visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise InputError(
                f"CLIP image tower must be an open_clip VisionTransformer, got {type(visual).__name__}"
            )
        if getattr(visual, "attn_pool", None) is not None or visual.output_dim != embed_dim:
            raise InputError(
                f"CLIP image tower: need class-token pooling and output dim {embed_dim}, "
                f"got attn_pool={visual.attn_pool is not None}, output dim {visual.output_dim}"
            )
        self.visual = visual.requires_grad_(False).eval()
        self.embed_dim = embed_dim
        self.image_size = tuple(visual.image_size)
        self.patch_size = tuple(visual.patch_size)
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ClipImageTower:
        super().train(mode)
        self.visual.eval()
        return self

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> resized to the tower size (bilinear) and CLIP-normalised."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"CLIP image tower: images must be [B,3,H,W], got {tuple(images.shape)}")
        x = images.to(self.mean.dtype)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Plain CLIP image embedding [B, D] (class token, unnormalised)."""
        return self.visual(self._prepare(images))

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch + class tokens with positions, after ``ln_pre``: [B, 1+P, W] (as VisionTransformer)."""
        v = self.visual
        x = v.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def patch_masks(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """Mask logits [B,Q,h,w] -> which patches each mask covers [B, Q, P] (bool): bilinear resize
        to the tower input, sigmoid, max-pool per patch, >= 0.5."""
        m = F.interpolate(mask_logits.float(), size=self.image_size, mode="bilinear", align_corners=False)
        m = F.max_pool2d(m.sigmoid(), kernel_size=self.patch_size, stride=self.patch_size)
        return m.flatten(2) >= 0.5

    def attention_mask(self, patch_masks: torch.Tensor) -> torch.Tensor:
        """[B, Q, P] -> blocked [B, L, L] with L = Q + 1 + P (mask tokens, class token, patches)."""
        b, q, p = patch_masks.shape
        blocked = torch.zeros(b, q + 1 + p, q + 1 + p, dtype=torch.bool, device=patch_masks.device)
        blocked[:, :, :q] = True  # nobody attends to a mask token, itself included
        blocked[:, :q, q + 1 :] = ~patch_masks  # a mask token sees its own patches (+ the class token)
        return blocked

    @torch.no_grad()
    def mask_embed(self, images: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """MaskCLIP: images [B,3,H,W] in [0,1], mask_logits [B,Q,h,w] -> [B, Q, D] (unnormalised)."""
        if mask_logits.ndim != 4 or mask_logits.shape[0] != images.shape[0]:
            raise InputError(
                f"CLIP mask_embed: mask_logits must be [B,Q,h,w], got {tuple(mask_logits.shape)}"
            )
        v = self.visual
        x = self._tokens(self._prepare(images))
        b, q = mask_logits.shape[:2]
        x = torch.cat([x[:, :1].expand(b, q, -1), x], dim=1)
        blocked = self.attention_mask(self.patch_masks(mask_logits))
        heads = v.transformer.resblocks[0].attn.num_heads
        # additive float mask (open_clip casts masks to the activation dtype, so a bool mask would
        # become +1/0); one copy per head, batch-major as nn.MultiheadAttention expects
        attn = torch.zeros(blocked.shape, dtype=x.dtype, device=x.device).masked_fill_(blocked, float("-inf"))
        attn = attn.repeat_interleave(heads, dim=0)
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in v.transformer.resblocks:
            x = block(x, attn_mask=attn)
        if not batch_first:
            x = x.transpose(0, 1)
        out = v.ln_post(x[:, :q])
        return out @ v.proj if v.proj is not None else out
