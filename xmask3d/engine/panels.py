"""Qualitative panels: a view's image, ground truth and each head's prediction side by side.

- :func:`view_panel`: one PNG per view, a 3×2 grid of tiles at the view's pixel grid (upscaled
  by an integer factor): the view image, ground truth, a shared class legend, and the 3D / 2D /
  fused predictions. Labels are per point; a view's visible points and their pixels come from the
  store's CSR correspondences (``Scene.view``), and each point is splatted as a small disc over a
  dimmed grey copy of the image. Novel classes are marked ``★ … (novel)`` in the legend. Each
  prediction tile reports its accuracy on the view's labelled points.
- :func:`topdown_panel`: the whole scene seen from above, ground truth next to each head.
- :func:`scene_panels`: both, for a few evenly spaced views of a scene, as PNG bytes by file name;
  evaluation logs them as MLflow artifacts (``evaluation/panels/``) and ``xmask3d render`` writes
  them on demand.

Matplotlib on the Agg backend (no display). The tiles are placed at exact pixel positions
(:class:`PanelLayout`), so view pixel (u, v) is PNG pixel ``layout.pixel(tile, u, v)``.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from mlflow import MlflowClient
from scipy import ndimage

from storage.benchmarks import get_benchmark
from storage.dataset import scene_labels
from storage.errors import InputError
from storage.objects import as_path
from storage.store import open_store
from xmask3d.engine import tracking
from xmask3d.engine.plots import class_palette
from xmask3d.engine.predict import load_model_for_inference, predict_scene
from xmask3d.engine.tracking import resolve_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
from matplotlib.patches import Patch  # noqa: E402

HEAD_TITLES = {"3d": "3D head", "2d": "2D head", "fused": "fused head"}
TILES = ("image", "gt", "legend", "3d", "2d", "fused")  # row-major 3×2 grid
TITLE_PX = 28  # height of the title row above each tile
HEADER_PX = 36  # figure title
MARGIN_PX = 8
DPI = 100
TARGET_TILE_WIDTH = 480  # views are upscaled by an integer factor towards this width
# Ignored / unlabelled points: black (the palette's own grey would read as a class).
IGNORE_COLOR = (0, 0, 0)
TOPDOWN_PX = 420  # longer side of the top-down raster


@dataclass(frozen=True)
class PanelLayout:
    """Pixel geometry of a view panel: tile origins (x, y) of the upscaled view in the PNG."""

    width: int
    height: int
    scale: int
    origins: dict[str, tuple[int, int]]

    def pixel(self, tile: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """PNG (column, row) of the centre of view pixel (u, v) in ``tile``."""
        x0, y0 = self.origins[tile]
        half = self.scale // 2
        return x0 + np.asarray(u) * self.scale + half, y0 + np.asarray(v) * self.scale + half


def panel_layout(view_width: int, view_height: int) -> PanelLayout:
    scale = max(1, round(TARGET_TILE_WIDTH / view_width))
    tw, th = view_width * scale, view_height * scale
    cell_w, cell_h = tw + 2 * MARGIN_PX, th + TITLE_PX + MARGIN_PX
    origins = {}
    for i, tile in enumerate(TILES):
        col, row = i % 3, i // 3
        origins[tile] = (col * cell_w + MARGIN_PX, HEADER_PX + row * cell_h + TITLE_PX)
    return PanelLayout(3 * cell_w, HEADER_PX + 2 * cell_h, scale, origins)


def splat_radius(num_points: int, width: int, height: int) -> int:
    """Disc radius (view pixels) that roughly closes the gaps between projected points."""
    if num_points == 0:
        return 1
    return int(np.clip(round(0.8 * np.sqrt(width * height / num_points)), 1, 6))


def label_colors(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """uint8 [N,3]: class colours, grey for ignore / out of range (255, -1)."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.tile(np.asarray(IGNORE_COLOR, dtype=np.uint8), (labels.size, 1))
    valid = (labels >= 0) & (labels < num_classes)
    out[valid] = class_palette(num_classes)[labels[valid]]
    return out


