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

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from preprocessing.text import TINY_EMBED_DIM, MiniLMTextEncoder
from storage.errors import InputError
from xmask3d.network.backbone3d import Backbone3DConfig
from xmask3d.network.clip import ClipConfig, clip_preset
from xmask3d.network.losses import CAPTION_SUPERVISION, LossConfig
from xmask3d.network.mask_generator import MaskGeneratorConfig, mask_generator_preset

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
    # text space of class names and captions (preprocessing.text.build_text_encoder spec)
    text_encoder: str = f"openclip:{PAPER_CLIP_MODEL}:{PAPER_CLIP_CHECKPOINT}"
    # eval gating threshold of a mask's mean binary probability (spec §4 step 3)
    binary_2d_thresh: float = 0.5
    # Component switches (the ablation study, docs/ablation.md); all on = the paper's model.
    # Off removes the component's parameters and loss terms (nothing is zeroed). These are the
    # authoritative values: ``__post_init__`` copies them into ``mask_generator`` and ``loss``.
    # 3D global feature into the UNet context and time embedding (off: plain E("") context)
    implicit_condition: bool = True
    # 2D->3D mask regularisation loss_3d_contra (off: no term, MaskCLIP never runs in training)
    mask_regularization: bool = True
    # FeatureMerger (off: the fused feature is the 3D feature; loss_3d and
    # loss_explicit_contra, which would repeat loss_3d_pure and loss_explicit_contra_3d, are dropped)
    fusion: bool = True
    # base/novel head (off: no BinaryHead, no loss_binary, no base/novel gating at evaluation)
    binary_head: bool = True
    # caption alignment losses loss_explicit_contra, _3d, _2d_pre
    caption_losses: bool = True
    # Which captions supervise (copied into ``loss``): "official" = view captions, the paper's
    # 1 − cos(mean view feature, caption); "region" = region captions (a phrase and the points of
    # its box), contrastive over the batch (PLA / RegionPLC, docs/openvocab.md); "official+region".
    caption_supervision: str = "official"

    def __post_init__(self) -> None:
        if self.caption_supervision not in CAPTION_SUPERVISION:
            raise InputError(f"ModelConfig.caption_supervision must be one of {list(CAPTION_SUPERVISION)}, "
                             f"got {self.caption_supervision!r}")
        for name in SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        self.mask_generator = replace(self.mask_generator, implicit_condition=self.implicit_condition)
        self.loss = replace(
            self.loss,
            mask_regularization=self.mask_regularization,
            fusion=self.fusion,
            binary_head=self.binary_head,
            caption_losses=self.caption_losses,
            caption_supervision=self.caption_supervision,
        )
        if self.mask_regularization and not self.binary_head and self.loss.mask_selection == "scores":
            raise InputError(
                "ModelConfig: mask_selection='scores' selects masks with the binary head; "
                "it needs binary_head=True (or mask_selection='labels')"
            )

    def switches(self) -> dict[str, bool]:
        """The component switches by name."""
        return {name: getattr(self, name) for name in SWITCHES}


# Names of the ModelConfig component switches, in the order of the ablation table.
SWITCHES = ("implicit_condition", "mask_regularization", "fusion", "binary_head", "caption_losses")


def with_switches(cfg: ModelConfig, **switches: bool) -> ModelConfig:
    """``cfg`` with some component switches changed (InputError on an unknown name)."""
    unknown = set(switches) - set(SWITCHES)
    if unknown:
        raise InputError(f"unknown model switch(es) {sorted(unknown)} (known: {', '.join(SWITCHES)})")
    return replace(cfg, **switches)


# Ablation variant part that trains with region-caption supervision instead of view captions.
REGION_VARIANT = "region-captions"


def variant_supervision(name: str) -> str | None:
    """Caption supervision a variant name asks for: "region" when it has the ``region-captions``
    part (``region-captions``, ``no-fusion+region-captions``), else None (the study's default)."""
    return "region" if REGION_VARIANT in [p.strip() for p in name.split("+")] else None


def variant_switches(name: str) -> dict[str, bool]:
    """Switches of an ablation variant name: ``full`` (all on), ``no-<switch>`` with dashes
    (``no-fusion``, ``no-implicit-condition``), or several joined by ``+`` (``no-fusion+no-binary-head``).
    A ``region-captions`` part sets no switch (see :func:`variant_supervision`)."""
    name = name.strip()
    parts = [p for p in name.split("+") if p.strip() != REGION_VARIANT]
    if name == "full" or not parts:
        return {}
    off: dict[str, bool] = {}
    for part in parts:
        switch = part.strip().removeprefix("no-").replace("-", "_")
        if not part.strip().startswith("no-") or switch not in SWITCHES:
            choices = ", ".join(["full", *(variant_name({s: False}) for s in SWITCHES), REGION_VARIANT])
            raise InputError(f"unknown ablation variant {name!r} (choose from {choices}, or join with '+')")
        off[switch] = False
    return off


