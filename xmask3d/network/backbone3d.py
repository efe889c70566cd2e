"""3D branch: spconv sparse residual UNets (MinkUNet34C / MinkUNet18A layouts) and their heads.

The official code uses MinkowskiEngine; spconv has wheels for CPU and CUDA, so the same network
is written with spconv here (XMASK3D_SPEC.md §2):

- ``conv0``: 5³ conv, stride 1 (a submanifold conv, as ME's stride-1 conv keeps the sites);
- four encoder stages: 2³ stride-2 ``SparseConv3d`` + BN + ReLU, then residual ``BasicBlock`` s;
- four decoder stages: 2³ ``SparseInverseConv3d`` back to the sites of the matching encoder
  stage, BN + ReLU, concatenation with the skip, then blocks;
- a final 1×1 conv (no bias) to ``out_channels``.

``Backbone3D`` adds the per-point projection to the text dimension and the global 3D vector
(max over each sample's bottleneck voxels of a projection of the bottleneck features);
``BinaryHead`` is the smaller UNet + BN1d + ReLU + Linear(·→1) base-vs-novel logit.

On CPU every conv must use ``ConvAlgo.Native`` (the implicit-GEMM kernels are CUDA only);
``conv_algo`` decides that once, when the network is built. spconv 2.3.8 runs the Native
backward on CPU without patches (checked by tests/model/test_backbone3d.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import spconv.pytorch as spconv
import torch
from torch import nn


@dataclass
class Backbone3DConfig:
    """Sizes of the 3D UNet (MinkUNet34C) and of the binary-head UNet (MinkUNet18A)."""

    init_dim: int = 32
    planes: tuple[int, ...] = (32, 64, 128, 256, 256, 128, 96, 96)
    blocks: tuple[int, ...] = (2, 3, 4, 6, 2, 2, 2, 2)
    binary_planes: tuple[int, ...] = (32, 64, 128, 256, 128, 128, 96, 96)
    binary_blocks: tuple[int, ...] = (2, 2, 2, 2, 2, 2, 2, 2)
    out_channels: int = 256
    in_channels: int = 3
    conv0_kernel: int = 5
    bn_momentum: float = 0.1
    # "auto": Native without CUDA, spconv's default (implicit GEMM) with CUDA.
    algo: str = "auto"
    # conv0 (5³ = 125 offsets) with spconv's large-kernel implicit GEMM (``large_kernel_fast_algo``:
    # kernel volume <= 128 instead of <= 32, compiled through NVRTC at first use) where spconv picks
    # the algorithm (CUDA); off: Native gather-GEMM-scatter, as before. Weights are the same layout
    # either way. Speed unmeasured (docs/benchmarks.md); CPU always runs Native.
    conv0_large_kernel_fast: bool = False

    def __post_init__(self) -> None:
        for name in ("planes", "blocks", "binary_planes", "binary_blocks"):
            value = tuple(getattr(self, name))
            if len(value) != 8:
                raise ValueError(
                    f"Backbone3DConfig.{name} needs 8 entries (4 encoder + 4 decoder), got {value}"
                )
            setattr(self, name, value)
        if self.algo not in ("auto", "native", "default"):
            raise ValueError(f"Backbone3DConfig.algo must be auto|native|default, got {self.algo!r}")


def conv_algo(setting: str = "auto", device: torch.device | str | None = None) -> spconv.ConvAlgo | None:
    """The spconv algorithm for every conv: ``Native`` on CPU, spconv's default with CUDA."""
    if setting == "native":
        return spconv.ConvAlgo.Native
    if setting == "default":
        return None
    if device is not None:
        on_cuda = torch.device(device).type == "cuda"
    else:
        on_cuda = torch.cuda.is_available()
    return None if on_cuda else spconv.ConvAlgo.Native


def _bn(channels: int, momentum: float) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, momentum=momentum)


class BasicBlock(spconv.SparseModule):
    """ME BasicBlock: 3³ conv-BN-ReLU-3³ conv-BN, plus the (projected) input, then ReLU."""

    def __init__(self, cin: int, cout: int, key: str, momentum: float, algo: spconv.ConvAlgo | None):
        super().__init__()
        self.conv1 = spconv.SubMConv3d(cin, cout, 3, bias=False, indice_key=key, algo=algo)
        self.bn1 = _bn(cout, momentum)
        self.conv2 = spconv.SubMConv3d(cout, cout, 3, bias=False, indice_key=key, algo=algo)
        self.bn2 = _bn(cout, momentum)
        self.project = None
        if cin != cout:  # ME's downsample = 1x1 conv + BN
            self.project = nn.Sequential(nn.Linear(cin, cout, bias=False), _bn(cout, momentum))

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        identity = x.features if self.project is None else self.project(x.features)
        out = self.conv1(x)
        out = out.replace_feature(torch.relu(self.bn1(out.features)))
        out = self.conv2(out)
        return out.replace_feature(torch.relu(self.bn2(out.features) + identity))


