"""The 2D branch: a frozen Stable Diffusion UNet + VAE, implicitly conditioned on the global 3D
feature, as a feature extractor for a Mask2Former head (spec §3; ODISE-style).

Data flow for a view (B images, any size, values in [0, 1]):
  image -> bilinear resize to ``image_size`` -> VAE encoder (frozen) -> 0.18215 * posterior mean
  -> + fixed noise at t = 0 -> UNet (frozen; context = E("") + tanh(a_c) * PositionalLinear(g),
  time embedding + tanh(a_t) * PositionalLinear(g)) ; the VAE decoder runs on the clean latent.
  Inputs of 8 UNet/VAE blocks -> one BottleneckBlock each -> nearest resize -> sum per stride
  -> 4 levels (strides 4, 8, 16, 32) -> MSDeformAttnPixelDecoder -> MaskedTransformerDecoder
  -> pred_masks [B, Q, H/4, W/4] (logits) and mask_embed [B, Q, embed_dim] (CLIP space).

The UNet, VAE and text encoder are frozen (``requires_grad=False``, eval mode), but autograd still
flows through the UNet to the condition modules (spec Q7). ``MaskClassifier`` turns mask
embeddings into class logits against CLIP text embeddings.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn

from storage.errors import InputError
from xmask3d.network.pixel_decoder import MSDeformAttnPixelDecoder
from xmask3d.network.transformer_decoder import MaskedTransformerDecoder

log = logging.getLogger(__name__)

NOISE_SEED = 42  # the official fixed noise buffer (spec Q4)
EMPTY_CONTEXT_SEED = 0  # random stand-in for E("") when no SD text encoder is given

# Feature taps (spec §3 table): (sub-model, block list, block index, output stride). The feature is
# the INPUT of the block's last resnet (for UNet up blocks that is cat(hidden, skip)).
FEATURE_TAPS: tuple[tuple[str, str, int, int], ...] = (
    ("vae", "encoder.down_blocks", 2, 4),
    ("vae", "decoder.up_blocks", 1, 4),
    ("vae", "encoder.down_blocks", 3, 8),
    ("unet", "up_blocks", 3, 8),
    ("vae", "decoder.up_blocks", 0, 8),
    ("unet", "up_blocks", 2, 16),
    ("unet", "up_blocks", 1, 32),
    ("unet", "up_blocks", 0, 32),  # native stride 64, clamped to 32
)
STRIDES = (4, 8, 16, 32)


def sd_unet_kwargs(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block: int = 2,
    cross_attention_dim: int = 768,
    attention_head_dim: int = 8,
    norm_num_groups: int = 32,
    sample_size: int = 64,
) -> dict:
    """``UNet2DConditionModel`` kwargs of the SD 1.x layout (defaults = SD 1.x sizes)."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


