"""Point -> pixel projection: hand-built geometry, equality with OpenScene's mapper, CSR invariants."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preprocessing.projection import (
    Correspondences,
    default_margin,
    openscene_mapping,
    prepare_points,
    project_points,
)

W, H = 320, 240
K = np.array([[300.0, 0, 159.5], [0, 300.0, 119.5], [0, 0, 1]], np.float32)


def pixel_to_world(u, v, z, k=K):
    """Camera at the origin looking along +z (identity pose): the 3D point seen at pixel (u, v)."""
    return np.array([(u - k[0, 2]) * z / k[0, 0], (v - k[1, 2]) * z / k[1, 1], z], np.float32)


def wall_depth(z=2.0):
    return np.full((1, H, W), z, np.float32)


def test_point_behind_wall_is_occluded_and_point_on_wall_visible():
    xyz = np.stack([pixel_to_world(100, 80, 2.0),   # on the wall
                    pixel_to_world(100, 80, 3.5),   # behind the wall, same pixel
                    pixel_to_world(200, 150, 1.8),  # slightly in front (within tau * depth)
                    pixel_to_world(60, 60, 1.0)])   # far in front of the wall: fails the depth test
    corr = project_points(xyz, np.eye(4, dtype=np.float32)[None], K, wall_depth())
    point, uv = corr.frame(0)
    assert point.tolist() == [0, 2]
    assert uv.tolist() == [[100, 80], [200, 150]]  # (column, row)


def test_invalid_depth_and_points_behind_camera_are_not_visible():
    depth = wall_depth()
    depth[0, 80, 100] = 0.0
    behind = -pixel_to_world(150, 100, 2.0)  # projects into the image with negative z
    xyz = np.stack([pixel_to_world(100, 80, 2.0), behind, pixel_to_world(150, 100, 2.0)])
    corr = project_points(xyz, np.eye(4, dtype=np.float32)[None], K, depth)
    assert corr.frame(0)[0].tolist() == [2]


def test_margin_default_scales_with_width_and_excludes_border():
    assert default_margin(320) == 10
    assert default_margin(640) == 20
    xyz = np.stack([pixel_to_world(9, 100, 2.0), pixel_to_world(10, 100, 2.0),
                    pixel_to_world(309, 100, 2.0), pixel_to_world(310, 100, 2.0),
                    pixel_to_world(100, 229, 2.0), pixel_to_world(100, 230, 2.0)])
    corr = project_points(xyz, np.eye(4, dtype=np.float32)[None], K, wall_depth())
    assert corr.frame(0)[0].tolist() == [1, 2, 4]
    assert project_points(xyz, np.eye(4)[None], K, wall_depth(), margin=0).frame(0)[0].tolist() \
        == [0, 1, 2, 3, 4, 5]


def test_per_frame_intrinsics_and_pose_are_used():
    xyz = pixel_to_world(100, 80, 2.0)[None]
    k2 = K.copy()
    k2[0, 0] = k2[1, 1] = 200.0
    pose = np.eye(4, dtype=np.float32)
    pose[0, 3] = 0.1  # camera moved 10 cm along x: the point moves left in the image
    poses = np.stack([np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32), pose])
    corr = project_points(xyz, poses, np.stack([K, k2, K]), np.repeat(wall_depth(), 3, axis=0))
    x, y, z = xyz[0]
    expected_k2 = [round(x * 200 / z + 159.5), round(y * 200 / z + 119.5)]
    expected_moved = [round((x - 0.1) * 300 / z + 159.5), 80]
    assert [corr.frame(i)[1].tolist() for i in range(3)] == [[[100, 80]], [expected_k2], [expected_moved]]


def random_scene(rng, n, f):
    """Points in a 4 m box seen by cameras inside it; depth = nearest point per pixel."""
    xyz = rng.uniform(-2, 2, (n, 3)).astype(np.float32)
    poses = []
    for _ in range(f):
        angle = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
        pose = np.eye(4)
        pose[:3, :3] = rot
        pose[:3, 3] = rng.uniform(-0.5, 0.5, 3) - 2.5 * rot[:, 2]
        poses.append(pose)
    poses = np.stack(poses).astype(np.float32)
    depths = np.zeros((f, H, W), np.float32)
    for i in range(f):
        m = openscene_mapping(poses[i].astype(np.float64), xyz.astype(np.float64), np.full((H, W), 100.0),
                              K.astype(np.float64), 0, vis_thres=1.0)
        w2c = np.linalg.inv(poses[i].astype(np.float64))
        z = (xyz @ w2c[:3, :3].T + w2c[:3, 3])[:, 2]
        seen = (m[:, 2] == 1) & (z > 0)
        d = np.full((H, W), np.inf)
        np.minimum.at(d, (m[seen, 0], m[seen, 1]), z[seen])
        depths[i] = np.where(np.isfinite(d), d, 0)
    return xyz, poses, depths


def assert_equal_to_openscene(xyz, poses, intrinsics, depths, corr, margin=10, tau=0.25):
    for i in range(len(poses)):
        ref = openscene_mapping(poses[i].astype(np.float64), xyz.astype(np.float64), depths[i],
                                intrinsics[i].astype(np.float64), margin, tau)
        idx = np.flatnonzero(ref[:, 2])
        point, uv = corr.frame(i)
        np.testing.assert_array_equal(point, idx)
        np.testing.assert_array_equal(uv[:, 0], ref[idx, 1])
        np.testing.assert_array_equal(uv[:, 1], ref[idx, 0])


def test_identical_to_openscene_mapper_on_a_random_scene():
    rng = np.random.default_rng(0)
    xyz, poses, depths = random_scene(rng, 20000, 6)
    ks = np.repeat(K[None], 6, axis=0)
    ks[3, 0, 0] = 250.0
    corr = project_points(xyz, poses, ks, depths, frame_batch=4)
    assert corr.offsets[-1] > 1000
    assert_equal_to_openscene(xyz, poses, ks, depths, corr)


def test_prepared_points_give_the_same_result_and_batches_concatenate():
    rng = np.random.default_rng(1)
    xyz, poses, depths = random_scene(rng, 3000, 5)
    whole = project_points(xyz, poses, K, depths)
    prepared = prepare_points(xyz, chunk_size=64)
    parts = [project_points(prepared, poses[i:i + 2], K, depths[i:i + 2]) for i in range(0, 5, 2)]
    joined = Correspondences.concat(parts)
    for a, b in ((whole.offsets, joined.offsets), (whole.point, joined.point), (whole.uv, joined.uv)):
        np.testing.assert_array_equal(a, b)


def test_empty_inputs():
    corr = project_points(np.zeros((0, 3), np.float32), np.eye(4)[None], K, wall_depth())
    assert corr.offsets.tolist() == [0, 0] and corr.point.dtype == np.int32
    corr = project_points(np.ones((5, 3), np.float32), np.zeros((0, 4, 4)), K, np.zeros((0, H, W)))
    assert corr.offsets.tolist() == [0]


def test_rejects_non_finite_poses():
    pose = np.eye(4)[None].copy()
    pose[0, 0, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        project_points(np.ones((5, 3), np.float32), pose, K, wall_depth())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 400), f=st.integers(1, 4),
       tau=st.sampled_from([0.05, 0.25, 1.0]), chunk=st.sampled_from([8, 64, 1024]))
def test_csr_invariants_and_reference_equality(seed, n, f, tau, chunk):
    rng = np.random.default_rng(seed)
    xyz, poses, depths = random_scene(rng, n, f)
    ks = np.repeat(K[None], f, axis=0)
    corr = project_points(prepare_points(xyz, chunk_size=chunk), poses, ks, depths, depth_tolerance=tau)
    assert corr.offsets.dtype == np.int64 and corr.point.dtype == np.int32 and corr.uv.dtype == np.uint16
    assert corr.offsets[0] == 0 and corr.offsets[-1] == len(corr.point) == len(corr.uv)
    assert (np.diff(corr.offsets) >= 0).all()
    assert ((corr.point >= 0) & (corr.point < n)).all()
    for i in range(f):
        point, uv = corr.frame(i)
        assert (np.diff(point) > 0).all()  # sorted, no duplicates
        assert ((uv[:, 0] >= 10) & (uv[:, 0] < W - 10) & (uv[:, 1] >= 10) & (uv[:, 1] < H - 10)).all()
    assert_equal_to_openscene(xyz, poses, ks, depths, corr, tau=tau)