def splat(background: np.ndarray, uv: np.ndarray, colors: np.ndarray, radius: int) -> np.ndarray:
    """Draw a disc of ``radius`` pixels per point over ``background`` [H,W,3]; every point's own
    pixel is drawn last, so it always shows that point's colour (unless two share a pixel)."""
    out = background.copy()
    h, w = out.shape[:2]
    u = np.asarray(uv[:, 0], dtype=np.int64)
    v = np.asarray(uv[:, 1], dtype=np.int64)
    offsets = [(dx, dy) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
               if 0 < dx * dx + dy * dy <= radius * radius]
    for dx, dy in offsets:
        x, y = u + dx, v + dy
        inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        out[y[inside], x[inside]] = colors[inside]
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    out[v[inside], u[inside]] = colors[inside]
    return out


def dimmed(image: np.ndarray) -> np.ndarray:
    """Grey, low-contrast copy of an RGB image: the backdrop of the label tiles."""
    grey = image.astype(np.float32).mean(-1, keepdims=True)
    return np.repeat(60 + 0.35 * grey, 3, axis=-1).astype(np.uint8)


def _legend_handles(class_names: Sequence[str], novel: set[int], present: set[int]) -> list[Patch]:
    palette = class_palette(len(class_names)) / 255.0
    handles = []
    for i, name in enumerate(class_names):
        if i not in present:
            continue
        label = f"★ {name} (novel)" if i in novel else name
        handles.append(Patch(facecolor=palette[i], edgecolor="black" if i in novel else "none",
                             linewidth=1.5, label=label))
    handles.append(Patch(facecolor=np.asarray(IGNORE_COLOR) / 255.0, label="ignored / unlabelled"))
    return handles


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return buffer.getvalue()