class SparseUNet(nn.Module):
    """Residual sparse UNet; returns (bottleneck tensor at stride 16, final features at stride 1)."""

    def __init__(
        self,
        in_channels: int,
        planes: tuple[int, ...],
        blocks: tuple[int, ...],
        init_dim: int,
        out_channels: int,
        conv0_kernel: int = 5,
        momentum: float = 0.1,
        algo: spconv.ConvAlgo | None = None,
        conv0_large_kernel_fast: bool = False,
    ):
        super().__init__()
        self.conv0 = spconv.SubMConv3d(
            in_channels, init_dim, conv0_kernel, bias=False, indice_key="conv0", algo=algo,
            large_kernel_fast_algo=conv0_large_kernel_fast,
        )
        self.bn0 = _bn(init_dim, momentum)
        self.down = nn.ModuleList()
        self.down_bn = nn.ModuleList()
        self.enc = nn.ModuleList()
        skips = [init_dim]
        cin = init_dim
        for level in range(4):
            down_out = cin  # ME: the stride-2 convs keep the width (conv1p1s2: init_dim -> init_dim)
            self.down.append(
                spconv.SparseConv3d(
                    cin, down_out, 2, stride=2, bias=False, indice_key=f"down{level}", algo=algo
                )
            )
            self.down_bn.append(_bn(down_out, momentum))
            cin = down_out
            stage = []
            for _ in range(blocks[level]):
                stage.append(BasicBlock(cin, planes[level], f"subm{level + 1}", momentum, algo))
                cin = planes[level]
            self.enc.append(spconv.SparseSequential(*stage))
            skips.append(cin)
        self.bottleneck_channels = cin
        self.up = nn.ModuleList()
        self.up_bn = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i, level in enumerate(range(3, -1, -1)):
            up_out = planes[4 + i]
            self.up.append(
                spconv.SparseInverseConv3d(cin, up_out, 2, indice_key=f"down{level}", bias=False, algo=algo)
            )
            self.up_bn.append(_bn(up_out, momentum))
            cin = up_out + skips[level]
            stage = []
            key = f"subm{level}"  # the sites of stride 2**level (conv0's k5 pairs are not reusable)
            for _ in range(blocks[4 + i]):
                stage.append(BasicBlock(cin, planes[4 + i], key, momentum, algo))
                cin = planes[4 + i]
            self.dec.append(spconv.SparseSequential(*stage))
        self.final = nn.Linear(cin, out_channels, bias=False)  # the 1x1 conv
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, ReLU) on regular convs; transposed convs keep spconv's default."""
        for module in self.modules():
            if isinstance(module, (spconv.SubMConv3d, spconv.SparseConv3d)):
                kernel_volume = math.prod(module.kernel_size)
                std = math.sqrt(2.0 / (module.out_channels * kernel_volume))
                with torch.no_grad():
                    module.weight.normal_(0.0, std)
            elif isinstance(module, nn.BatchNorm1d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.final.weight.normal_(0.0, math.sqrt(2.0 / self.final.out_features))

    def forward(self, x: spconv.SparseConvTensor) -> tuple[spconv.SparseConvTensor, torch.Tensor]:
        out = self.conv0(x)
        out = out.replace_feature(torch.relu(self.bn0(out.features)))
        skips = [out]
        for down, bn, stage in zip(self.down, self.down_bn, self.enc, strict=True):
            out = down(out)
            out = out.replace_feature(torch.relu(bn(out.features)))
            out = stage(out)
            skips.append(out)
        bottleneck = out
        for i, (up, bn, stage) in enumerate(zip(self.up, self.up_bn, self.dec, strict=True)):
            out = up(out)
            # The inverse conv restores the sites (and order) of the matching encoder input.
            skip = skips[3 - i]
            out = out.replace_feature(torch.cat([torch.relu(bn(out.features)), skip.features], dim=1))
            out = stage(out)
        return bottleneck, self.final(out.features)


def sparse_input(
    voxel_coord: torch.Tensor, voxel_feat: torch.Tensor, batch_size: int
) -> spconv.SparseConvTensor:
    """Wrap (batch, x, y, z) int32 voxel coordinates and their features as an spconv tensor.

    Coordinates are shifted by their minimum rounded down to a multiple of 16, so negative
    coordinates work and the stride-2 grid alignment of the input is kept; the spatial shape is
    padded to a multiple of 16 so no voxel falls off a stride-2 level.
    """
    if voxel_coord.ndim != 2 or voxel_coord.shape[1] != 4:
        raise ValueError(f"voxel_coord must be [V,4] (batch, x, y, z), got {tuple(voxel_coord.shape)}")
    coords = voxel_coord.to(torch.int32)
    xyz = coords[:, 1:]
    if len(xyz):
        low = torch.div(xyz.min(0).values, 16, rounding_mode="floor") * 16
        xyz = xyz - low
        # spconv needs the grid's spatial shape on the host: one read of the 3 extents
        high = (xyz.max(0).values + 1).tolist()
        shape = [int(math.ceil(h / 16) * 16) for h in high]
    else:
        shape = [16, 16, 16]
    indices = torch.cat([coords[:, :1], xyz], dim=1).contiguous()
    return spconv.SparseConvTensor(voxel_feat, indices, shape, batch_size)


class Backbone3D(nn.Module):
    """MinkUNet34C-like UNet + per-point projection to the text space + global 3D vector."""

    def __init__(self, cfg: Backbone3DConfig, text_dim: int):
        super().__init__()
        algo = conv_algo(cfg.algo)
        self.unet = SparseUNet(
            cfg.in_channels,
            cfg.planes,
            cfg.blocks,
            cfg.init_dim,
            cfg.out_channels,
            cfg.conv0_kernel,
            cfg.bn_momentum,
            algo,
            cfg.conv0_large_kernel_fast,
        )
        self.head = nn.Linear(cfg.out_channels, text_dim)  # PC_Processor: final -> text dim
        self.implicit = nn.Linear(self.unet.bottleneck_channels, text_dim)  # bottleneck -> text dim

    def forward(
        self, voxel_coord: torch.Tensor, voxel_feat: torch.Tensor, inverse: torch.Tensor, batch_size: int
    ) -> dict[str, torch.Tensor]:
        """-> point_feat [N, text_dim] (per point via ``inverse``), global_3d [B, text_dim]."""
        return self.forward_sparse(sparse_input(voxel_coord, voxel_feat, batch_size), inverse)

    def forward_sparse(self, x: spconv.SparseConvTensor, inverse: torch.Tensor) -> dict[str, torch.Tensor]:
        """``forward`` on an input already wrapped by :func:`sparse_input` (shared with the binary head)."""
        batch_size = x.batch_size
        bottleneck, final = self.unet(x)
        point_feat = self.head(final)[inverse]
        implicit = self.implicit(bottleneck.features)
        sample = bottleneck.indices[:, 0].long()
        global_3d = implicit.new_full((batch_size, implicit.shape[1]), float("-inf"))
        global_3d = global_3d.scatter_reduce(
            0, sample[:, None].expand_as(implicit), implicit, "amax", include_self=False
        )
        return {"point_feat": point_feat, "global_3d": global_3d}


class BinaryHead(nn.Module):
    """MinkUNet18A-like UNet -> BN1d -> ReLU -> Linear(·→1): per-point base (1) vs novel (0) logit."""

    def __init__(self, cfg: Backbone3DConfig):
        super().__init__()
        algo = conv_algo(cfg.algo)
        self.unet = SparseUNet(
            cfg.in_channels,
            cfg.binary_planes,
            cfg.binary_blocks,
            cfg.init_dim,
            cfg.out_channels,
            cfg.conv0_kernel,
            cfg.bn_momentum,
            algo,
            cfg.conv0_large_kernel_fast,
        )
        self.head = nn.Sequential(
            _bn(cfg.out_channels, cfg.bn_momentum), nn.ReLU(), nn.Linear(cfg.out_channels, 1)
        )

    def forward(
        self, voxel_coord: torch.Tensor, voxel_feat: torch.Tensor, inverse: torch.Tensor, batch_size: int
    ) -> torch.Tensor:
        """-> binary logit per point [N]."""
        return self.forward_sparse(sparse_input(voxel_coord, voxel_feat, batch_size), inverse)

    def forward_sparse(self, x: spconv.SparseConvTensor, inverse: torch.Tensor) -> torch.Tensor:
        """``forward`` on an input already wrapped by :func:`sparse_input`."""
        _, final = self.unet(x)
        return self.head(final)[:, 0][inverse]
