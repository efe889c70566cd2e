"""Point -> pixel correspondences of a scene's points in its depth frames.

A point is *visible* in a frame when it projects inside the depth image (with a border margin)
and passes OpenScene's depth test ``|depth(u, v) - z| <= tau * depth(u, v)`` (depth 0 = invalid).

Conventions (identical to OpenScene's ``PointCloudToImageMapper.compute_mapping``):
- world -> camera with ``inv(camera_to_world)``; ``u = x * fx / z + cx``, ``v = y * fy / z + cy``;
- the pixel is ``np.round`` of (u, v) (round half to even); ``u`` is the column, ``v`` the row;
- inside means ``margin <= u < W - margin`` and ``margin <= v < H - margin``.

Speed without changing the answer:
- points are put in Morton (Z-curve) order and cut into fixed-size chunks; each chunk's bounding
  box is tested against every frame's frustum (and the frame's farthest valid depth) before any
  point of it is transformed, so only chunks a camera can see are touched;
- the bulk arithmetic is float32 over a batch of frames at once (no Python loop over points);
- float32 rounding can flip a decision only for points within a computed error bound of a
  rounding tie (x.5 pixel) or of the depth-tolerance edge; those few points are recomputed in
  float64 exactly as OpenScene does, so the result equals the float64 reference.
The output is CSR over frames (``offsets``, ``point``, ``uv``), never a dense N x F matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

REFERENCE_WIDTH = 320
REFERENCE_MARGIN = 10
CHUNK_SIZE = 1024
# float32 points transformed at once: temporaries stay cache-sized (~1.5 MB per array).
MAX_BATCH_POINTS = 1 << 17
# float32 unit roundoff, with head-room for the few operations of a projection.
_F32_ERR = 16 * float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class Correspondences:
    """CSR over frames: frame i sees ``point[offsets[i]:offsets[i+1]]`` at ``uv`` (column, row)."""

    offsets: np.ndarray  # int64 [F+1]
    point: np.ndarray  # int32 [M], sorted within a frame
    uv: np.ndarray  # uint16 [M, 2]

    @property
    def num_frames(self) -> int:
        return len(self.offsets) - 1

    def frame(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Visible point indices and their (u, v) pixels in frame ``i``."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.point[lo:hi], self.uv[lo:hi]

    @staticmethod
    def empty(num_frames: int = 0) -> Correspondences:
        return Correspondences(np.zeros(num_frames + 1, np.int64), np.zeros(0, np.int32),
                               np.zeros((0, 2), np.uint16))

    @staticmethod
    def concat(parts: Sequence[Correspondences]) -> Correspondences:
        """Join the correspondences of consecutive frame batches."""
        if not parts:
            return Correspondences.empty()
        counts = np.concatenate([np.diff(p.offsets) for p in parts])
        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        return Correspondences(offsets, np.concatenate([p.point for p in parts]),
                               np.concatenate([p.uv for p in parts]))


def default_margin(width: int) -> int:
    """Border margin in pixels: 10 px at 320 px width, scaled with the image width."""
    return int(round(REFERENCE_MARGIN * width / REFERENCE_WIDTH))


def _part1by2(x: np.ndarray) -> np.ndarray:
    """Spread the low 10 bits of x so that two zero bits separate each (Morton encoding)."""
    x = x.astype(np.uint32) & 0x3FF
    x = (x | (x << 16)) & 0x030000FF
    x = (x | (x << 8)) & 0x0300F00F
    x = (x | (x << 4)) & 0x030C30C3
    x = (x | (x << 2)) & 0x09249249
    return x


@dataclass(frozen=True)
class ScenePoints:
    """A scene's points in Morton order, cut into chunks with bounding boxes (reusable)."""

    xyz: np.ndarray  # float32 [N,3], original order
    chunks: np.ndarray  # float32 [C,S,3], Morton order, padded with NaN
    chunk_index: np.ndarray  # int64 [C,S] original point index, -1 for padding
    corners: np.ndarray  # float32 [C,8,3] bounding-box corners
    max_abs: float  # largest coordinate magnitude (float32 error bound)

    @property
    def num_points(self) -> int:
        return len(self.xyz)


