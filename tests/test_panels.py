"""Qualitative panels: PNG size, class colours at the projected pixels, top-down raster, a stored scene."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from xmask3d.engine import panels
from xmask3d.engine.plots import class_palette

NAMES = ("wall", "floor", "chair", "sofa", "table")
NOVEL = (3,)


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_view_panel_size_and_colours_at_projected_points():
    w, h = 160, 120
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    # points on a coarse grid (distinct pixels far enough apart that no disc covers another centre)
    u, v = np.meshgrid(np.arange(10, w - 10, 12), np.arange(10, h - 10, 12))
    uv = np.stack([u.ravel(), v.ravel()], 1)
    n = len(uv)
    gt = rng.integers(0, len(NAMES), n)
    gt[:5] = 255  # ignored points
    preds = {"3d": rng.integers(0, len(NAMES), n), "2d": rng.integers(0, len(NAMES), n),
             "fused": (gt % 255)}
    png, layout = panels.view_panel(image, uv, gt, preds, NAMES, NOVEL, "test view")
    pixels = decode(png)
    assert pixels.shape == (layout.height, layout.width, 3)
    assert layout.scale == 3 and layout.width >= 3 * w * layout.scale
    palette = class_palette(len(NAMES))
    for tile, labels in (("gt", gt), ("3d", preds["3d"]), ("2d", preds["2d"]), ("fused", preds["fused"])):
        x, y = layout.pixel(tile, uv[:, 0], uv[:, 1])
        want = np.where((labels == 255)[:, None], np.zeros(3, np.uint8), palette[np.minimum(labels, 4)])
        assert np.array_equal(pixels[y, x], want), tile
    x, y = layout.pixel("image", uv[:, 0], uv[:, 1])
    assert np.array_equal(pixels[y, x], image[uv[:, 1], uv[:, 0]])  # the view itself, unchanged
    # between points the label tiles show the dimmed grey view, not a class colour
    x, y = layout.pixel("gt", np.array([4]), np.array([4]))
    r, g, b = pixels[y[0], x[0]].astype(int)
    assert r == g == b


def test_splat_discs_and_own_pixel_last():
    background = np.zeros((20, 20, 3), np.uint8)
    uv = np.array([[5, 5], [7, 5]])
    colors = np.array([[255, 0, 0], [0, 255, 0]], np.uint8)
    out = panels.splat(background, uv, colors, radius=2)
    assert out[5, 5].tolist() == [255, 0, 0] and out[5, 7].tolist() == [0, 255, 0]
    assert out[5, 6].tolist() in ([255, 0, 0], [0, 255, 0])  # overlapping discs: one of the two
    assert out[3, 5].tolist() == [255, 0, 0] and out[5, 10].tolist() == [0, 0, 0]
    assert background.sum() == 0


def test_topdown_raster_keeps_the_highest_point_and_fills_gaps():
    xyz = np.array([[0, 0, 0.0], [0, 0, 1.0], [1, 1, 0.5], [0.5, 0.5, 3.0]], np.float32)
    labels = np.array([1, 2, 3, 4])
    keep = np.array([True, True, True, False])  # above the cut
    raster = panels.topdown_raster(xyz, labels, keep, size=11, fill=2)
    assert raster.shape == (11, 11)
    assert raster[10, 0] == 2  # (0,0): the higher of labels 1 and 2; row 0 = largest y
    assert raster[0, 10] == 3
    assert raster[9, 1] == 2  # filled from the nearest point
    assert raster[5, 5] == -2  # far from every kept point: empty
    assert 4 not in raster


def test_topdown_panel_png():
    rng = np.random.default_rng(1)
    xyz = rng.random((2000, 3)).astype(np.float32) * [4, 3, 2.5]
    gt = rng.integers(0, len(NAMES), 2000)
    png = panels.topdown_panel(xyz, gt, {"3d": gt, "fused": (gt + 1) % 5}, NAMES, NOVEL, "scene")
    pixels = decode(png)
    assert pixels.shape[1] > 3 * pixels.shape[0] / 2  # panels side by side
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > len(NAMES)


def test_scene_panels_of_a_stored_scene(synthetic_store):
    from storage.benchmarks import get_benchmark
    from storage.dataset import scene_labels
    from storage.store import open_store

    bench = get_benchmark("scannet20-b15n4")
    scene = open_store(synthetic_store).scene("scene0002_00")
    gt = scene_labels(scene, bench).astype(np.int64)
    out = panels.scene_panels(scene, gt, {"3d": gt, "2d": gt, "fused": gt}, bench.class_names,
                              bench.novel_indices, views=2)
    views = panels.panel_views(scene, 2)
    assert len(views) == 2 and views[0] == 0
    names = [f"scene0002_00_view{i:03d}.png" for i in views] + ["scene0002_00_topdown.png"]
    assert sorted(out) == sorted(names)
    first = decode(out[f"scene0002_00_view{views[0]:03d}.png"])
    h, w = scene["frames/color"].shape[1:3]
    layout = panels.panel_layout(w, h)
    assert first.shape == (layout.height, layout.width, 3)
    point, uv = scene.view(views[0])
    x, y = layout.pixel("fused", uv[:, 0].astype(np.int64), uv[:, 1].astype(np.int64))
    colours = panels.label_colors(gt[point], bench.num_classes)
    # a pixel shared by several points shows one of them: compare where the pixel is unique
    flat = uv[:, 1].astype(np.int64) * w + uv[:, 0]
    unique = np.flatnonzero(np.bincount(flat, minlength=w * h)[flat] == 1)
    assert len(unique) > 100
    assert np.array_equal(first[y[unique], x[unique]], colours[unique])


@pytest.mark.parametrize("count,total,expect", [(3, 10, [0, 4, 9]), (5, 2, [0, 1])])
def test_panel_views_evenly_spaced(count, total, expect):
    class FakeScene:
        num_frames = total

        def __getitem__(self, key):
            assert key == "proj/offsets"
            return np.arange(total + 1) * 500

    assert panels.panel_views(FakeScene(), count) == expect


def test_render_command_writes_the_panels_of_a_checkpoint(synthetic_store, tmp_path):
    from dataclasses import asdict

    import torch
    from typer.testing import CliRunner

    from xmask3d.cli import app
    from xmask3d.engine.checkpoint import save_checkpoint
    from xmask3d.network.config import preset
    from xmask3d.network.model import build_model

    torch.manual_seed(0)
    cfg = preset("tiny")
    ckpt = save_checkpoint(tmp_path / "ckpt" / "last.pt", {
        "model": build_model(cfg, 384).state_dict(), "preset": "tiny", "benchmark": "scannet20-b15n4",
        "text_encoder": {"name": "minilm", "dim": 384, "spec": "minilm"}, "model_config": asdict(cfg)})
    runner = CliRunner()
    out = tmp_path / "panels"
    result = runner.invoke(app, ["render", "--run", str(ckpt), "--scene", "scene0002_00", "--store",
                                 str(synthetic_store), "--out", str(out), "--views", "1"])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in out.iterdir())
    assert written == ["scene0002_00_topdown.png", "scene0002_00_view000.png"]
    assert all(str(out / name) in result.output for name in written)
    pixels = decode((out / "scene0002_00_view000.png").read_bytes())
    assert pixels.shape == (panels.panel_layout(320, 240).height, panels.panel_layout(320, 240).width, 3)
    result = runner.invoke(app, ["render", "--run", str(ckpt), "--scene", "scene0002_00"])
    assert result.exit_code == 2 and "pass --store" in result.output
    result = runner.invoke(app, ["render", "--run", str(ckpt), "--scene", "scene9999_00", "--store",
                                 str(synthetic_store)])
    assert result.exit_code == 2 and "no scene 'scene9999_00'" in result.output
