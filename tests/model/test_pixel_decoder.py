"""Multi-scale deformable attention against brute-force references; pixel and transformer decoders."""

import torch

from xmask3d.network.pixel_decoder import (
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    ms_deform_attn,
    reference_points,
)
from xmask3d.network.transformer_decoder import MaskedTransformerDecoder, mask_pooling


def _bilinear(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """img [D, H, W]; (x, y) in [0, 1] with pixel centres at (i + 0.5) / size; zeros outside."""
    _, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    out = torch.zeros(img.shape[0], dtype=img.dtype)
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        wgt = (1 - abs(px - xi)) * (1 - abs(py - yi))
        if 0 <= xi < w and 0 <= yi < h:
            out += wgt * img[:, yi, xi]
    return out


def test_ms_deform_attn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    b, m, d, lq, p = 2, 2, 3, 4, 2
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, m, d, generator=g, dtype=torch.float64)
    # include points outside [0, 1] to exercise the zero padding
    loc = torch.rand(b, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(b, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    out = ms_deform_attn(value, shapes, loc, weights)
    assert out.shape == (b, lq, m * d)

    levels = value.split([h * w for h, w in shapes], dim=1)
    ref = torch.zeros(b, lq, m, d, dtype=torch.float64)
    for bi in range(b):
        for qi in range(lq):
            for hi in range(m):
                for li, (h, w) in enumerate(shapes):
                    img = levels[li][bi, :, hi].T.reshape(d, h, w)
                    for pi in range(p):
                        x, y = loc[bi, qi, hi, li, pi].tolist()
                        ref[bi, qi, hi] += weights[bi, qi, hi, li, pi] * _bilinear(img, x, y)
    torch.testing.assert_close(out, ref.reshape(b, lq, m * d))


def test_single_point_at_zero_offset_is_a_lookup_of_the_reference_pixel():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1)
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()  # sample exactly at the reference point
    shapes = [(3, 4)]
    src = torch.randn(1, 12, 8)
    refs = reference_points(shapes, 1, src.device, src.dtype)
    out = attn(src, refs, src, shapes)
    # one point per head with weight softmax([w]) = 1, at a pixel centre: the pixel's own value
    expected = attn.output_proj(attn.value_proj(src))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_default_offsets_are_the_deformable_detr_grid():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 looks right (+x), at 1, 2, 3 pixels; head 1 looks down (+y)
    torch.testing.assert_close(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(bias[1, 1, :, 1], torch.tensor([1.0, 2.0, 3.0]), atol=1e-6, rtol=0)
    assert torch.all(attn.attention_weights.weight == 0)


def test_pixel_decoder_shapes_and_levels():
    torch.manual_seed(0)
    dec = MSDeformAttnPixelDecoder(
        in_channels=12, conv_dim=16, mask_dim=16, num_layers=2, n_heads=4, dim_feedforward=32, norm_groups=4
    )
    feats = {s: torch.randn(2, 12, 64 // s, 48 // s) for s in (4, 8, 16, 32)}
    mask_features, multi = dec(feats)
    assert mask_features.shape == (2, 16, 16, 12)
    assert [tuple(x.shape) for x in multi] == [(2, 16, 2, 1), (2, 16, 4, 3), (2, 16, 8, 6)]
    # the stride-32 input reaches the stride-4 output (through the encoder and the FPN)
    feats2 = dict(feats)
    feats2[32] = feats[32] + 1.0
    assert not torch.allclose(dec(feats2)[0], mask_features)


def test_mask_pooling_is_a_hard_average():
    feats = torch.arange(8.0).view(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    logits = torch.tensor([[[[5.0, -5.0], [5.0, -5.0]], [[-5.0, -5.0], [-5.0, -5.0]]]])
    pooled = mask_pooling(feats, logits)
    torch.testing.assert_close(pooled[0, 0], torch.tensor([1.0, 5.0]))  # mean of pixels 0 and 2
    torch.testing.assert_close(pooled[0, 1], torch.zeros(2))  # empty mask


def test_transformer_decoder_predicts_every_stage():
    torch.manual_seed(0)
    dec = MaskedTransformerDecoder(
        hidden_dim=16, embed_dim=10, num_queries=5, num_layers=4, nheads=2, dim_feedforward=32
    )
    multi = [torch.randn(2, 16, 2, 2), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 8, 8)]
    mask_features = torch.randn(2, 16, 16, 16)
    preds = dec(multi, mask_features)
    assert len(preds) == 5
    for p in preds:
        assert p["pred_masks"].shape == (2, 5, 16, 16)
        assert p["mask_embed"].shape == (2, 5, 10)
    # the initial prediction depends only on the learned queries, later ones on the features
    multi2 = [x + 1 for x in multi]
    preds2 = dec(multi2, mask_features)
    torch.testing.assert_close(preds2[0]["pred_masks"], preds[0]["pred_masks"])
    assert not torch.allclose(preds2[1]["pred_masks"], preds[1]["pred_masks"])
