"""A synthetic collated batch with the keys and dtypes of ``storage.dataset.collate_scenes``.

Random points in a box, voxelised at 2 cm, random pixels, labels and captions: enough to run the
model and its losses without a store.
"""

from __future__ import annotations

import torch


def make_batch(
    views: int = 2,
    points: int = 1500,
    num_base: int = 4,
    text_dim: int = 384,
    image_size: tuple[int, int] = (240, 320),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    coords, feats, inverse, uv, label, offset, sizes = [], [], [], [], [], 0, []
    for b in range(views):
        xyz = torch.rand(points, 3, generator=g) * torch.tensor([1.2, 1.0, 0.6])
        vox, inv = torch.unique(torch.floor(xyz / 0.02).long(), dim=0, return_inverse=True)
        coords.append(torch.cat([torch.full((len(vox), 1), b), vox], 1))
        feats.append(torch.rand(len(vox), 3, generator=g) * 2 - 1)
        inverse.append(inv + offset)
        offset += len(vox)
        # pixels follow x/y so that nearby points share pixels (a crude projection)
        col = (xyz[:, 0] / 1.2 * (w - 20) + 10).long().clamp(0, w - 1)
        row = (xyz[:, 1] / 1.0 * (h - 20) + 10).long().clamp(0, h - 1)
        uv.append(torch.stack([col, row], 1))
        part = (xyz[:, 0] / 1.2 * (num_base + 1)).long().clamp(max=num_base)  # num_base = "novel" strip
        label.append(torch.where(part == num_base, torch.full_like(part, 255), part))
        sizes.append(points)
    label_base = torch.cat(label)
    binary = torch.where(label_base == 255, 0.0, 1.0)
    binary[torch.rand(len(binary), generator=g) < 0.05] = 255.0  # a few ignored points
    label_base[binary == 255] = 255
    return {
        "voxel_coord": torch.cat(coords).int(),
        "voxel_feat": torch.cat(feats),
        "inverse": torch.cat(inverse),
        "offset": torch.cumsum(torch.tensor(sizes), 0),
        "batch_index": torch.repeat_interleave(torch.arange(views), torch.tensor(sizes)),
        "label_base": label_base,
        "binary": binary,
        "uv": torch.cat(uv),
        "image": torch.randint(0, 256, (views, 3, h, w), generator=g, dtype=torch.uint8),
        "caption": torch.nn.functional.normalize(torch.randn(views, text_dim, generator=g), dim=-1),
        "has_caption": torch.tensor([True] * (views - 1) + [False]),
    }