def variant_name(switches: Mapping[str, bool], supervision: str | None = None) -> str:
    """Inverse of :func:`variant_switches` (and :func:`variant_supervision`): the switches that
    are off, then ``region-captions`` when the variant trains with region captions."""
    parts = ["no-" + s.replace("_", "-") for s in SWITCHES if switches.get(s) is False]
    if supervision == "region":
        parts.append(REGION_VARIANT)
    return "+".join(parts) or "full"


def _from_dict(cls: type, data: Mapping[str, Any], source: str) -> Any:
    """A config dataclass from ``dataclasses.asdict`` output; lists back to tuples where the
    default is a tuple; unknown keys are an InputError (a checkpoint from another code version)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise InputError(f"{source}: unknown {cls.__name__} field(s) {sorted(unknown)}")
    defaults = cls()
    values = {}
    for name, value in data.items():
        default = getattr(defaults, name)
        if isinstance(value, list) and isinstance(default, tuple):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def model_config_from_dict(data: Mapping[str, Any], source: str = "model config") -> ModelConfig:
    """The ``ModelConfig`` recorded by ``dataclasses.asdict`` (checkpoints, MLflow). Switches
    missing from older records are on (those models had every component)."""
    if not isinstance(data, Mapping):
        raise InputError(f"{source}: model config is not a mapping")
    parts = {"backbone": Backbone3DConfig, "mask_generator": MaskGeneratorConfig, "clip": ClipConfig,
             "loss": LossConfig}
    values = dict(data)
    try:
        for key, cls in parts.items():
            if key in values:
                values[key] = _from_dict(cls, values[key], source)
        return _from_dict(ModelConfig, values, source)
    except (TypeError, ValueError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"{source}: invalid model config ({error})") from error


def check_switches(recorded: Mapping[str, Any] | None, cfg: ModelConfig, source: str) -> None:
    """InputError when a checkpoint's recorded ModelConfig (``payload["model_config"]``) has other
    component switches than ``cfg``: its weights belong to another network."""
    recorded = recorded or {}
    theirs = {s: bool(recorded.get(s, True)) for s in SWITCHES}
    ours = cfg.switches()
    diff = [s for s in SWITCHES if theirs[s] != ours[s]]
    if diff:
        def show(values: Mapping[str, bool]) -> str:
            return ", ".join(f"{s}={'on' if values[s] else 'off'}" for s in diff)

        raise InputError(
            f"{source}: checkpoint was trained with {show(theirs)} (variant {variant_name(theirs)}), "
            f"the model has {show(ours)} (variant {variant_name(ours)})"
        )


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
    ``clip_checkpoint`` (open_clip ViT-L/14 OpenAI weights; default ``PAPER_CLIP_CHECKPOINT`` when
    that file exists) load the pretrained parts; :func:`missing_pretrained` says what is absent."""
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r} (expected one of {list(PRESETS)})")
    if name != "paper" and (sd_dir is not None or clip_checkpoint is not None):
        raise InputError(f"preset {name!r} is random-init; sd_dir / clip_checkpoint apply to 'paper' only")
    if name == "paper":
        if clip_checkpoint is None and Path(PAPER_CLIP_CHECKPOINT).is_file():
            clip_checkpoint = PAPER_CLIP_CHECKPOINT  # one file for the image and the text tower
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


def missing_pretrained(cfg: ModelConfig) -> list[str]:
    """What the ``paper`` preset's pretrained weights lack, one phrase per missing folder or file
    (empty for the random-init presets by design, and for ``paper`` with every weight present).
    Without these the SD UNet / VAE / empty-prompt context or the CLIP image tower are random."""
    if cfg.name != "paper":
        return []
    missing = []
    mg = cfg.mask_generator
    if mg.unet_path is None:
        missing.append("no Stable Diffusion 1.x folder (--sd-dir DIR with unet/, vae/, text_encoder/, "
                       "tokenizer/)")
    else:
        for path, what in ((mg.unet_path, "config.json"), (mg.vae_path, "config.json"),
                           (mg.text_encoder_path, "config.json"), (mg.tokenizer_path, "")):
            if path is None or not (Path(path) / what).exists():
                missing.append(f"{Path(str(path)) / what if what else path} not found")
    if cfg.clip.checkpoint is None:
        missing.append("no CLIP ViT-L/14 checkpoint (--clip-checkpoint FILE; default "
                       f"{PAPER_CLIP_CHECKPOINT} not found)")
    elif not Path(cfg.clip.checkpoint).exists():
        missing.append(f"{cfg.clip.checkpoint} not found")
    return missing


def text_dim(spec: str) -> int:
    """Dimension of the text space named by a text-encoder spec, without loading the encoder."""
    if spec == "minilm":

        return MiniLMTextEncoder.dim
    if spec == "openclip-tiny":

        return TINY_EMBED_DIM
    if spec.startswith("openclip:"):
        import open_clip  # heavy: only for an open_clip text spec

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
