"""The assembled XMask3D network (XMASK3D_SPEC.md §2-§4).

One view per sample. The 3D branch gives per-point features (text space) and a global 3D vector;
the global vector conditions the diffusion mask generator, whose masks are classified against the
base-class text embeddings; the final (disjoint) 2D masks give covered points a 2D feature, merged
with the 3D feature; MaskCLIP embeddings of the raw masks regularise the 3D features.

``forward`` (training) returns what ``xmask3d.network.losses.compute_losses`` needs; ``infer``
(evaluation) returns per-point features, final masks and their MaskCLIP embeddings, with the
official eval-time query dropping and binary gating.

Component switches (``ModelConfig.implicit_condition``, ``mask_regularization``, ``fusion``,
``binary_head``, ``caption_losses``; docs/ablation.md): a switched-off component is not built, so
its parameters are absent from the model and its checkpoints. Without the implicit condition the
3D branch has no global projection (``backbone3d.implicit``) and the UNet sees the plain E("")
context; without the binary head ``binary_logit`` is None and evaluation does not gate.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from xmask3d.network.backbone3d import Backbone3D, BinaryHead, sparse_input
from xmask3d.network.clip import ClipImageTower
from xmask3d.network.config import ModelConfig, preset, text_dim
from xmask3d.network.fusion import (
    FeatureMerger,
    assign_pixels,
    gate_query_logits,
    lookup_points,
    point_mask_features,
    point_query_probs,
    query_binary_mean,
    query_scores,
    upsample_masks,
)
from xmask3d.network.losses import mask_confidence
from xmask3d.network.mask_generator import MaskClassifier, MaskGenerator


def _float32(value: Any) -> Any:
    """Floating tensors (in dicts and lists too) as float32; a tensor already float32 is returned as is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_float32(v) for v in value]
    return value


