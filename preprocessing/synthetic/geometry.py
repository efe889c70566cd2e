"""Box-world scene geometry with an exact, vectorised ray caster.

A scene is the inside of a room (an oriented box seen from within: floor, ceiling, four walls)
plus oriented boxes rotated about z (object parts). Depth, colour, labels, mesh and captions of
the synthetic datasets all come from this one description, so they agree exactly: a point hidden
behind an object in the rendered depth really is occluded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NEAR = 1e-4  # hits closer than this (in ray-parameter units) are ignored
LIGHT = np.array([0.35, 0.5, 0.8]) / np.linalg.norm([0.35, 0.5, 0.8])


@dataclass(frozen=True)
class SceneObject:
    """One annotated (or deliberately unannotated) object instance."""

    object_id: int
    category: str  # ScanNet raw category name, or an S3DIS class name
    color: tuple[float, float, float]  # albedo, 0..255
    annotated: bool = True


def rot_z(yaw: np.ndarray | float) -> np.ndarray:
    """Rotation matrices about z; shape (..., 3, 3); columns are the local axes in world."""
    yaw = np.asarray(yaw, dtype=np.float64)
    c, s = np.cos(yaw), np.sin(yaw)
    z, o = np.zeros_like(yaw), np.ones_like(yaw)
    return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2)


def texture(points: np.ndarray) -> np.ndarray:
    """Deterministic 3D pattern (intensity offset), shared by rendered pixels and mesh vertices."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return (9.0 * np.sin(5.3 * x + 1.7 * y + 2.9 * z) * np.cos(3.1 * x - 4.3 * y + 1.1 * z)
            + 5.0 * np.sin(19.0 * x + 23.0 * y + 17.0 * z))


def shade(points: np.ndarray, normals: np.ndarray, albedo: np.ndarray) -> np.ndarray:
    """Lambert + ambient shading with a fixed light plus the texture; float RGB (not clipped)."""
    lam = 0.6 + 0.4 * np.clip(normals @ LIGHT.astype(normals.dtype), 0.0, 1.0)
    return albedo * lam[..., None] + texture(points)[..., None]



