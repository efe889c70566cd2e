"""Model configuration: one dataclass composed of the parts' configs, with named presets."""

from __future__ import annotations

from dataclasses import dataclass, field

from xmask3d.backbone3d import Backbone3DConfig
from xmask3d.losses import LossConfig

PRESETS = ("tiny", "small", "paper")


def backbone_preset(name: str) -> Backbone3DConfig:
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
    return Backbone3DConfig(
        init_dim=8,
        planes=(8, 16, 32, 64, 64, 32, 24, 24),
        blocks=(1,) * 8,
        binary_planes=(8, 16, 32, 64, 32, 32, 24, 24),
        binary_blocks=(1,) * 8,
        out_channels=64,
    )


@dataclass
class ModelConfig:
    backbone: Backbone3DConfig = field(default_factory=Backbone3DConfig)
    loss: LossConfig = field(default_factory=LossConfig)


def preset(name: str) -> ModelConfig:
    return ModelConfig(backbone=backbone_preset(name))
