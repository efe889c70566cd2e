"""Artifacts people look at: per-class IoU bar chart, confusion matrix, IoU table, coloured PLY.

Matplotlib runs on the Agg backend (no display). PLY files are binary little-endian, written
with plyfile, one vertex per point with x,y,z and red,green,blue (any viewer: MeshLab,
CloudCompare, Open3D). Ignored points are grey.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from plyfile import PlyData, PlyElement  # noqa: E402

IGNORE_COLOR = (128, 128, 128)


def class_palette(num_classes: int) -> np.ndarray:
    """A fixed uint8 [T,3] colour per class (tab20, then hsv for long class lists)."""
    cmap = plt.get_cmap("tab20") if num_classes <= 20 else plt.get_cmap("hsv", num_classes)
    colors = [cmap(i % 20 if num_classes <= 20 else i)[:3] for i in range(num_classes)]
    return (np.asarray(colors) * 255).round().astype(np.uint8)


def colorize(labels: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """uint8 [N,3] colours for labels in 0..T-1; ignore (or out of range) -> grey."""
    labels = np.asarray(labels).astype(np.int64)
    out = np.tile(np.asarray(IGNORE_COLOR, dtype=np.uint8), (labels.size, 1))
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    out[valid] = class_palette(num_classes)[labels[valid]]
    return out


def write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> Path:
    """Binary PLY point cloud with per-vertex colour."""
    xyz = np.asarray(xyz, dtype=np.float32)
    rgb = np.asarray(rgb, dtype=np.uint8)
    vertex = np.empty(len(xyz), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"),
                                        ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    vertex["x"], vertex["y"], vertex["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    vertex["red"], vertex["green"], vertex["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(vertex, "vertex")], byte_order="<").write(str(path))
    return path


def write_prediction_plys(out_dir: Path, scene_id: str, xyz: np.ndarray, pred: np.ndarray, gt: np.ndarray,
                          num_classes: int) -> list[Path]:
    """`<scene>_pred.ply` and `<scene>_gt.ply` with the same class colours."""
    return [write_ply(out_dir / f"{scene_id}_pred.ply", xyz, colorize(pred, num_classes)),
            write_ply(out_dir / f"{scene_id}_gt.ply", xyz, colorize(gt, num_classes))]


def iou_bar_chart(path: Path, class_names: Sequence[str], ious: Mapping[str, np.ndarray],
                  novel_indices: Sequence[int], title: str) -> Path:
    """Grouped bars: per-class IoU (%) for each head; novel class names in red."""
    names = list(class_names)
    x = np.arange(len(names))
    width = 0.8 / max(1, len(ious))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.0))
    for i, (head, values) in enumerate(ious.items()):
        ax.bar(x + (i - (len(ious) - 1) / 2) * width, np.nan_to_num(np.asarray(values) * 100), width,
               label=head)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    for index in novel_indices:
        ax.get_xticklabels()[index].set_color("tab:red")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{title} (novel classes in red)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_matrix_png(path: Path, matrix: np.ndarray, class_names: Sequence[str], title: str) -> Path:
    """Row-normalised confusion matrix (rows = ground truth)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = max(5.0, 0.35 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(100 * norm, cmap="viridis", vmin=0, vmax=100)  # percent, as every reported score
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90, fontsize=7)
    ax.set_yticks(ticks, class_names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="% of the ground-truth class's points")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def iou_markdown_table(class_names: Sequence[str], ious: Mapping[str, np.ndarray],
                       novel_indices: Sequence[int]) -> str:
    """Markdown table: one row per class (base/novel), one IoU (%) column per head."""
    novel = set(int(i) for i in novel_indices)
    heads = list(ious)
    lines = ["| class | split | " + " | ".join(heads) + " |", "|---|---|" + "---:|" * len(heads)]
    for i, name in enumerate(class_names):
        cells = []
        for head in heads:
            value = float(np.asarray(ious[head])[i])
            cells.append("–" if np.isnan(value) else f"{100 * value:.1f}")
        lines.append(f"| {name} | {'novel' if i in novel else 'base'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