def _slab(o: tuple, d: tuple, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit ray parameters of a centred box, in its local frame.

    `o` and `d` are the local (x, y, z) components of origins and directions (scalars or arrays
    that broadcast together); division by a zero component gives +-inf slabs, as it should.
    """
    t_in = t_out = None
    with np.errstate(divide="ignore", invalid="ignore"):
        for a in range(3):
            inv = 1.0 / d[a]
            lo = (-half[a] - o[a]) * inv
            hi = (half[a] - o[a]) * inv
            near, far = np.minimum(lo, hi), np.maximum(lo, hi)
            t_in = near if t_in is None else np.maximum(t_in, near)
            t_out = far if t_out is None else np.minimum(t_out, far)
    return t_in, t_out


@dataclass
class RayHits:
    """Nearest hits of a bundle of rays (hit point = origin + t * direction)."""

    t: np.ndarray  # float [N], inf where nothing was hit
    object_id: np.ndarray  # int64 [N], -1 where nothing was hit
    normal: np.ndarray  # float [N,3], unit normal of the surface hit, facing the ray
    box: np.ndarray  # int64 [N], box index, -1 for the room shell, -2 for no hit


@dataclass
class SceneGeometry:
    """The room shell plus object boxes, all in the raw (sensor) coordinate frame."""

    room_center: np.ndarray  # [3]
    room_half: np.ndarray  # [3] half extents of the interior
    room_yaw: float
    room_faces: np.ndarray  # int [3, 2]: object id of the surface left through local axis a, side (-, +)
    centers: np.ndarray  # [B,3]
    halves: np.ndarray  # [B,3]
    yaws: np.ndarray  # [B]
    box_object: np.ndarray  # int [B] object id of each box
    objects: list[SceneObject]
    resting: np.ndarray = field(default=None)  # bool [B]: bottom face lies on a surface (not meshed)

    def __post_init__(self) -> None:
        self.rotations = rot_z(self.yaws) if len(self.yaws) else np.zeros((0, 3, 3))
        self.room_rot = rot_z(self.room_yaw)
        if self.resting is None:
            self.resting = np.zeros(len(self.yaws), bool)
        self.albedo = np.array([o.color for o in self.objects], dtype=np.float64)

    # ------------------------------------------------------------------ ray casting
    def raycast(self, origins: np.ndarray, directions: np.ndarray) -> RayHits:
        """Nearest hit of each ray (origins inside the room); t is in units of the direction's length.

        Vectorised over rays, looping over boxes. With camera-frame directions of z = 1 (pixel rays),
        t is the z-depth.
        """
        directions = np.asarray(directions, np.float64).reshape(-1, 3)
        origins = np.broadcast_to(np.asarray(origins, np.float64), directions.shape)
        o_room = (origins - self.room_center) @ self.room_rot
        d_room = directions @ self.room_rot
        t_in, t_out = _slab(o_room.T, d_room.T, self.room_half)
        inside = np.all(np.abs(o_room) < self.room_half, axis=1)
        t = np.where(inside & (t_out > NEAR), t_out, np.inf)
        box = np.where(np.isfinite(t), -1, -2)
        for b in range(len(self.yaws)):
            rot = self.rotations[b]
            o = (origins - self.centers[b]) @ rot
            d = directions @ rot
            b_in, b_out = _slab(o.T, d.T, self.halves[b])
            hit = (b_in <= b_out) & (b_in > NEAR) & (b_in < t)
            t = np.where(hit, b_in, t)
            box = np.where(hit, b, box)
        points = origins + np.where(np.isfinite(t), t, 0.0)[:, None] * directions
        return self._finish(points, directions, t, box)

    def _finish(self, points: np.ndarray, dirs: np.ndarray, t: np.ndarray, box: np.ndarray) -> RayHits:
        """Object ids and normals from the winning box (or room side) of each ray."""
        n = len(t)
        object_id = np.full(n, -1, np.int64)
        normal = np.zeros((n, 3))
        shell = box == -1
        if shell.any():
            p = (points[shell] - self.room_center) @ self.room_rot
            axis = np.argmax(np.abs(p) / self.room_half, axis=1)
            side = (np.take_along_axis(p, axis[:, None], 1)[:, 0] > 0).astype(np.int64)
            object_id[shell] = self.room_faces[axis, side]
            normal[shell] = self.room_rot[:, axis].T * np.where(side == 1, -1.0, 1.0)[:, None]
        objs = box >= 0
        if objs.any():
            b = box[objs]
            p = np.einsum("ni,nij->nj", points[objs] - self.centers[b], self.rotations[b])
            axis = np.argmax(np.abs(p) / self.halves[b], axis=1)
            sign = np.where(np.take_along_axis(p, axis[:, None], 1)[:, 0] > 0, 1.0, -1.0)
            object_id[objs] = self.box_object[b]
            axes = np.take_along_axis(self.rotations[b], axis[:, None, None], 2)[:, :, 0]
            normal[objs] = axes * sign[:, None]
        return RayHits(t=t, object_id=object_id, normal=normal, box=box)

    def _normal_table(self) -> np.ndarray:
        """[B+1, 6, 3] unit normals by (box index + 1, 2 * axis + positive side); row 0 = room shell."""
        table = np.zeros((len(self.yaws) + 1, 6, 3))
        for a in range(3):
            table[0, 2 * a] = self.room_rot[:, a]  # leaving through the negative side: normal points +a
            table[0, 2 * a + 1] = -self.room_rot[:, a]
            table[1:, 2 * a] = -self.rotations[:, :, a]  # entering the negative face: outward normal is -a
            table[1:, 2 * a + 1] = self.rotations[:, :, a]
        return table

    def render(self, pose: np.ndarray, intrinsic: np.ndarray, width: int, height: int,
               shading: bool = True) -> Render:
        """Ray-cast one pinhole view (pixel centres at integer coordinates, OpenCV camera axes).

        Exact z-buffer of the nearest hit (float32). Each box is only tested against the pixels
        inside its projected bounding rectangle, so the cost is about pixels x depth complexity,
        not pixels x boxes. With `shading=False` only depth and object ids are filled in.
        """
        fx, fy, cx, cy = intrinsic[0, 0], intrinsic[1, 1], intrinsic[0, 2], intrinsic[1, 2]
        rot, eye = np.asarray(pose[:3, :3], np.float64), np.asarray(pose[:3, 3], np.float64)
        u = ((np.arange(width) - cx) / fx).astype(np.float32)
        v = ((np.arange(height) - cy) / fy).astype(np.float32)
        # world ray directions (z-depth parametrisation), one [H,W] plane per component
        dw = [u[None, :] * np.float32(rot[k, 0]) + v[:, None] * np.float32(rot[k, 1]) + np.float32(rot[k, 2])
              for k in range(3)]
        # room shell: every ray from inside leaves through exactly one side
        o_room = (eye - self.room_center) @ self.room_rot
        zbuf = np.full((height, width), np.inf, np.float32)
        code = np.zeros((height, width), np.int8)
        with np.errstate(divide="ignore", invalid="ignore"):
            for a in range(3):
                ra = self.room_rot[:, a].astype(np.float32)
                d = dw[0] * ra[0] + dw[1] * ra[1] + dw[2] * ra[2]
                pos = d > 0
                t = (np.where(pos, np.float32(self.room_half[a]), np.float32(-self.room_half[a]))
                     - np.float32(o_room[a])) / d
                closer = t < zbuf
                zbuf = np.where(closer, t, zbuf)
                code = np.where(closer, (2 * a + pos).astype(np.int8), code)
        if not np.all(np.abs(o_room) < self.room_half):
            zbuf[:] = np.inf
        zbuf[~(zbuf > NEAR)] = np.inf
        box = np.where(np.isfinite(zbuf), -1, -2).astype(np.int32)
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
        for b in range(len(self.yaws)):
            brot = self.rotations[b]
            world = self.centers[b] + (corners * self.halves[b]) @ brot.T
            cam = (world - eye) @ rot
            if np.all(cam[:, 2] <= 0.01):
                continue
            if np.any(cam[:, 2] <= 0.01):
                u0, u1, v0, v1 = 0, width, 0, height
            else:
                pu = fx * cam[:, 0] / cam[:, 2] + cx
                pv = fy * cam[:, 1] / cam[:, 2] + cy
                u0, u1 = max(0, int(np.floor(pu.min())) - 1), min(width, int(np.ceil(pu.max())) + 2)
                v0, v1 = max(0, int(np.floor(pv.min())) - 1), min(height, int(np.ceil(pv.max())) + 2)
                if u0 >= u1 or v0 >= v1:
                    continue
            sl = (slice(v0, v1), slice(u0, u1))
            c, s = np.float32(brot[0, 0]), np.float32(brot[1, 0])
            dx, dy = dw[0][sl], dw[1][sl]
            d_local = (dx * c + dy * s, dy * c - dx * s, dw[2][sl])
            o_local = (eye - self.centers[b]) @ brot
            half = self.halves[b]
            b_in, b_out = _slab(o_local.astype(np.float32), d_local, half.astype(np.float32))
            zv = zbuf[sl]
            hit = (b_in <= b_out) & (b_in > NEAR) & (b_in < zv)
            if not hit.any():
                continue
            th = b_in[hit]
            zv[hit] = th
            box[sl][hit] = b
            if shading:  # entry face of the hit pixels: the local coordinate closest to its bound
                p = np.stack([o_local[k] + th * d_local[k][hit] for k in range(3)], 1)
                axis = np.argmax(np.abs(p) / half, axis=1)
                positive = np.take_along_axis(p, axis[:, None], 1)[:, 0] > 0
                code[sl][hit] = (2 * axis + positive).astype(np.int8)
        object_id = np.where(box >= 0, self.box_object[np.maximum(box, 0)],
                             self.room_faces.ravel()[code]).astype(np.int64)
        object_id[box == -2] = -1
        if not shading:
            return Render(depth=zbuf, object_id=object_id, normal=None, points=None)
        normal = self._normal_table().astype(np.float32)[box + 1, code]
        finite = np.isfinite(zbuf)
        t = np.where(finite, zbuf, np.float32(np.nan))
        points = np.stack([np.float32(eye[k]) + t * dw[k] for k in range(3)], -1)
        return Render(depth=zbuf, object_id=object_id, normal=normal, points=points)

    def colors(self, points: np.ndarray, normals: np.ndarray, object_id: np.ndarray) -> np.ndarray:
        """Shaded float RGB of surface points (0 where object_id < 0)."""
        albedo = self.albedo.astype(points.dtype)[np.maximum(object_id, 0)]
        albedo[object_id < 0] = 0.0
        pts = np.where(np.isfinite(points), points, 0.0).astype(points.dtype)
        return shade(pts, normals, albedo)

    # ------------------------------------------------------------------ surfaces
    def faces(self) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray, float, float, np.ndarray]]:
        """Visible-candidate rectangles: (object id, centre, u axis, v axis, half u, half v, normal).

        Room surfaces face inwards; box faces face outwards; faces lying on the room shell (backs on
        walls, bottoms on the floor) and bottoms of boxes resting on something are left out.
        """
        out = []
        for axis in range(3):
            for side, sgn in ((0, -1.0), (1, 1.0)):
                normal = -sgn * self.room_rot[:, axis]
                center = self.room_center + sgn * self.room_half[axis] * self.room_rot[:, axis]
                a, b = [k for k in range(3) if k != axis]
                out.append((int(self.room_faces[axis, side]), center, self.room_rot[:, a],
                            self.room_rot[:, b], self.room_half[a], self.room_half[b], normal))
        for i in range(len(self.yaws)):
            rot, c, h = self.rotations[i], self.centers[i], self.halves[i]
            for axis in range(3):
                for sgn in (-1.0, 1.0):
                    if axis == 2 and sgn < 0 and self.resting[i]:
                        continue
                    normal = sgn * rot[:, axis]
                    center = c + sgn * h[axis] * rot[:, axis]
                    q = (center - self.room_center) @ self.room_rot
                    if np.any(np.abs(q) >= self.room_half - 1e-4):
                        continue
                    a, b = [k for k in range(3) if k != axis]
                    out.append((int(self.box_object[i]), center, rot[:, a], rot[:, b], h[a], h[b], normal))
        return out

    def surface_grid(self, spacing: float, patch: float = 0.5, jitter: np.random.Generator | None = None
                     ) -> Surface:
        """Triangulated grids on every surface (vertex spacing about `spacing` metres).

        `patch` sets the size of the over-segmentation cells (ScanNet-like segments). With `jitter`,
        vertices move randomly within their cell (point-cloud sampling, used for S3DIS).
        """
        xyz, nrm, obj, seg, tris = [], [], [], [], []
        offset = 0
        for f, (oid, center, ua, va, hu, hv, normal) in enumerate(self.faces()):
            nu = max(2, int(np.ceil(2 * hu / spacing)) + 1)
            nv = max(2, int(np.ceil(2 * hv / spacing)) + 1)
            su = np.linspace(-hu, hu, nu)
            sv = np.linspace(-hv, hv, nv)
            gu, gv = np.meshgrid(su, sv, indexing="ij")
            gu, gv = gu.ravel(), gv.ravel()
            if jitter is not None:
                gu = np.clip(gu + jitter.uniform(-0.5, 0.5, gu.shape) * 2 * hu / (nu - 1), -hu, hu)
                gv = np.clip(gv + jitter.uniform(-0.5, 0.5, gv.shape) * 2 * hv / (nv - 1), -hv, hv)
            pts = center + gu[:, None] * ua + gv[:, None] * va
            xyz.append(pts)
            nrm.append(np.broadcast_to(normal, pts.shape))
            obj.append(np.full(len(pts), oid))
            pu = np.minimum(((gu + hu) / patch).astype(np.int64), 999)
            pv = np.minimum(((gv + hv) / patch).astype(np.int64), 999)
            seg.append(f * 1_000_000 + pu * 1000 + pv)
            i, j = np.meshgrid(np.arange(nu - 1), np.arange(nv - 1), indexing="ij")
            a = (i * nv + j).ravel() + offset
            b, c = a + 1, a + nv
            d = c + 1
            if np.dot(np.cross(ua, va), normal) >= 0:
                tri = np.concatenate([np.stack([a, c, b], 1), np.stack([b, c, d], 1)])
            else:
                tri = np.concatenate([np.stack([a, b, c], 1), np.stack([b, d, c], 1)])
            tris.append(tri)
            offset += len(pts)
        xyz_all = np.concatenate(xyz)
        nrm_all = np.concatenate(nrm)
        obj_all = np.concatenate(obj)
        # segment id = smallest vertex index in the segment (as ScanNet's segmentator writes them)
        _, inverse = np.unique(np.concatenate(seg), return_inverse=True)
        first = np.full(inverse.max() + 1, len(inverse))
        np.minimum.at(first, inverse, np.arange(len(inverse)))
        return Surface(xyz=xyz_all, normal=nrm_all, object_id=obj_all, segment=first[inverse],
                       faces=np.concatenate(tris).astype(np.int32))


@dataclass
class Render:
    """One rendered view: z-depth (inf = no hit), object ids (-1 = none), normals and 3D hit points."""

    depth: np.ndarray
    object_id: np.ndarray
    normal: np.ndarray
    points: np.ndarray


@dataclass
class Surface:
    """Sampled surfaces: vertices with normals, object ids, segment ids and triangles."""

    xyz: np.ndarray  # float64 [N,3]
    normal: np.ndarray  # float64 [N,3]
    object_id: np.ndarray  # int64 [N]
    segment: np.ndarray  # int64 [N]
    faces: np.ndarray  # int32 [M,3]