def sd_vae_kwargs(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block: int = 2,
    norm_num_groups: int = 32,
    sample_size: int = 512,
) -> dict:
    """``AutoencoderKL`` kwargs of the SD 1.x VAE (defaults = SD 1.x sizes, 4 latent channels)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=0.18215,
    )


@dataclass
class MaskGeneratorConfig:
    """2D branch sizes. ``*_path`` = local directories for ``from_pretrained`` (None = random init)."""

    unet: dict = field(default_factory=sd_unet_kwargs)
    vae: dict = field(default_factory=sd_vae_kwargs)
    unet_path: str | None = None
    vae_path: str | None = None
    text_encoder_path: str | None = None  # SD's CLIPTextModel dir: E("") for the context
    tokenizer_path: str | None = None  # SD's CLIPTokenizer dir
    image_size: tuple[int, int] = (512, 512)  # (H, W); paper squashes 240x320 to 512x512 (Q10)
    noise: str = "fixed"  # "fixed": seed-42 buffer at t=0 (paper, Q4); "none": the clean latent
    implicit_condition: bool = True  # False: no 3D condition modules, plain E("") context
    context_length: int = 77
    feature_channels: int = 512  # C of each of the 4 levels
    norm_groups: int = 32  # GroupNorm groups of the bottlenecks and the pixel decoder
    hidden_dim: int = 256
    num_queries: int = 50
    pixel_decoder_layers: int = 6
    pixel_decoder_heads: int = 8
    pixel_decoder_points: int = 4
    pixel_decoder_ffn: int = 1024
    decoder_layers: int = 9
    decoder_heads: int = 8
    decoder_ffn: int = 2048

    @property
    def mask_size(self) -> tuple[int, int]:
        """Resolution of ``pred_masks`` (image / 4)."""
        return (self.image_size[0] // 4, self.image_size[1] // 4)

    @classmethod
    def paper(cls, sd_dir: str | Path | None = None) -> MaskGeneratorConfig:
        """SD 1.x sizes; ``sd_dir`` = a diffusers SD 1.x folder (unet/, vae/, text_encoder/, tokenizer/)."""
        cfg = cls()
        if sd_dir is not None:
            sd = Path(sd_dir)
            cfg = replace(
                cfg,
                unet_path=str(sd / "unet"),
                vae_path=str(sd / "vae"),
                text_encoder_path=str(sd / "text_encoder"),
                tokenizer_path=str(sd / "tokenizer"),
            )
        return cfg

    @classmethod
    def small(cls) -> MaskGeneratorConfig:
        """One GPU, random init: SD layout at a quarter of the width, 256x256 input."""
        return cls(
            unet=sd_unet_kwargs((64, 128, 256, 256), 1, 256, 8, 32, 32),
            vae=sd_vae_kwargs((32, 64, 128, 128), 1, 32, 256),
            image_size=(256, 256),
            feature_channels=256,
            hidden_dim=128,
            num_queries=50,
            pixel_decoder_layers=3,
            pixel_decoder_ffn=512,
            decoder_layers=6,
            decoder_ffn=512,
        )

    @classmethod
    def tiny(cls) -> MaskGeneratorConfig:
        """CPU tests: a few thousand SD weights, 64x64 input, 8 queries."""
        return cls(
            unet=sd_unet_kwargs((8, 8, 16, 16), 1, 16, 2, 4, 8),
            vae=sd_vae_kwargs((8, 8, 16, 16), 1, 4, 64),
            image_size=(64, 64),
            feature_channels=32,
            norm_groups=4,
            hidden_dim=32,
            num_queries=8,
            pixel_decoder_layers=1,
            pixel_decoder_heads=4,
            pixel_decoder_ffn=64,
            decoder_layers=3,
            decoder_heads=4,
            decoder_ffn=64,
        )


def mask_generator_preset(name: str) -> MaskGeneratorConfig:
    """``tiny`` | ``small`` | ``paper`` (paper without weights: set the ``*_path`` fields)."""
    presets = {
        "tiny": MaskGeneratorConfig.tiny,
        "small": MaskGeneratorConfig.small,
        "paper": MaskGeneratorConfig.paper,
    }
    if name not in presets:
        raise InputError(f"unknown mask generator preset {name!r} (expected one of {sorted(presets)})")
    return presets[name]()


class PositionalLinear(nn.Module):
    """y = Linear(x)[:, None] + pos, pos [1, seq, out] trunc-normal(0.02): one vector -> seq tokens."""

    def __init__(self, in_features: int, out_features: int, seq_len: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.positional_embedding = nn.Parameter(torch.zeros(1, seq_len, out_features))
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)[:, None] + self.positional_embedding


def _c2_msra_fill(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class BottleneckBlock(nn.Module):
    """detectron2 BottleneckBlock with GroupNorm: 1x1 in->C/4, 3x3, 1x1 ->C, shortcut 1x1+GN when
    in != C, ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int):
        super().__init__()
        mid = out_channels // 4

        def conv_gn(cin, cout, k):
            conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
            _c2_msra_fill(conv)
            return nn.Sequential(conv, nn.GroupNorm(norm_groups, cout))

        self.conv1 = conv_gn(in_channels, mid, 1)
        self.conv2 = conv_gn(mid, mid, 3)
        self.conv3 = conv_gn(mid, out_channels, 1)
        self.shortcut = conv_gn(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


def tap_modules(unet: UNet2DConditionModel, vae: AutoencoderKL) -> list[nn.Module]:
    """The resnets whose inputs are the features of ``FEATURE_TAPS`` (same order)."""
    models = {"unet": unet, "vae": vae}
    return [models[m].get_submodule(blocks)[i].resnets[-1] for m, blocks, i, _ in FEATURE_TAPS]


def _load_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise InputError(f"{p}: not a diffusers/transformers {what} directory (config.json missing)")
    return p


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def build_unet(cfg: MaskGeneratorConfig) -> UNet2DConditionModel:
    """The frozen UNet; with the implicit condition it adds a class embedding of type "identity"
    (no weights) so a vector passed as ``class_labels`` is added to the time embedding."""
    extra = {"class_embed_type": "identity"} if cfg.implicit_condition else {}
    if cfg.unet_path is None:
        log.info("mask generator: random-init UNet (no unet_path)")
        return _freeze(UNet2DConditionModel(**{**cfg.unet, **extra}))
    unet = UNet2DConditionModel.from_pretrained(_load_dir(cfg.unet_path, "UNet"), **extra)
    if unet.config.class_embed_type not in (None, "identity"):
        raise InputError(f"{cfg.unet_path}: UNet has class_embed_type={unet.config.class_embed_type!r}")
    return _freeze(unet)


def build_vae(cfg: MaskGeneratorConfig) -> AutoencoderKL:
    if cfg.vae_path is None:
        log.info("mask generator: random-init VAE (no vae_path)")
        return _freeze(AutoencoderKL(**cfg.vae))
    return _freeze(AutoencoderKL.from_pretrained(_load_dir(cfg.vae_path, "VAE")))


@torch.no_grad()
def empty_prompt_context(cfg: MaskGeneratorConfig, dim: int) -> torch.Tensor:
    """E(""): SD's CLIP text encoder output for the empty prompt [1, context_length, dim]; a fixed
    seeded random tensor when no text encoder is configured."""
    if cfg.text_encoder_path is None:
        log.info("mask generator: random empty-prompt context (no text_encoder_path)")
        gen = torch.Generator().manual_seed(EMPTY_CONTEXT_SEED)
        return torch.randn(1, cfg.context_length, dim, generator=gen)
    from transformers import CLIPTextModel, CLIPTokenizer  # heavy: only with Stable Diffusion weights

    if cfg.tokenizer_path is None:
        raise InputError("mask generator: text_encoder_path is set but tokenizer_path is not")
    tokenizer = CLIPTokenizer.from_pretrained(str(cfg.tokenizer_path))
    encoder = CLIPTextModel.from_pretrained(str(_load_dir(cfg.text_encoder_path, "text encoder"))).eval()
    ids = tokenizer(
        [""], padding="max_length", max_length=cfg.context_length, truncation=True, return_tensors="pt"
    ).input_ids
    ctx = encoder(input_ids=ids).last_hidden_state.float()
    if ctx.shape[-1] != dim:
        raise InputError(
            f"{cfg.text_encoder_path}: text width {ctx.shape[-1]} != UNet cross_attention_dim {dim}"
        )
    return ctx


class MaskGenerator(nn.Module):
    """images [B,3,H,W] in [0,1] + global 3D feature [B, cond_dim] -> masks and mask embeddings."""

    def __init__(self, cfg: MaskGeneratorConfig, cond_dim: int, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.cond_dim, self.embed_dim = cond_dim, embed_dim
        self.unet = build_unet(cfg)
        self.vae = build_vae(cfg)
        if len(self.unet.up_blocks) != 4 or len(self.vae.encoder.down_blocks) != 4:
            raise InputError(
                "mask generator: the UNet and the VAE must have 4 resolution levels (SD 1.x layout)"
            )
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) * 2 ** (len(self.unet.up_blocks) - 1)
        if any(s % factor for s in cfg.image_size):
            raise InputError(f"mask generator: image_size {cfg.image_size} must be a multiple of {factor}")
        self.scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        )
        cross_dim = self.unet.config.cross_attention_dim
        time_dim = self.unet.time_embedding.linear_2.out_features
        self.register_buffer("empty_context", empty_prompt_context(cfg, cross_dim), persistent=False)
        latent_hw = [s // 2 ** (len(self.vae.config.block_out_channels) - 1) for s in cfg.image_size]
        gen = torch.Generator().manual_seed(NOISE_SEED)
        noise = torch.randn(1, self.vae.config.latent_channels, *latent_hw, generator=gen)
        self.register_buffer("noise", noise, persistent=False)

        if cfg.implicit_condition:
            self.context_proj = PositionalLinear(cond_dim, cross_dim, cfg.context_length)
            self.alpha_cond = nn.Parameter(torch.zeros(1, cfg.context_length, cross_dim))
            self.time_proj = PositionalLinear(cond_dim, time_dim, 1)
            self.alpha_time = nn.Parameter(torch.zeros(time_dim))

        self.taps = tap_modules(self.unet, self.vae)
        self.tap_strides = [t[3] for t in FEATURE_TAPS]
        self.projections = nn.ModuleList(
            BottleneckBlock(m.in_channels, cfg.feature_channels, cfg.norm_groups) for m in self.taps
        )
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels=cfg.feature_channels,
            conv_dim=cfg.hidden_dim,
            mask_dim=cfg.hidden_dim,
            num_layers=cfg.pixel_decoder_layers,
            n_heads=cfg.pixel_decoder_heads,
            n_points=cfg.pixel_decoder_points,
            dim_feedforward=cfg.pixel_decoder_ffn,
            norm_groups=cfg.norm_groups,
        )
        self.decoder = MaskedTransformerDecoder(
            hidden_dim=cfg.hidden_dim,
            embed_dim=embed_dim,
            num_queries=cfg.num_queries,
            num_layers=cfg.decoder_layers,
            nheads=cfg.decoder_heads,
            dim_feedforward=cfg.decoder_ffn,
        )

    # -- frozen parts -------------------------------------------------------------------------
    def frozen_modules(self) -> dict[str, nn.Module]:
        """The pretrained, never-trained parts (their weights come from ``*_path``, not checkpoints)."""
        return {"unet": self.unet, "vae": self.vae}

    def train(self, mode: bool = True) -> MaskGenerator:
        super().train(mode)
        for m in self.frozen_modules().values():
            m.eval()
        return self

    def condition(self, global_3d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context [B, seq, cross_dim], time-embedding offset [B, time_dim] or None)."""
        b = global_3d.shape[0]
        ctx = self.empty_context.to(global_3d.dtype).expand(b, -1, -1)
        if not self.cfg.implicit_condition:
            return ctx, None
        ctx = ctx + torch.tanh(self.alpha_cond) * self.context_proj(global_3d)
        temb = torch.tanh(self.alpha_time) * self.time_proj(global_3d)[:, 0]
        return ctx, temb

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images of any size -> [-1,1] at ``image_size`` (bilinear, aspect not kept: Q10)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"mask generator: images must be [B,3,H,W], got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != tuple(self.cfg.image_size):
            images = F.interpolate(
                images, size=tuple(self.cfg.image_size), mode="bilinear", align_corners=False
            )
        return images * 2 - 1

    def extract_features(self, images: torch.Tensor, global_3d: torch.Tensor) -> list[torch.Tensor]:
        """The 8 raw tapped features (inputs of the tapped resnets), in ``FEATURE_TAPS`` order."""
        captured: dict[int, torch.Tensor] = {}

        def hook(i, _module, args):
            captured[i] = args[0]

        handles = [m.register_forward_pre_hook(partial(hook, i)) for i, m in enumerate(self.taps)]
        try:
            x = self.preprocess(images)
            with torch.no_grad():
                mean = self.vae.encode(x).latent_dist.mean
                self._decode_to_taps(mean)
            latent = mean * self.vae.config.scaling_factor
            b = latent.shape[0]
            t = torch.zeros(b, dtype=torch.long, device=latent.device)
            if self.cfg.noise == "fixed":
                latent = self.scheduler.add_noise(latent, self.noise.to(latent.dtype).expand_as(latent), t)
            elif self.cfg.noise != "none":
                raise InputError(f"mask generator: noise must be 'fixed' or 'none', got {self.cfg.noise!r}")
            grad = torch.is_grad_enabled() and self.cfg.implicit_condition
            with torch.set_grad_enabled(grad):
                ctx, temb = self.condition(global_3d.to(latent.dtype))
                self.unet(latent, t, encoder_hidden_states=ctx, class_labels=temb)
        finally:
            for h in handles:
                h.remove()
        return [captured[i] for i in range(len(self.taps))]

    def _decode_to_taps(self, mean: torch.Tensor) -> None:
        """Run the VAE decoder on the clean latent only as far as the tapped blocks need."""
        vae = self.vae
        z = vae.post_quant_conv(mean) if vae.post_quant_conv is not None else mean
        dec = vae.decoder
        h = dec.mid_block(dec.conv_in(z), None)
        last = max(i for m, b, i, _ in FEATURE_TAPS if m == "vae" and b == "decoder.up_blocks")
        for i, block in enumerate(dec.up_blocks[: last + 1]):
            if i < last:
                h = block(h, None)
            else:
                for resnet in block.resnets:
                    h = resnet(h, temb=None)

    # -- trainable head ------------------------------------------------------------------------
    def multiscale_features(self, raw: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Bottleneck-project each tapped feature at its stride and sum per stride -> {4,8,16,32}."""
        h, w = self.cfg.image_size
        levels: dict[int, torch.Tensor] = {}
        for feat, proj, stride in zip(raw, self.projections, self.tap_strides, strict=True):
            feat = F.interpolate(feat, size=(h // stride, w // stride), mode="nearest")
            y = proj(feat)
            levels[stride] = y if stride not in levels else levels[stride] + y
        return levels

    def forward(self, images: torch.Tensor, global_3d: torch.Tensor) -> dict:
        """-> dict(pred_masks [B,Q,H/4,W/4] logits, mask_embed [B,Q,embed_dim], aux: list of the
        intermediate predictions' dicts with the same keys)."""
        if global_3d.ndim != 2 or global_3d.shape != (images.shape[0], self.cond_dim):
            raise InputError(
                f"mask generator: global_3d must be [{images.shape[0]}, {self.cond_dim}], "
                f"got {tuple(global_3d.shape)}"
            )
        levels = self.multiscale_features(self.extract_features(images, global_3d))
        mask_features, multi_scale = self.pixel_decoder(levels)
        preds = self.decoder(multi_scale, mask_features)
        return {**preds[-1], "aux": preds[:-1]}


class MaskClassifier(nn.Module):
    """Class logits = scale * cos(embedding, text), scale = exp(p) clamped at 100 (p init ln(1/0.07)),
    plus a learnable "no object" embedding (init = the text embedding of "" when given)."""

    def __init__(self, embed_dim: int, null_init: torch.Tensor | None = None):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if null_init is not None:
            null = null_init.detach().float().reshape(1, embed_dim).clone()
        else:
            null = torch.randn(1, embed_dim) * 0.02
        self.null_embed = nn.Parameter(null)

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100)

    def point_logits(self, feats: torch.Tensor, text: torch.Tensor, with_null: bool = True) -> torch.Tensor:
        """feats [..., D], text [K, D] -> [..., K(+1)]; the null column is last."""
        if with_null:
            text = torch.cat([text, self.null_embed.to(text.dtype)], 0)
        return self.scale * F.normalize(feats, dim=-1) @ F.normalize(text, dim=-1).t()

    def logits(self, mask_embed: torch.Tensor, text: torch.Tensor, with_null: bool = True) -> torch.Tensor:
        """mask_embed [B, Q, D], text [K, D] -> [B, Q, K(+1)]."""
        return self.point_logits(mask_embed, text, with_null)
