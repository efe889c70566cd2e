"""3D branch: spconv convs against dense torch convs, UNet shapes, global max-pool, gradients."""

import pytest
import spconv.pytorch as spconv
import torch
import torch.nn.functional as F

from xmask3d.network.backbone3d import Backbone3D, BinaryHead, SparseUNet, conv_algo, sparse_input
from xmask3d.network.config import preset


def random_sites(count: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(size**3, generator=g)[:count]
    return torch.stack([flat // (size * size), (flat // size) % size, flat % size], 1)


def torch_weight(conv: spconv.SubMConv3d) -> torch.Tensor:
    """spconv stores [out, kx, ky, kz, in]; torch wants [out, in, kx, ky, kz]."""
    return conv.weight.permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize("kernel", [3, 5])
def test_subm_conv_matches_dense_conv3d_at_active_sites(kernel):
    torch.manual_seed(0)
    size = 9
    xyz = random_sites(120, size, seed=1)
    feats = torch.randn(len(xyz), 4)
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1).int()
    conv = spconv.SubMConv3d(4, 6, kernel, bias=False, algo=spconv.ConvAlgo.Native)
    out = conv(spconv.SparseConvTensor(feats, coords, [size] * 3, 1))
    dense = torch.zeros(1, 4, size, size, size)
    dense[0, :, xyz[:, 0], xyz[:, 1], xyz[:, 2]] = feats.T
    ref = F.conv3d(dense, torch_weight(conv), padding=kernel // 2)
    got = out.features[torch.argsort(_key(out.indices))]
    want = ref[0, :, xyz[:, 0], xyz[:, 1], xyz[:, 2]].T[torch.argsort(_key(coords))]
    assert torch.allclose(got, want, atol=1e-5)
    # submanifold: exactly the input sites come out
    assert torch.equal(torch.sort(_key(out.indices)).values, torch.sort(_key(coords)).values)


def test_strided_conv_matches_dense_conv3d():
    torch.manual_seed(0)
    size = 8
    xyz = random_sites(80, size, seed=2)
    feats = torch.randn(len(xyz), 3)
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1).int()
    conv = spconv.SparseConv3d(3, 5, 2, stride=2, bias=False, algo=spconv.ConvAlgo.Native)
    out = conv(spconv.SparseConvTensor(feats, coords, [size] * 3, 1))
    dense = torch.zeros(1, 3, size, size, size)
    dense[0, :, xyz[:, 0], xyz[:, 1], xyz[:, 2]] = feats.T
    ref = F.conv3d(dense, torch_weight(conv), stride=2)
    site = out.indices[:, 1:].long()
    assert len(site) == len(torch.unique(torch.div(xyz, 2, rounding_mode="floor"), dim=0))
    assert torch.allclose(out.features, ref[0, :, site[:, 0], site[:, 1], site[:, 2]].T, atol=1e-5)


def _key(indices: torch.Tensor) -> torch.Tensor:
    i = indices.long()
    return ((i[:, 0] * 1000 + i[:, 1]) * 1000 + i[:, 2]) * 1000 + i[:, 3]


def test_conv_algo_is_native_without_cuda():
    assert conv_algo("auto", "cpu") == spconv.ConvAlgo.Native
    assert conv_algo("auto", "cuda") is None
    assert conv_algo("native", "cuda") == spconv.ConvAlgo.Native


def voxel_batch(sizes=(300, 200), seed=0):
    g = torch.Generator().manual_seed(seed)
    coords, feats, inverse, offset = [], [], [], 0
    for b, n in enumerate(sizes):
        pts = torch.rand(n, 3, generator=g) * torch.tensor([0.8, 0.8, 0.4])
        vox, inv = torch.unique(torch.floor(pts / 0.02).long(), dim=0, return_inverse=True)
        coords.append(torch.cat([torch.full((len(vox), 1), b), vox], 1))
        feats.append(torch.rand(len(vox), 3, generator=g) * 2 - 1)
        inverse.append(inv + offset)
        offset += len(vox)
    return torch.cat(coords).int(), torch.cat(feats), torch.cat(inverse)


def test_paper_unet_layout_matches_minkunet34c():
    cfg = preset("paper").backbone
    unet = SparseUNet(3, cfg.planes, cfg.blocks, cfg.init_dim, cfg.out_channels)
    assert [len(stage) for stage in unet.enc] == [2, 3, 4, 6]
    assert [len(stage) for stage in unet.dec] == [2, 2, 2, 2]
    assert unet.bottleneck_channels == 256
    # MinkUNet34C has 37.8M parameters (ME, out 256 with a bias-free final conv)
    assert 37_000_000 < sum(p.numel() for p in unet.parameters()) < 38_500_000


def test_backbone_shapes_global_max_and_sample_independence():
    torch.manual_seed(0)
    cfg = preset("tiny").backbone
    model = Backbone3D(cfg, text_dim=16).eval()
    coords, feats, inverse = voxel_batch()
    out = model(coords, feats, inverse, batch_size=2)
    assert out["point_feat"].shape == (500, 16)
    assert out["global_3d"].shape == (2, 16)
    assert torch.isfinite(out["global_3d"]).all()
    # global vector = max over the sample's bottleneck voxels: sample 0 alone gives the same
    first = coords[:, 0] == 0
    alone = model(coords[first], feats[first], inverse[:300], batch_size=1)
    assert torch.allclose(alone["global_3d"][0], out["global_3d"][0], atol=1e-5)
    assert torch.allclose(alone["point_feat"], out["point_feat"][:300], atol=1e-5)


def test_sparse_input_handles_negative_coordinates_and_pads_shape():
    coords = torch.tensor([[0, -5, 3, 40], [0, 7, 0, 0]], dtype=torch.int32)
    x = sparse_input(coords, torch.zeros(2, 3), 1)
    assert all(s % 16 == 0 for s in x.spatial_shape)
    assert (x.indices[:, 1:] >= 0).all()
    # shifted by a multiple of 16, so the stride-2 parity is kept
    assert ((x.indices[:, 1:] - coords[:, 1:]) % 16 == 0).all()


def test_backward_reaches_every_parameter_on_cpu():
    torch.manual_seed(0)
    cfg = preset("tiny").backbone
    model, binary = Backbone3D(cfg, text_dim=8), BinaryHead(cfg)
    coords, feats, inverse = voxel_batch()
    out = model(coords, feats, inverse, batch_size=2)
    logit = binary(coords, feats, inverse, batch_size=2)
    assert logit.shape == (500,)
    (out["point_feat"].square().mean() + out["global_3d"].sum() + logit.square().mean()).backward()
    for name, p in list(model.named_parameters()) + list(binary.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_conv0_large_kernel_switch_reaches_spconv():
    """Where spconv chooses the algorithm, the switch moves the 5³ conv0 (125 offsets, above the
    implicit-GEMM limit of 32) to the implicit GEMM; the other convs and the weights' layout stay."""
    plain = SparseUNet(3, (8,) * 8, (1,) * 8, 8, 8, algo=None)
    fast = SparseUNet(3, (8,) * 8, (1,) * 8, 8, 8, algo=None, conv0_large_kernel_fast=True)
    assert plain.conv0.algo == spconv.ConvAlgo.Native
    assert fast.conv0.algo == spconv.ConvAlgo.MaskImplicitGemm
    assert fast.enc[0][0].conv1.algo == plain.enc[0][0].conv1.algo
    assert fast.conv0.weight.shape == plain.conv0.weight.shape
    assert fast.state_dict().keys() == plain.state_dict().keys()
