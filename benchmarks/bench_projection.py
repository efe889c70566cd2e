"""Projection speed: ``project_points`` vs OpenScene's per-frame float64 mapper, same scene, same run.

The scene is a furnished box room: points sampled on the surfaces of axis-aligned boxes, depth
images ray-cast analytically from cameras inside the room (real occlusion by furniture). The
baseline is ``openscene_mapping`` (a faithful copy of OpenScene's ``compute_mapping``) run per
frame into a dense [F,N,3] int matrix; the correspondences of both must be identical.

    .venv/bin/python benchmarks/bench_projection.py                 # ~150k points x 100 frames
    .venv/bin/python benchmarks/bench_projection.py --points 500000 --frames 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from preprocessing.projection import default_margin, openscene_mapping, prepare_points, project_points

W, H = 320, 240
K = np.array([[288.94, 0, 159.5], [0, 288.94, 119.5], [0, 0, 1]], np.float32)


def make_room(rng: np.random.Generator, n_points: int):
    """Box room 6x5x3 m with 12 furniture boxes: (boxes lo/hi, is_room flags, surface points)."""
    lo = [np.zeros(3)]
    hi = [np.array([6.0, 5.0, 3.0])]
    for _ in range(12):
        size = rng.uniform([0.3, 0.3, 0.4], [1.5, 1.2, 2.0])
        corner = rng.uniform([0.2, 0.2, 0.0], [6.0 - size[0] - 0.2, 5.0 - size[1] - 0.2, 0.0])
        lo.append(corner)
        hi.append(corner + size)
    lo, hi = np.array(lo), np.array(hi)
    size = hi - lo
    area = 2 * (size[:, 0] * size[:, 1] + size[:, 1] * size[:, 2] + size[:, 0] * size[:, 2])
    counts = rng.multinomial(n_points, area / area.sum())
    pts = []
    for low, h, c in zip(lo, hi, counts, strict=True):
        p = rng.uniform(low, h, (c, 3))
        axis = rng.integers(0, 3, c)
        side = rng.integers(0, 2, c)
        p[np.arange(c), axis] = np.where(side, h[axis], low[axis])
        pts.append(p)
    return lo, hi, np.concatenate(pts).astype(np.float32)


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    f = target - eye
    f /= np.linalg.norm(f)
    r = np.cross(f, [0, 0, 1.0])
    r /= np.linalg.norm(r)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = r, np.cross(f, r), f, eye
    return pose


def render_depth(pose: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Ray-cast z-depth: first hit among furniture boxes, else the room's far wall."""
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    dirs_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u, float)], -1)
    dirs = dirs_cam.reshape(-1, 3) @ pose[:3, :3].T
    origin = pose[:3, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        t0 = (lo[:, None, :] - origin) / dirs[None]
        t1 = (hi[:, None, :] - origin) / dirs[None]
    near = np.minimum(t0, t1).max(-1)
    far = np.maximum(t0, t1).min(-1)
    t_room = far[0]  # inside the room: exit distance
    hit = (near[1:] <= far[1:]) & (near[1:] > 0)
    t_obj = np.where(hit, near[1:], np.inf).min(0)
    t = np.minimum(t_room, t_obj)  # ray parameter = z because dirs_cam has z = 1
    depth = np.round(t * 1000) / 1000  # millimetre depth, as the store keeps it
    return depth.reshape(H, W).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=150_000)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    lo, hi, xyz = make_room(rng, args.points)
    poses = np.stack([look_at(rng.uniform([1, 1, 1.2], [5, 4, 1.8]), rng.uniform([0, 0, 0.3], [6, 5, 2.5]))
                      for _ in range(args.frames)]).astype(np.float32)
    depths = np.stack([render_depth(p.astype(np.float64), lo, hi) for p in poses])
    margin = default_margin(W)
    n, f = len(xyz), len(poses)

    # ours: includes the Morton sort / chunking of the points
    t = time.perf_counter()
    corr = project_points(prepare_points(xyz), poses, K, depths)
    ours = time.perf_counter() - t

    t = time.perf_counter()
    dense = np.zeros((f, n, 3), dtype=int)
    for i in range(f):
        dense[i] = openscene_mapping(poses[i].astype(np.float64), xyz.astype(np.float64), depths[i],
                                     K.astype(np.float64), margin)
    ref = time.perf_counter() - t

    for i in range(f):
        idx = np.flatnonzero(dense[i, :, 2])
        point, uv = corr.frame(i)
        assert np.array_equal(point, idx), f"frame {i}: visible points differ"
        assert np.array_equal(uv[:, 0], dense[i, idx, 1]) and np.array_equal(uv[:, 1], dense[i, idx, 0]), \
            f"frame {i}: pixels differ"
    m = int(corr.offsets[-1])
    print(f"scene: {n} points x {f} frames ({W}x{H}), {m} visible pairs ({m / (n * f):.1%})")
    print(f"project_points       {ours:8.3f} s  {n * f / ours / 1e6:8.1f} M point-frames/s")
    print(f"OpenScene mapper     {ref:8.3f} s  {n * f / ref / 1e6:8.1f} M point-frames/s")
    print(f"correspondences identical: yes; speed ratio {ref / ours:.1f}x (target >= 10x)")
    csr_bytes = corr.offsets.nbytes + corr.point.nbytes + corr.uv.nbytes
    print(f"memory: CSR {csr_bytes / 1e6:.1f} MB vs dense {dense.nbytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