def prepare_points(xyz: np.ndarray, chunk_size: int = CHUNK_SIZE) -> ScenePoints:
    """Sort points along a Z-curve and cut them into chunks for frustum culling."""
    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must be [N,3], got {xyz.shape}")
    n = len(xyz)
    num_chunks = max(1, -(-n // chunk_size))
    if n:
        lo, hi = xyz.min(0), xyz.max(0)
        q = ((xyz - lo) / np.maximum(hi - lo, 1e-6) * 1023).astype(np.uint32)
        code = _part1by2(q[:, 0]) | (_part1by2(q[:, 1]) << 1) | (_part1by2(q[:, 2]) << 2)
        order = np.argsort(code, kind="stable")
    else:
        order = np.zeros(0, np.int64)
    index = np.full(num_chunks * chunk_size, -1, np.int64)
    index[:n] = order
    index = index.reshape(num_chunks, chunk_size)
    chunks = np.full((num_chunks, chunk_size, 3), np.nan, np.float32)
    chunks.reshape(-1, 3)[:n] = xyz[order]
    if n:
        with np.errstate(invalid="ignore"):
            lo_c, hi_c = np.nanmin(chunks, axis=1), np.nanmax(chunks, axis=1)
        # corner k takes lo or hi per axis according to the bits of k
        bits = ((np.arange(8)[:, None] >> np.arange(3)[None, :]) & 1).astype(bool)  # [8,3]
        corners = np.where(bits[None], hi_c[:, None, :], lo_c[:, None, :]).astype(np.float32)
        max_abs = float(np.abs(xyz).max())
    else:
        corners = np.full((num_chunks, 8, 3), np.nan, np.float32)
        max_abs = 0.0
    return ScenePoints(xyz, chunks, index, corners, max_abs)


def _active_chunks(points: ScenePoints, w2c: np.ndarray, K: np.ndarray, size: tuple[int, int],
                   margin: int, max_depth: np.ndarray, tau: float) -> np.ndarray:
    """bool [B,C]: chunks whose bounding box may hold a visible point of frame b (conservative)."""
    W, H = size
    R, t = w2c[:, :3, :3], w2c[:, :3, 3]
    cam = np.einsum("bij,ckj->bcki", R, points.corners) + t[:, None, None, :]  # [B,C,8,3]
    x, y, z = cam[..., 0], cam[..., 1], cam[..., 2]
    fx, fy = K[:, 0, 0, None, None], K[:, 1, 1, None, None]
    cx, cy = K[:, 0, 2, None, None], K[:, 1, 2, None, None]
    slack = 1.5  # pixels: rounding plus float error
    planes = (
        z,  # in front of the camera
        fx * x + (cx - margin + slack) * z,  # u >= margin - slack
        -fx * x + (W - margin + slack - cx) * z,  # u <= W - margin + slack
        fy * y + (cy - margin + slack) * z,
        -fy * y + (H - margin + slack - cy) * z,
        (max_depth[:, None, None] * (1 + tau) + 1e-3) - z,  # not beyond the farthest depth
    )
    outside = np.zeros(cam.shape[:2], bool)
    for plane in planes:
        outside |= (plane < 0).all(axis=2)
    return ~outside & (points.chunk_index[None, :, 0] >= 0)


def _project_batch(points: ScenePoints, w2c64: np.ndarray, K: np.ndarray, depths: np.ndarray,
                   margin: int, tau: float) -> Correspondences:
    B, H, W = depths.shape
    w2c = w2c64.astype(np.float32)
    K32 = K.astype(np.float32)
    max_depth = depths.reshape(B, -1).max(axis=1)
    active = _active_chunks(points, w2c, K32, (W, H), margin, max_depth, tau)
    pair_b, pair_c = np.nonzero(active)  # frame-major
    S = points.chunks.shape[1]
    # per-frame float32 error bound of camera coordinates
    e_cam = (_F32_ERR * (2 * points.max_abs + np.abs(w2c64[:, :3, 3]).sum(1) + 1.0)).astype(np.float32)

    frames_out, point_out, u_out, v_out = [], [], [], []
    step = max(1, MAX_BATCH_POINTS // S)
    for lo in range(0, len(pair_b), step):
        pb, pc = pair_b[lo:lo + step], pair_c[lo:lo + step]
        cam = np.matmul(points.chunks[pc], w2c[pb, :3, :3].transpose(0, 2, 1))  # [P,S,3]
        cam += w2c[pb, None, :3, 3]
        x, y, z = cam[..., 0], cam[..., 1], cam[..., 2]
        fx, fy = K32[pb, 0, 0, None], K32[pb, 1, 1, None]
        cx, cy = K32[pb, 0, 2, None], K32[pb, 1, 2, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            inv_z = 1.0 / z
            u = x * fx * inv_z + cx
            v = y * fy * inv_z + cy
            loose = ((z > 0) & (u >= margin - 1) & (u < W - margin + 1)
                     & (v >= margin - 1) & (v < H - margin + 1))
        flat = np.flatnonzero(loose)
        if not len(flat):
            continue
        p_idx, s_idx = np.divmod(flat, S)
        u, v, z, x, y = (a.reshape(-1)[flat] for a in (u, v, z, x, y))
        iz = inv_z.reshape(-1)[flat]
        fb = pb[p_idx]
        ur, vr = np.rint(u), np.rint(v)
        inside = (ur >= margin) & (vr >= margin) & (ur < W - margin) & (vr < H - margin)
        ui = np.where(inside, ur, 0).astype(np.int64)
        vi = np.where(inside, vr, 0).astype(np.int64)
        d = depths[fb, vi, ui]
        gap = np.abs(d - z)
        visible = inside & (d > 0) & (gap <= tau * d)
        # float32 error bounds: pixel coordinate and depth difference
        e = e_cam[fb]
        du = K32[fb, 0, 0] * e * iz * (1 + np.abs(x) * iz) + _F32_ERR * (np.abs(u) + W)
        dv = K32[fb, 1, 1] * e * iz * (1 + np.abs(y) * iz) + _F32_ERR * (np.abs(v) + H)
        amb = (np.abs(u - np.floor(u) - 0.5) <= du) | (np.abs(v - np.floor(v) - 0.5) <= dv)
        amb |= inside & (d > 0) & (np.abs(gap - tau * d) <= e + _F32_ERR * (d + np.abs(z)))
        pidx = points.chunk_index[pc[p_idx], s_idx]
        if amb.any():
            k = np.flatnonzero(amb)
            visible[k], u64, v64 = _refine(points, pidx[k], fb[k], w2c64, K, depths, margin, tau)
            ui[k], vi[k] = u64, v64
        keep = np.flatnonzero(visible)
        frames_out.append(fb[keep])
        point_out.append(pidx[keep])
        u_out.append(ui[keep])
        v_out.append(vi[keep])
    if not frames_out:
        return Correspondences.empty(B)
    fb = np.concatenate(frames_out)
    pt = np.concatenate(point_out)
    order = np.argsort(fb * max(points.num_points, 1) + pt)
    fb, pt = fb[order], pt[order]
    uv = np.stack([np.concatenate(u_out)[order], np.concatenate(v_out)[order]], axis=1).astype(np.uint16)
    offsets = np.zeros(B + 1, np.int64)
    np.cumsum(np.bincount(fb, minlength=B), out=offsets[1:])
    return Correspondences(offsets, pt.astype(np.int32), uv)


def _refine(points: ScenePoints, pidx: np.ndarray, frame: np.ndarray, w2c64: np.ndarray, K: np.ndarray,
            depths: np.ndarray, margin: int, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decide the float32-ambiguous points with OpenScene's float64 arithmetic."""
    xyz64 = points.xyz[pidx].astype(np.float64)
    hom = np.concatenate([xyz64, np.ones((len(xyz64), 1))], axis=1)
    p = np.einsum("kij,kj->ki", w2c64[frame], hom)
    K64 = K[frame].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = (p[:, 0] * K64[:, 0, 0]) / p[:, 2] + K64[:, 0, 2]
        v = (p[:, 1] * K64[:, 1, 1]) / p[:, 2] + K64[:, 1, 2]
        ur, vr = np.round(u), np.round(v)
        H, W = depths.shape[1:]
        inside = (ur >= margin) & (vr >= margin) & (ur < W - margin) & (vr < H - margin)
    ui = np.where(inside, ur, 0).astype(np.int64)
    vi = np.where(inside, vr, 0).astype(np.int64)
    d = depths[frame, vi, ui].astype(np.float64)
    visible = inside & (np.abs(d - p[:, 2]) <= tau * d) & (d > 0)
    return visible, ui, vi


def project_points(xyz: np.ndarray | ScenePoints, poses: np.ndarray, intrinsics: np.ndarray,
                   depths: np.ndarray, *, margin: int | None = None, depth_tolerance: float = 0.25,
                   frame_batch: int = 16) -> Correspondences:
    """Visible points of every frame as CSR.

    xyz: float32 [N,3] world coordinates (or ``prepare_points(xyz)`` to reuse across calls);
    poses: [F,4,4] camera_to_world; intrinsics: [F,3,3] or [3,3] for the depth image;
    depths: float32 [F,H,W] metres, 0 = invalid. ``margin=None``: 10 px scaled to width / 320.
    """
    points = xyz if isinstance(xyz, ScenePoints) else prepare_points(xyz)
    poses = np.asarray(poses, dtype=np.float64)
    depths = np.asarray(depths, dtype=np.float32)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"poses must be [F,4,4], got {poses.shape}")
    F = len(poses)
    if depths.ndim != 3 or len(depths) != F:
        raise ValueError(f"depths must be [F,H,W] with F={F}, got {depths.shape}")
    K = np.asarray(intrinsics, dtype=np.float64)
    if K.shape == (3, 3):
        K = np.broadcast_to(K, (F, 3, 3))
    if K.shape != (F, 3, 3):
        raise ValueError(f"intrinsics must be [3,3] or [F,3,3], got {K.shape}")
    if not np.isfinite(poses).all():
        raise ValueError("poses must be finite (drop frames with invalid poses first)")
    H, W = depths.shape[1:]
    margin = default_margin(W) if margin is None else int(margin)
    if F == 0:
        return Correspondences.empty(0)
    if points.num_points >= np.iinfo(np.int32).max:
        raise ValueError("more than 2^31 points")
    w2c64 = np.linalg.inv(poses)
    parts = [_project_batch(points, w2c64[i:i + frame_batch], K[i:i + frame_batch],
                            depths[i:i + frame_batch], margin, depth_tolerance)
             for i in range(0, F, frame_batch)]
    return Correspondences.concat(parts)


def openscene_mapping(camera_to_world: np.ndarray, coords: np.ndarray, depth: np.ndarray,
                      intrinsic: np.ndarray, cut_bound: int, vis_thres: float = 0.25) -> np.ndarray:
    """Baseline for tests and benchmarks: OpenScene's per-frame mapper, float64, dense int [N,3].

    A faithful copy of ``PointCloudToImageMapper.compute_mapping`` (openscene,
    ``scripts/feature_fusion/fusion_util.py``): rows are (row v, column u, visible).
    """
    image_dim = (depth.shape[1], depth.shape[0])
    mapping = np.zeros((3, coords.shape[0]), dtype=int)
    coords_new = np.concatenate([coords, np.ones([coords.shape[0], 1])], axis=1).T
    world_to_camera = np.linalg.inv(camera_to_world)
    p = np.matmul(world_to_camera, coords_new)
    p[0] = (p[0] * intrinsic[0][0]) / p[2] + intrinsic[0][2]
    p[1] = (p[1] * intrinsic[1][1]) / p[2] + intrinsic[1][2]
    pi = np.round(p).astype(int)
    inside_mask = (pi[0] >= cut_bound) * (pi[1] >= cut_bound) \
        * (pi[0] < image_dim[0] - cut_bound) * (pi[1] < image_dim[1] - cut_bound)
    depth_cur = depth[pi[1][inside_mask], pi[0][inside_mask]]
    occlusion_mask = np.abs(depth[pi[1][inside_mask], pi[0][inside_mask]] - p[2][inside_mask]) \
        <= vis_thres * depth_cur
    inside_mask[inside_mask] = occlusion_mask
    mapping[0][inside_mask] = pi[1][inside_mask]
    mapping[1][inside_mask] = pi[0][inside_mask]
    mapping[2][inside_mask] = 1
    return mapping.T