def _accuracy(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> float:
    labelled = (gt >= 0) & (gt < num_classes)
    return float((pred[labelled] == gt[labelled]).mean()) if labelled.any() else float("nan")


def view_panel(image: np.ndarray, uv: np.ndarray, gt: np.ndarray, preds: Mapping[str, np.ndarray],
               class_names: Sequence[str], novel_indices: Sequence[int], title: str
               ) -> tuple[bytes, PanelLayout]:
    """PNG of one view: image, GT, legend / 3D, 2D, fused predictions at the view's pixels.

    image uint8 [H,W,3]; uv [M,2] (column, row) of the view's visible points; gt [M] and each of
    ``preds`` [M] (keys ``3d``, ``2d``, ``fused``) are class indices (255 / -1 = none).
    -> (PNG bytes, layout: where each view pixel lands in the PNG).
    """
    h, w = image.shape[:2]
    t = len(class_names)
    layout = panel_layout(w, h)
    novel = {int(i) for i in novel_indices}
    radius = splat_radius(len(uv), w, h)
    backdrop = dimmed(image)
    tiles = {"image": image, "gt": splat(backdrop, uv, label_colors(gt, t), radius)}
    titles = {"image": "view", "gt": "ground truth"}
    for head in ("3d", "2d", "fused"):
        if head in preds:
            tiles[head] = splat(backdrop, uv, label_colors(preds[head], t), radius)
            accuracy = _accuracy(np.asarray(preds[head]), np.asarray(gt), t)
            titles[head] = f"{HEAD_TITLES[head]} (acc {100 * accuracy:.0f}%)" if accuracy == accuracy \
                else HEAD_TITLES[head]
    fig = plt.figure(figsize=(layout.width / DPI, layout.height / DPI), dpi=DPI)
    fig.text(0.5, 1 - (HEADER_PX / 2) / layout.height, title, ha="center", va="center", fontsize=13,
             weight="bold")
    tw, th = w * layout.scale, h * layout.scale
    for name, (x0, y0) in layout.origins.items():
        rect = [x0 / layout.width, 1 - (y0 + th) / layout.height, tw / layout.width, th / layout.height]
        ax = fig.add_axes(rect)
        ax.set_axis_off()
        if name == "legend":
            present = {int(c) for arr in (gt, *preds.values()) for c in np.unique(arr) if 0 <= c < t}
            handles = _legend_handles(class_names, novel, present)
            ax.legend(handles=handles, loc="center", fontsize=10, ncol=2 if len(handles) > 12 else 1,
                      frameon=False, title="classes (★ = novel)", title_fontsize=11)
            continue
        if name not in tiles:
            continue
        big = np.repeat(np.repeat(tiles[name], layout.scale, axis=0), layout.scale, axis=1)
        ax.imshow(big, interpolation="nearest", extent=(0, tw, th, 0))
        ax.set_xlim(0, tw)
        ax.set_ylim(th, 0)
        fig.text((x0 + tw / 2) / layout.width, 1 - (y0 - TITLE_PX / 2) / layout.height, titles[name],
                 ha="center", va="center", fontsize=11)
    return _png(fig), layout


def topdown_raster(xyz: np.ndarray, labels: np.ndarray, keep: np.ndarray, size: int = TOPDOWN_PX,
                   fill: int = 4) -> np.ndarray:
    """int64 [h,w] label image of the scene seen from above (row 0 = largest y), -2 = empty.

    Each cell takes the label of its highest kept point; empty cells within ``fill`` cells of a
    filled one take the nearest filled cell's label, so a sparse point cloud reads as surfaces.
    """
    xy = xyz[:, :2].astype(np.float64)
    low = xy.min(0)
    cell = max(float(np.ptp(xy, axis=0).max()), 1e-6) / (size - 1)
    col = np.round((xy[:, 0] - low[0]) / cell).astype(np.int64)
    row = np.round((xy[:, 1] - low[1]) / cell).astype(np.int64)
    w, h = int(col.max()) + 1, int(row.max()) + 1
    image = np.full((h, w), -2, dtype=np.int64)
    order = np.flatnonzero(keep)[np.argsort(xyz[keep, 2], kind="stable")]
    image[h - 1 - row[order], col[order]] = labels[order]  # highest point written last
    empty = image == -2
    if empty.any() and not empty.all():
        distance, (ri, ci) = ndimage.distance_transform_edt(empty, return_indices=True)
        near = empty & (distance <= fill)
        image[near] = image[ri[near], ci[near]]
    return image


def _raster_rgb(image: np.ndarray, num_classes: int) -> np.ndarray:
    rgb = label_colors(image.reshape(-1), num_classes).reshape(*image.shape, 3)
    rgb[image == -2] = 255  # empty: white
    return rgb


def topdown_panel(xyz: np.ndarray, gt: np.ndarray, preds: Mapping[str, np.ndarray],
                  class_names: Sequence[str], novel_indices: Sequence[int], title: str,
                  cut: float = 0.85) -> bytes:
    """PNG: the scene from above (x right, y up), ground truth and each head, shared legend.

    Each panel is a raster (:func:`topdown_raster`) of the top surface below a horizontal cut at
    ``cut`` of the scene's height (1st to 99th z percentile), so a ceiling does not cover the room.
    """
    t = len(class_names)
    xyz = np.asarray(xyz, dtype=np.float32)
    gt = np.asarray(gt, dtype=np.int64)
    low, high = np.percentile(xyz[:, 2], [1, 99])
    keep = xyz[:, 2] <= low + cut * (high - low)
    panels = {"ground truth": gt, **{HEAD_TITLES[h]: np.asarray(p, dtype=np.int64) for h, p in preds.items()}}
    rasters = {name: topdown_raster(xyz, labels, keep) for name, labels in panels.items()}
    h, w = next(iter(rasters.values())).shape
    tile = 4.2
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(tile * (len(panels) + 1), tile * h / w + 0.9),
                             dpi=DPI)
    fig.suptitle(title, fontsize=13, weight="bold")
    for ax, (name, raster) in zip(axes[:-1], rasters.items(), strict=True):
        ax.imshow(_raster_rgb(raster, t), interpolation="nearest")
        if name != "ground truth":
            name = f"{name} (acc {100 * _accuracy(panels[name][keep], gt[keep], t):.0f}%)"
        ax.set_title(name, fontsize=11)
        ax.set_axis_off()
    present = {int(c) for arr in panels.values() for c in np.unique(arr[keep]) if 0 <= c < t}
    axes[-1].set_axis_off()
    axes[-1].legend(handles=_legend_handles(class_names, {int(i) for i in novel_indices}, present),
                    loc="center", fontsize=9, frameon=False, title="classes (★ = novel)")
    fig.tight_layout()
    return _png(fig)