class XMask3D(nn.Module):
    """3D UNet + binary head + 3D-conditioned diffusion mask generator + MaskCLIP + fusion."""

    def __init__(self, cfg: ModelConfig, text_dim: int, null_init: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.text_dim = text_dim
        self.backbone3d = Backbone3D(cfg.backbone, text_dim)
        if not cfg.implicit_condition:
            del self.backbone3d.implicit  # the global 3D vector only feeds the implicit condition
        self.binary_head = BinaryHead(cfg.backbone) if cfg.binary_head else None
        self.mask_generator = MaskGenerator(cfg.mask_generator, cond_dim=text_dim, embed_dim=text_dim)
        self.classifier = MaskClassifier(text_dim, null_init)
        self.clip = ClipImageTower(cfg.clip, text_dim)
        self.merger = FeatureMerger(text_dim) if cfg.fusion else None

    def compile_heads(self, **options: Any) -> None:
        """``torch.compile`` the trainable 2D heads in place: the feature projections, the pixel
        decoder and the transformer decoder (``TrainConfig.compile``). ``nn.Module.compile`` keeps
        parameter names, so checkpoints are unchanged; the first steps pay the compilation
        (docs/benchmarks.md). The SD UNet / VAE (frozen, run through hooks) and the sparse 3D
        branch (spconv) are left eager."""
        generator = self.mask_generator
        for module in (*generator.projections, generator.pixel_decoder, generator.decoder):
            module.compile(**options)

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Pretrained parts that are never trained (SD UNet, VAE, CLIP image tower)."""
        return {**self.mask_generator.frozen_modules(), "clip": self.clip.visual}

    # ------------------------------------------------------------------------------------------
    def _inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The network's inputs; the one cast at the boundary is the uint8 image to float in [0, 1].

        The training step delivers the batch on the device in the loader's dtypes (int32 voxel
        coordinates, float32 features, int64 indices, uint8 images); a tensor elsewhere (inference
        callers) is moved here.
        """
        device = self.classifier.logit_scale.device
        keys = ("voxel_coord", "voxel_feat", "inverse", "uv", "batch_index", "image")
        out = {}
        for k in keys:
            value = torch.as_tensor(batch[k])
            out[k] = value if value.device == device else value.to(device, non_blocking=True)
        out["images"] = out.pop("image").float() / 255.0
        return out

    def encode_3d(self, x: dict[str, torch.Tensor]) -> dict[str, Any]:
        """point_feat [N,D], global_3d [B,D] (None without the implicit condition), binary_logit
        [N] (None without the binary head)."""
        b = x["images"].shape[0]
        sparse = sparse_input(x["voxel_coord"], x["voxel_feat"], b)  # one input for both UNets
        if self.cfg.implicit_condition:
            out: dict[str, Any] = self.backbone3d.forward_sparse(sparse, x["inverse"])
        else:
            _, final = self.backbone3d.unet(sparse)
            out = {"point_feat": self.backbone3d.head(final)[x["inverse"]], "global_3d": None}
        head = self.binary_head
        out["binary_logit"] = head.forward_sparse(sparse, x["inverse"]) if head is not None else None
        return out

    def _generate(self, images: torch.Tensor, global_3d: torch.Tensor | None) -> dict[str, Any]:
        if global_3d is None:  # no implicit condition: the generator only reads the batch size
            global_3d = images.new_zeros(images.shape[0], self.text_dim)
        return self.mask_generator(images, global_3d)

    def _fuse(self, x, feats_3d, point_mask, mask_embed):
        feats_2d, covered = point_mask_features(point_mask, mask_embed, x["batch_index"])
        fused = self.merger(feats_3d, feats_2d, covered) if self.merger is not None else feats_3d
        return feats_2d, covered, fused

    def forward(self, batch: dict[str, Any], base_text: torch.Tensor, epoch: int = 0) -> dict[str, Any]:
        """Training forward for one collated batch; ``base_text`` [C, D] = base-class text embeddings.

        -> pred_logits [B,Q,C+1], pred_masks [B,Q,h,w], aux (list of the same), feats_3d /
        feats_2d / feats_fused [N,D], covered [N], point_mask [N] (query id, -1 none),
        logits_3d_fused / logits_3d_pure [N,C(+1)], binary_logit [N] (None without the binary
        head), global_3d [B,D] (None without the implicit condition), image_size (H,W), and when
        the mask regularisation is active: point_probs [N,Q], mask_confidence [B,Q], mask_clip [B,Q,D].
        """
        x = self._inputs(batch)
        if base_text.device != x["images"].device or base_text.dtype != torch.float32:
            base_text = base_text.to(x["images"].device, torch.float32)
        size = tuple(x["images"].shape[-2:])
        three = self.encode_3d(x)
        feats_3d = three["point_feat"]
        generated = self._generate(x["images"], three["global_3d"])
        pred_masks, mask_embed = generated["pred_masks"], generated["mask_embed"]
        pred_logits = self.classifier.logits(mask_embed, base_text, with_null=True)
        aux = [
            {
                "pred_logits": self.classifier.logits(a["mask_embed"], base_text, with_null=True),
                "pred_masks": a["pred_masks"],
            }
            for a in generated["aux"]
        ]
        contra = self.cfg.loss.contra_active(epoch)
        with torch.no_grad():
            probs = upsample_masks(pred_masks.detach().float(), size)
            point_mask = lookup_points(
                assign_pixels(probs, query_scores(pred_logits)), x["uv"], x["batch_index"]
            )
            extra = {}
            if contra:
                extra["point_probs"] = point_query_probs(probs, x["uv"], x["batch_index"])
                extra["mask_confidence"] = mask_confidence(probs)
                extra["mask_clip"] = self.clip.mask_embed(x["images"], pred_masks.detach())
            del probs
        feats_2d, covered, fused = self._fuse(x, feats_3d, point_mask, mask_embed)
        with_null = self.cfg.loss.ce_null_column
        # the output boundary: float32 for the losses (a cast only under autocast)
        return _float32({
            "pred_logits": pred_logits,
            "pred_masks": pred_masks,
            "aux": aux,
            "feats_3d": feats_3d,
            "feats_2d": feats_2d,
            "covered": covered,
            "feats_fused": fused,
            "point_mask": point_mask,
            "logits_3d_fused": self.classifier.point_logits(fused, base_text, with_null),
            "logits_3d_pure": self.classifier.point_logits(feats_3d, base_text, with_null),
            "binary_logit": three["binary_logit"],
            "global_3d": three["global_3d"],
            "image_size": size,
            **extra,
        })

    @torch.no_grad()
    def infer(
        self, batch: dict[str, Any], all_text: torch.Tensor, is_base: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Evaluation forward (call ``model.eval()`` first); ``all_text`` [T, D] = every class.

        Queries whose raw mask (prob > 0.5) covers no point of the view are dropped. With
        ``is_base`` (bool [T]) the query logits are gated by the mask's mean binary probability
        before the final masks are formed (official eval, spec §4 step 3); without it they are not.
        -> feats_3d, feats_2d, covered, feats_fused [N,D], binary_logit [N], point_mask [N] (query
        id within the view, -1 none), mask_logits [B,Q,T+1] (gated if is_base), mask_keep [B,Q],
        mask_binary [B,Q] (mean binary prob over the mask's points), mask_clip [B,Q,D] (MaskCLIP),
        logit_scale (float). Without the binary head, binary_logit and mask_binary are None and
        nothing is gated.
        """
        x = self._inputs(batch)
        all_text = all_text.to(x["images"].device, torch.float32)
        b, size = x["images"].shape[0], tuple(x["images"].shape[-2:])
        three = self.encode_3d(x)
        feats_3d, binary_logit = three["point_feat"], three["binary_logit"]
        generated = self._generate(x["images"], three["global_3d"])
        pred_masks, mask_embed = generated["pred_masks"], generated["mask_embed"]
        logits = self.classifier.logits(mask_embed, all_text, with_null=True)
        probs = upsample_masks(pred_masks.float(), size)
        point_probs = point_query_probs(probs, x["uv"], x["batch_index"])
        binary_prob = binary_logit.sigmoid() if binary_logit is not None else feats_3d.new_ones(len(feats_3d))
        mask_binary, count = query_binary_mean(point_probs, binary_prob, x["batch_index"], b)
        keep = count > 0
        if binary_logit is None:  # no binary head: no base/novel gating
            mask_binary = None
        elif is_base is not None:
            logits = gate_query_logits(logits, mask_binary, is_base.to(torch.bool), self.cfg.binary_2d_thresh)
        pixel = assign_pixels(probs, query_scores(logits), keep)
        point_mask = lookup_points(pixel, x["uv"], x["batch_index"])
        feats_2d, covered, fused = self._fuse(x, feats_3d, point_mask, mask_embed)
        return {
            "feats_3d": feats_3d,
            "feats_2d": feats_2d,
            "covered": covered,
            "feats_fused": fused,
            "binary_logit": binary_logit,
            "point_mask": point_mask,
            "mask_logits": logits,
            "mask_keep": keep,
            "mask_binary": mask_binary,
            "mask_clip": self.clip.mask_embed(x["images"], pred_masks),
            "logit_scale": float(self.classifier.scale),
        }


def build_model(
    preset_or_cfg: str | ModelConfig, text_dim: int, null_init: torch.Tensor | None = None
) -> XMask3D:
    """``XMask3D`` from a preset name (tiny|small|paper) or a ``ModelConfig``."""
    cfg = preset(preset_or_cfg) if isinstance(preset_or_cfg, str) else preset_or_cfg
    return XMask3D(cfg, text_dim, null_init)


def parameter_groups(model: XMask3D, lr_3d: float = 1e-3, lr_other: float = 1e-4) -> list[dict[str, Any]]:
    """AdamW groups as the official trainer: the 3D UNet + binary head at ``lr_3d``, every other
    trainable parameter at ``lr_other``; frozen parameters (requires_grad False) are left out."""
    three_d = {id(p) for m in (model.backbone3d, model.binary_head) if m is not None for p in m.parameters()}
    group_3d, group_other = [], []
    for p in model.parameters():
        if p.requires_grad:
            (group_3d if id(p) in three_d else group_other).append(p)
    return [
        {"name": "3d", "params": group_3d, "lr": lr_3d},
        {"name": "other", "params": group_other, "lr": lr_other},
    ]


def parameter_counts(model: XMask3D) -> dict[str, tuple[int, int]]:
    """Per component (trainable, frozen) parameter counts; works on the meta device too."""
    parts: dict[str, nn.Module] = {"backbone3d": model.backbone3d}
    if model.binary_head is not None:
        parts["binary_head"] = model.binary_head
    parts |= {
        "sd_unet": model.mask_generator.unet,
        "sd_vae": model.mask_generator.vae,
        "mask_generator_head": model.mask_generator,  # minus the frozen SD parts, below
        "classifier": model.classifier,
        "clip_image": model.clip,
    }
    if model.merger is not None:
        parts["fusion"] = model.merger
    seen: set[int] = set()
    counts: dict[str, tuple[int, int]] = {}
    for name, module in parts.items():
        trainable = frozen = 0
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
        counts[name] = (trainable, frozen)
    return counts


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (what the ablation table reports per variant)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summary(name: str) -> str:
    """Parameter counts per component (trainable / frozen) of a preset, as a text table.

    The network is built on the meta device (no memory, no weights). The paper CLIP tower is built
    from its open_clip config dict, because open_clip's ``create_model`` moves models to a real device.
    """
    import open_clip  # heavy: imported only when a CLIP tower is built

    cfg = preset(name)
    if cfg.clip.model_cfg is None:
        model_cfg = open_clip.get_model_config(cfg.clip.model_name)
        cfg = replace(cfg, clip=replace(cfg.clip, model_name="", model_cfg=model_cfg))
    dim = text_dim(cfg.text_encoder)
    with torch.device("meta"):
        model = XMask3D(cfg, dim)
    counts = parameter_counts(model)
    lines = [
        f"preset {name}: text space {cfg.text_encoder} ({dim}-d)",
        f"{'component':<22}{'trainable':>15}{'frozen':>15}",
    ]
    for part, (trainable, frozen) in counts.items():
        lines.append(f"{part:<22}{trainable:>15,}{frozen:>15,}")
    total_t = sum(t for t, _ in counts.values())
    total_f = sum(f for _, f in counts.values())
    lines.append(f"{'total':<22}{total_t:>15,}{total_f:>15,}")
    return "\n".join(lines)
