"""Mask2Former masked-attention transformer decoder with ODISE's pooled mask embedding (spec §3).

Q learnable queries attend, layer by layer, to the pixel decoder levels (strides 32, 16, 8 in turn)
through masked cross-attention (a query only sees pixels where its current mask is on), then to
each other, then an FFN (post-norm, dropout 0). After ``decoder_norm`` every stage (the initial
queries and each layer) predicts mask logits (MLP(query) . mask_features) and a mask embedding in
CLIP space (``PooledMaskEmbed``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xmask3d.network.pixel_decoder import PositionEmbeddingSine


class MLP(nn.Module):
    """Linear layers with ReLU in between (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _xavier(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        _xavier(self)

    def forward(self, tgt, memory, attn_mask, pos, query_pos):
        out = self.attn(tgt + query_pos, memory + pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(tgt + out)


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        _xavier(self)

    def forward(self, tgt, query_pos):
        q = tgt + query_pos
        return self.norm(tgt + self.attn(q, q, tgt, need_weights=False)[0])


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        _xavier(self)

    def forward(self, tgt):
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


def mask_pooling(features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Average of features [B, C, H, W] under each hard mask (logit > 0, no gradient through the
    mask) -> [B, Q, C]; an empty mask pools to 0."""
    if mask_logits.shape[-2:] != features.shape[-2:]:
        mask_logits = F.interpolate(
            mask_logits, size=features.shape[-2:], mode="bilinear", align_corners=False
        )
    with torch.no_grad():
        mask = (mask_logits.detach() > 0).to(features.dtype)
        mask = mask / (mask.sum(dim=(-1, -2), keepdim=True) + 1e-8)
    return torch.einsum("bchw,bqhw->bqc", features, mask)


class PooledMaskEmbed(nn.Module):
    """ODISE mask embedding: LN+Linear(mask-pooled pixel features) + decoder output -> LN+MLP -> CLIP."""

    def __init__(self, hidden_dim: int, embed_dim: int):
        super().__init__()
        self.pool_proj = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim))
        self.mask_embed = nn.Sequential(nn.LayerNorm(hidden_dim), MLP(hidden_dim, hidden_dim, embed_dim, 3))

    def forward(self, decoder_output, mask_features, mask_logits) -> torch.Tensor:
        pooled = self.pool_proj(mask_pooling(mask_features, mask_logits))
        return self.mask_embed(pooled + decoder_output)


class MaskedTransformerDecoder(nn.Module):
    """Queries -> per stage dict(pred_masks [B, Q, H/4, W/4] logits, mask_embed [B, Q, embed_dim])."""

    def __init__(
        self,
        hidden_dim: int = 256,
        embed_dim: int = 768,
        num_queries: int = 50,
        num_layers: int = 9,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        num_levels: int = 3,
    ):
        super().__init__()
        self.num_heads = nheads
        self.num_layers = num_layers
        self.num_levels = num_levels
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2)
        self.cross_layers = nn.ModuleList(CrossAttentionLayer(hidden_dim, nheads) for _ in range(num_layers))
        self.self_layers = nn.ModuleList(SelfAttentionLayer(hidden_dim, nheads) for _ in range(num_layers))
        self.ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.mask_mlp = MLP(hidden_dim, hidden_dim, hidden_dim, 3)
        self.class_embed = PooledMaskEmbed(hidden_dim, embed_dim)

    def _predict(self, output, mask_features, target_size):
        decoder_output = self.decoder_norm(output)
        pred_masks = torch.einsum("bqc,bchw->bqhw", self.mask_mlp(decoder_output), mask_features)
        mask_embed = self.class_embed(decoder_output, mask_features, pred_masks)
        attn = F.interpolate(pred_masks, size=target_size, mode="bilinear", align_corners=False)
        # True = blocked; one copy per head, batch-major as nn.MultiheadAttention expects
        attn = (attn.sigmoid().flatten(2) < 0.5).detach()
        attn = attn.repeat_interleave(self.num_heads, dim=0)
        return {"pred_masks": pred_masks, "mask_embed": mask_embed}, attn

    def forward(self, multi_scale: list[torch.Tensor], mask_features: torch.Tensor) -> list[dict]:
        """multi_scale: [B, hidden, h_l, w_l] coarse to fine; returns 1 + num_layers predictions."""
        if len(multi_scale) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(multi_scale)}")
        b = mask_features.shape[0]
        src, pos, sizes = [], [], []
        for i, x in enumerate(multi_scale):
            sizes.append(x.shape[-2:])
            pos.append(self.pe_layer(x).flatten(2).transpose(1, 2))
            src.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[i][None, None, :])
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)
        pred, attn_mask = self._predict(output, mask_features, sizes[0])
        predictions = [pred]
        for i in range(self.num_layers):
            level = i % self.num_levels
            # a query whose mask is empty at this level attends everywhere
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            output = self.cross_layers[i](output, src[level], attn_mask, pos[level], query_pos)
            output = self.self_layers[i](output, query_pos)
            output = self.ffn_layers[i](output)
            pred, attn_mask = self._predict(output, mask_features, sizes[(i + 1) % self.num_levels])
            predictions.append(pred)
        return predictions