def panel_views(scene, count: int, min_points: int = 400) -> list[int]:
    """Up to ``count`` evenly spaced views of a stored scene with at least ``min_points`` points."""
    valid = []
    offsets = scene["proj/offsets"][:]
    for i in range(scene.num_frames):
        if int(offsets[i + 1] - offsets[i]) >= min_points:
            valid.append(i)
    if len(valid) <= count:
        return valid
    picks = np.linspace(0, len(valid) - 1, count).round().astype(int)
    return [valid[i] for i in sorted(set(picks.tolist()))]


def scene_panels(scene, gt: np.ndarray, heads: Mapping[str, np.ndarray], class_names: Sequence[str],
                 novel_indices: Sequence[int], views: int = 3, label: str = "") -> dict[str, bytes]:
    """PNG bytes by file name for one stored scene (``storage.store.Scene``): ``<scene>_view<i>.png``
    for ``views`` evenly spaced views and ``<scene>_topdown.png``.

    ``gt`` and every array of ``heads`` (``3d``, ``2d``, ``fused``) hold one label per point of the
    whole scene; the view panels show them at the view's visible points.
    """
    scene_id = scene.id
    gt = np.asarray(gt, dtype=np.int64)
    heads = {h: np.asarray(v, dtype=np.int64) for h, v in heads.items()}
    prefix = f"{label}: " if label else ""
    out = {}
    for i in panel_views(scene, views):
        point, uv = scene.view(i)
        point = np.asarray(point, dtype=np.int64)
        image = np.asarray(scene["frames/color"][i])
        frame = int(scene["frames/index"][i])
        preds = {h: v[point] for h, v in heads.items()}
        title = f"{prefix}{scene_id}, frame {frame} ({len(point)} points)"
        uv = np.asarray(uv, dtype=np.int64)
        png, _ = view_panel(image, uv, gt[point], preds, class_names, novel_indices, title)
        out[f"{scene_id}_view{i:03d}.png"] = png
    xyz = scene["points/xyz"][:]
    out[f"{scene_id}_topdown.png"] = topdown_panel(xyz, gt, heads, class_names, novel_indices,
                                                   f"{prefix}{scene_id} from above")
    return out


def render_run(model: str, scene_id: str, out_dir: Path, store: Path | None = None,
               tracking_uri: str | None = None, views: int = 3) -> list[Path]:
    """Panels of one scene for a trained model, written to ``out_dir`` (``xmask3d render``).

    ``model`` is an MLflow run id (its checkpoint artifact), ``models:/NAME@alias`` or a checkpoint
    path; the store defaults to the one the run was trained on (param ``data.store``). The scene is
    predicted with every view, as in evaluation. -> the written PNG paths.
    """



    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, run_id = resolve_model(model, tracking_uri, Path(tmp))
        loaded = load_model_for_inference(checkpoint)
    run_id = run_id or loaded.run_id
    if store is None:
        if run_id is None:
            raise InputError(f"{model}: no MLflow run to read the store from; pass --store")
        uri = tracking.resolve_tracking_uri(tracking_uri)
        params = MlflowClient(tracking_uri=uri).get_run(run_id).data.params
        if "data.store" not in params:
            raise InputError(f"MLflow run {run_id} records no data.store param; pass --store")
        store = as_path(params["data.store"])
    opened = open_store(store)
    if scene_id not in opened.scene_ids():
        raise InputError(f"{store}: no scene {scene_id!r} (scenes: {', '.join(opened.scene_ids()[:8])} ...)")
    bench = get_benchmark(loaded.benchmark)
    prediction = predict_scene(loaded, as_path(store), scene_id, bench.name)
    scene = opened.scene(scene_id)
    gt = scene_labels(scene, bench).astype(np.int64)
    label = f"{bench.name}, run {run_id[:8]}" if run_id else bench.name
    pngs = scene_panels(scene, gt, prediction.heads, bench.class_names, bench.novel_indices, views, label)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, png in pngs.items():
        (out_dir / name).write_bytes(png)
        paths.append(out_dir / name)
    return paths
