"""Mask2Former pixel decoder: multi-scale deformable attention encoder + one FPN level, pure PyTorch.

Follows Mask2Former's ``MSDeformAttnPixelDecoder`` (as used by ODISE/XMask3D, spec §3): the three
coarse levels (strides 8, 16, 32) go through a deformable-attention transformer encoder; the
stride-4 level is merged FPN-style and projected to the per-pixel ``mask_features``. The deformable
attention sampling uses ``F.grid_sample`` (the reference "pytorch core" of Deformable DETR), so no
compiled CUDA op is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def c2_xavier_fill(module: nn.Module) -> None:
    """detectron2's ``c2_xavier_fill``: kaiming-uniform (a=1) weights, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class PositionEmbeddingSine(nn.Module):
    """DETR/Mask2Former sine position encoding (normalised to [0, 2*pi])."""

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self._cache: dict[tuple, torch.Tensor] = {}  # the encoding depends on the shape only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] (only its shape/device/dtype are used) -> [B, 2*num_pos_feats, H, W].

        Computed once per input shape and reused (a constant: no parameters, no gradient)."""
        key = (tuple(x.shape), x.device, x.dtype)
        pos = self._cache.get(key)
        if pos is None:
            if len(self._cache) >= 16:
                self._cache.clear()
            pos = self._cache[key] = self._encode(x)
        return pos

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ones = torch.ones(b, h, w, device=x.device, dtype=torch.float32)
        y_embed = ones.cumsum(1)
        x_embed = ones.cumsum(2)
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention by bilinear sampling.

    value [B, S, M, D] (S = sum of H*W over levels, M heads), sampling_locations
    [B, Lq, M, L, P, 2] in [0, 1] as (x, y), attention_weights [B, Lq, M, L, P] -> [B, Lq, M*D].
    Sampling is bilinear with zero padding and ``align_corners=False`` (pixel centres at
    (i + 0.5) / size), as the CUDA kernel of Deformable DETR.
    """
    b, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        # [B, H*W, M, D] -> [B*M, D, H, W]
        v = values[lvl].flatten(2).transpose(1, 2).reshape(b * m, d, h, w)
        # [B, Lq, M, P, 2] -> [B*M, Lq, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B*M, 1, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, lq, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [B*M, D, Lq]
    return out.view(b, m * d, lq).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Deformable DETR multi-scale deformable attention (queries sample n_points per head and level)."""

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """query [B, Lq, C], reference_points [B, Lq, L, 2] in [0, 1], input_flatten [B, S, C]."""
        b, lq, _ = query.shape
        s = input_flatten.shape[1]
        value = self.value_proj(input_flatten).view(b, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(b, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(b, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(b, lq, self.n_heads, self.n_levels, self.n_points)
        # offsets are in pixels of each level: normalise by (W, H)
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        locations = (
            reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        )
        return self.output_proj(ms_deform_attn(value, spatial_shapes, locations, weights))


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention + FFN (dropout 0 as the official configs)."""

    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes):
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


def reference_points(spatial_shapes: list[tuple[int, int]], batch: int, device, dtype) -> torch.Tensor:
    """Pixel centres of every level, normalised to [0, 1], repeated per level: [B, S, L, 2] (x, y)."""
    refs = []
    for h, w in spatial_shapes:
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device),
            indexing="ij",
        )
        refs.append(torch.stack((xs.reshape(-1) / w, ys.reshape(-1) / h), -1))
    ref = torch.cat(refs, 0)[None, :, None, :]  # no padding: valid ratios are 1
    return ref.expand(batch, -1, len(spatial_shapes), -1)


class MSDeformAttnPixelDecoder(nn.Module):
    """Features {4, 8, 16, 32: [B, C_in, H/s, W/s]} -> (mask_features [B, D, H/4, W/4],
    multi_scale [stride 32, 16, 8] each [B, D, h, w])."""

    def __init__(
        self,
        in_channels: int,
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_layers: int = 6,
        n_heads: int = 8,
        n_points: int = 4,
        dim_feedforward: int = 1024,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.transformer_strides = (32, 16, 8)  # coarse to fine, as Mask2Former
        n_levels = len(self.transformer_strides)
        self.input_proj = nn.ModuleList()
        for _ in self.transformer_strides:
            conv = nn.Conv2d(in_channels, conv_dim, kernel_size=1)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
            self.input_proj.append(nn.Sequential(conv, nn.GroupNorm(norm_groups, conv_dim)))
        self.level_embed = nn.Parameter(torch.empty(n_levels, conv_dim))
        nn.init.normal_(self.level_embed)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(conv_dim, dim_feedforward, n_levels, n_heads, n_points)
            for _ in range(num_layers)
        )
        # as Mask2Former: xavier on every encoder matrix, then the deformable-attention init
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.layers:
            layer.self_attn._reset_parameters()
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2)
        # one FPN level for stride 4
        lateral = nn.Conv2d(in_channels, conv_dim, kernel_size=1, bias=False)
        output = nn.Conv2d(conv_dim, conv_dim, kernel_size=3, padding=1, bias=False)
        c2_xavier_fill(lateral)
        c2_xavier_fill(output)
        self.lateral_conv = nn.Sequential(lateral, nn.GroupNorm(norm_groups, conv_dim))
        self.output_conv = nn.Sequential(output, nn.GroupNorm(norm_groups, conv_dim), nn.ReLU())
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)

    def forward(self, features: dict[int, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        srcs, pos, shapes = [], [], []
        for proj, stride in zip(self.input_proj, self.transformer_strides, strict=True):
            x = proj(features[stride])
            shapes.append((x.shape[2], x.shape[3]))
            pos.append(self.pe_layer(x).flatten(2).transpose(1, 2))
            srcs.append(x.flatten(2).transpose(1, 2))
        b = srcs[0].shape[0]
        pos_flat = torch.cat([p + self.level_embed[i].view(1, 1, -1) for i, p in enumerate(pos)], 1)
        src = torch.cat(srcs, 1)
        refs = reference_points(shapes, b, src.device, src.dtype)
        for layer in self.layers:
            src = layer(src, pos_flat, refs, shapes)
        outs = []
        for chunk, (h, w) in zip(src.split([h * w for h, w in shapes], dim=1), shapes, strict=True):
            outs.append(chunk.transpose(1, 2).reshape(b, -1, h, w))
        fine = self.lateral_conv(features[4])
        fine = fine + F.interpolate(outs[-1], size=fine.shape[-2:], mode="bilinear", align_corners=False)
        fine = self.output_conv(fine)
        return self.mask_features(fine), outs
