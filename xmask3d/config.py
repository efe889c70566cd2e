"""Model configuration: ``ModelConfig`` composes the parts' configs; ``preset(name)`` names them.

Presets:
- ``paper``: the official sizes (MinkUNet34C / MinkUNet18A, SD 1.x UNet + VAE, 50 queries,
  6 + 9 decoder layers, CLIP ViT-L/14, 768-d text space) and the official quirks (XMASK3D_SPEC.md §8).
  Pretrained weights come from local paths (``sd_dir``, ``clip_checkpoint``); without them the
  same network is built with random weights (parameter counts, smoke tests).
- ``small``: one GPU, random init, MiniLM text space (384-d).
- ``tiny``: CPU tests and the demo, random init, MiniLM text space (384-d); a forward+backward
  on a small batch takes well under 2 s on 2 cores (benchmarks/bench_step.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from storage.errors import InputError
from xmask3d.backbone3d import Backbone3DConfig
from xmask3d.clip import ClipConfig, clip_preset
from xmask3d.losses import LossConfig
from xmask3d.mask_generator import MaskGeneratorConfig, mask_generator_preset

PRESETS = ("tiny", "small", "paper")
# The OpenAI ViT-L/14 weights need QuickGELU; open_clip names that architecture "ViT-L-14-quickgelu".
PAPER_CLIP_MODEL = "ViT-L-14-quickgelu"
PAPER_CLIP_CHECKPOINT = "weights/open_clip/ViT-L-14-openai.pt"  # default local path for `paper`


@dataclass
class ModelConfig:
    """Everything that defines the network and its losses."""

    name: str = "paper"
    backbone: Backbone3DConfig = field(default_factory=Backbone3DConfig)
    mask_generator: MaskGeneratorConfig = field(default_factory=MaskGeneratorConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # text space of class names and captions (xmask3d.text.build_text_encoder spec)
    text_encoder: str = f"openclip:{PAPER_CLIP_MODEL}:{PAPER_CLIP_CHECKPOINT}"
    # False: no FeatureMerger, the fused feature is the 3D feature
    fusion: bool = True
    # eval gating threshold of a mask's mean binary probability (spec §4 step 3)
    binary_2d_thresh: float = 0.5


def backbone_preset(name: str) -> Backbone3DConfig:
    """3D UNet sizes: ``paper`` = MinkUNet34C / MinkUNet18A; smaller presets are narrower and shallower."""
    if name == "paper":
        return Backbone3DConfig()
    if name == "small":
        return Backbone3DConfig(
            init_dim=16,
            planes=(16, 32, 64, 128, 128, 64, 48, 48),
            blocks=(1, 2, 2, 3, 1, 1, 1, 1),
            binary_planes=(16, 32, 64, 128, 64, 64, 48, 48),
            binary_blocks=(1,) * 8,
            out_channels=128,
        )
    if name == "tiny":
        return Backbone3DConfig(
            init_dim=8,
            planes=(8, 16, 32, 64, 64, 32, 24, 24),
            blocks=(1,) * 8,
            binary_planes=(8, 16, 32, 64, 32, 32, 24, 24),
            binary_blocks=(1,) * 8,
            out_channels=64,
        )
    raise InputError(f"unknown model preset {name!r} (expected one of {list(PRESETS)})")


def loss_preset(name: str) -> LossConfig:
    """Official loss recipe; the point-sample counts scale with the mask resolution."""
    if name == "paper":
        return LossConfig()
    if name == "small":
        return LossConfig(num_points=64 * 64)  # 64x64 masks
    if name == "tiny":
        return LossConfig(num_points=256, gt_fill_radius=1)  # 16x16 masks
    raise InputError(f"unknown model preset {name!r} (expected one of {list(PRESETS)})")


def preset(
    name: str, sd_dir: str | Path | None = None, clip_checkpoint: str | Path | None = None
) -> ModelConfig:
    """The named preset. For ``paper``, ``sd_dir`` (a diffusers SD 1.x folder) and
    ``clip_checkpoint`` (open_clip ViT-L/14 OpenAI weights) load the pretrained parts."""
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r} (expected one of {list(PRESETS)})")
    if name != "paper" and (sd_dir is not None or clip_checkpoint is not None):
        raise InputError(f"preset {name!r} is random-init; sd_dir / clip_checkpoint apply to 'paper' only")
    if name == "paper":
        mask_generator = MaskGeneratorConfig.paper(sd_dir)
        clip = ClipConfig.paper(clip_checkpoint)
        text = f"openclip:{PAPER_CLIP_MODEL}:{clip_checkpoint or PAPER_CLIP_CHECKPOINT}"
    else:
        mask_generator = mask_generator_preset(name)
        clip = clip_preset(name)
        text = "minilm"
    return ModelConfig(
        name=name,
        backbone=backbone_preset(name),
        mask_generator=mask_generator,
        clip=clip,
        loss=loss_preset(name),
        text_encoder=text,
    )


def text_dim(spec: str) -> int:
    """Dimension of the text space named by a text-encoder spec, without loading the encoder."""
    if spec == "minilm":
        from xmask3d.text import MiniLMTextEncoder

        return MiniLMTextEncoder.dim
    if spec == "openclip-tiny":
        from xmask3d.text import TINY_EMBED_DIM

        return TINY_EMBED_DIM
    if spec.startswith("openclip:"):
        import open_clip

        model_cfg = open_clip.get_model_config(spec.split(":")[1])
        if model_cfg is None:
            raise InputError(f"text encoder {spec!r}: unknown open_clip model")
        return int(model_cfg["embed_dim"])
    raise InputError(f"unknown text encoder {spec!r} (minilm, openclip-tiny, openclip:MODEL:CHECKPOINT)")


def clean(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every official quirk that has a clean alternative switched to it (docs/model.md):
    score-based mask selection (no novel labels, Q5), no null GT segment (Q6), no null column / fake
    label in the 3D CE (Q11)."""
    loss = replace(
        cfg.loss,
        mask_selection="scores",
        null_segment=False,
        ce_null_column=False,
        ce_all_ignore_fallback=False,
    )
    return replace(cfg, loss=loss)
