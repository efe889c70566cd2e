"""The streaming .sens reader on files written byte by byte with struct (preprocessing/scannet/sens.py)."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from preprocessing.scannet import sens
from preprocessing.scannet.sens import SensReader, rescale_intrinsic
from storage.errors import InputError

COLOR = (64, 48)
DEPTH = (32, 24)
K_COLOR = np.array([[58.0, 0, 31.5, 0], [0, 57.0, 23.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
K_DEPTH = np.array([[29.0, 0, 15.5, 0], [0, 28.5, 11.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)


def jpeg(i, size=COLOR):
    """Left half red, right half a per-frame shade of blue."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2] = (200, 30, 30)
    a[:, size[0] // 2:] = (20, 40, 100 + 10 * i)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_frames(n, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        pose = np.eye(4, dtype=np.float32)
        pose[:3, 3] = rng.normal(size=3)
        depth = rng.integers(0, 5000, size=(DEPTH[1], DEPTH[0]), dtype=np.uint16)
        frames.append({"pose": pose, "color": jpeg(i), "depth": zlib.compress(depth.tobytes()), "raw": depth})
    return frames


def write_sens(path, frames, version=4, num_frames=None, color_size=COLOR, depth_size=DEPTH, shift=1000.0):
    """A .sens file in the official layout (ScanNet SensReader/sensorData.h)."""
    name = b"StructureSensor"
    with open(path, "wb") as f:
        f.write(struct.pack("<IQ", version, len(name)) + name)
        for m in (K_COLOR, np.eye(4, dtype=np.float32), K_DEPTH, np.eye(4, dtype=np.float32)):
            f.write(struct.pack("<16f", *m.ravel()))
        f.write(struct.pack("<iiIIIIfQ", 2, 1, *color_size, *depth_size, shift,
                            len(frames) if num_frames is None else num_frames))
        offsets = []
        for i, fr in enumerate(frames):
            offsets.append(f.tell())
            f.write(struct.pack("<16f", *fr["pose"].ravel()))
            f.write(struct.pack("<QQQQ", 1000 * i, 1000 * i + 1, len(fr["color"]), len(fr["depth"])))
            f.write(fr["color"] + fr["depth"])
    return offsets


@pytest.fixture
def sens_file(tmp_path):
    frames = make_frames(10)
    path = tmp_path / "scene0000_00.sens"
    offsets = write_sens(path, frames)
    return path, frames, offsets


def expected_depth(raw, size):
    rows = np.minimum(((np.arange(size[1]) + 0.5) * raw.shape[0] / size[1]).astype(int), raw.shape[0] - 1)
    cols = np.minimum(((np.arange(size[0]) + 0.5) * raw.shape[1] / size[0]).astype(int), raw.shape[1] - 1)
    return raw[rows][:, cols] / 1000.0


def test_header(sens_file):
    path, _, _ = sens_file
    r = SensReader(path)
    assert (r.version, r.sensor_name, r.num_frames, r.depth_shift) == (4, "StructureSensor", 10, 1000.0)
    assert (r.color_width, r.color_height, r.depth_width, r.depth_height) == (*COLOR, *DEPTH)
    np.testing.assert_array_equal(r.intrinsic_depth, K_DEPTH)
    np.testing.assert_array_equal(r.intrinsic_color, K_COLOR)
    assert r.intrinsic_depth.dtype == np.float32 and r.extrinsic_depth.shape == (4, 4)


def test_frames_with_step(sens_file, monkeypatch):
    path, frames, _ = sens_file
    r = SensReader(path)
    decoded = []
    original = SensReader._decode_color
    monkeypatch.setattr(SensReader, "_decode_color",
                        lambda self, data, *a: decoded.append(len(data)) or original(self, data, *a))
    out = list(r.frames(step=3, size=(16, 12)))
    assert [f.index for f in out] == [0, 3, 6, 9]
    assert len(decoded) == 4  # skipped frames are seeked over, not decoded
    for f in out:
        np.testing.assert_array_equal(f.pose, frames[f.index]["pose"])
        assert f.color.shape == (12, 16, 3) and f.color.dtype == np.uint8
        assert f.depth.shape == (12, 16) and f.depth.dtype == np.float32
        np.testing.assert_allclose(f.depth, expected_depth(frames[f.index]["raw"], (16, 12)), atol=1e-3)
        assert np.abs(f.color[6, 3].astype(int) - (200, 30, 30)).max() < 25
        assert np.abs(f.color[6, 12].astype(int) - (20, 40, 100 + 10 * f.index)).max() < 25
    assert r.dropped == {}


def test_default_step_and_upscaled_depth(sens_file):
    path, frames, _ = sens_file
    out = list(SensReader(path).frames(size=(64, 48)))
    assert [f.index for f in out] == [0]
    np.testing.assert_allclose(out[0].depth, expected_depth(frames[0]["raw"], (64, 48)), atol=1e-3)


def test_non_finite_pose_is_skipped_and_counted(tmp_path):
    frames = make_frames(6)
    frames[2]["pose"][0, 0] = np.inf
    frames[4]["pose"][1, 3] = np.nan
    write_sens(tmp_path / "a.sens", frames)
    r = SensReader(tmp_path / "a.sens")
    assert [f.index for f in r.frames(step=1)] == [0, 1, 3, 5]
    assert r.dropped == {"non_finite_pose": 2}
    assert [f.index for f in r.frames(step=2)] == [0]  # counts are per call, among stepped frames
    assert r.dropped == {"non_finite_pose": 2}


def test_intrinsic_is_this_files_header_rescaled(sens_file):
    r = SensReader(sens_file[0])
    k = r.intrinsic((64, 48))  # depth 32x24 -> 64x48
    np.testing.assert_allclose(k, [[58.0, 0, 31.5], [0, 57.0, 23.5], [0, 0, 1]])
    official = rescale_intrinsic(np.array([[577.870605, 0, 319.5], [0, 577.870605, 239.5], [0, 0, 1]]),
                                 (640, 480), (320, 240))
    np.testing.assert_allclose(official, [[288.9353, 0, 159.5], [0, 288.9353, 119.5], [0, 0, 1]], rtol=1e-6)
    assert k.dtype == np.float32


def test_truncated_file_names_frame_and_offset_after_yielding_earlier_frames(sens_file):
    path, _, offsets = sens_file
    data = path.read_bytes()
    path.write_bytes(data[: offsets[5] + 200])  # inside frame 5's payload
    got = []
    with pytest.raises(InputError, match=rf"truncated at frame 5 \(byte offset {offsets[5]}\)"):
        for frame in SensReader(path).frames(step=1):
            got.append(frame.index)
    assert got == [0, 1, 2, 3, 4]
    path.write_bytes(data[: offsets[3] + 50])  # inside frame 3's 96-byte header
    with pytest.raises(InputError, match=rf"truncated at frame 3 \(byte offset {offsets[3]}\)"):
        list(SensReader(path).frames(step=1))


def test_wrong_version_zero_frames_and_short_header(tmp_path):
    write_sens(tmp_path / "v3.sens", make_frames(2), version=3)
    with pytest.raises(InputError, match=r"v3\.sens: unsupported \.sens version 3"):
        SensReader(tmp_path / "v3.sens")
    write_sens(tmp_path / "empty.sens", [])
    with pytest.raises(InputError, match=r"empty\.sens: the file holds zero frames"):
        SensReader(tmp_path / "empty.sens")
    (tmp_path / "short.sens").write_bytes(struct.pack("<IQ", 4, 3) + b"abc" + b"\0" * 20)
    with pytest.raises(InputError, match="truncated header"):
        SensReader(tmp_path / "short.sens")
    with pytest.raises(InputError, match="cannot read"):
        SensReader(tmp_path / "missing.sens")


def test_header_sizes_that_disagree_with_payloads(tmp_path):
    write_sens(tmp_path / "d.sens", make_frames(3), depth_size=(40, 30))
    with pytest.raises(InputError, match=r"frame 0 \(byte offset \d+\): depth holds 1536 bytes, header"):
        list(SensReader(tmp_path / "d.sens").frames(step=1))
    write_sens(tmp_path / "c.sens", make_frames(3), color_size=(80, 60))
    with pytest.raises(InputError, match="color image is 64x48, header says 80x60"):
        list(SensReader(tmp_path / "c.sens").frames(step=1))
    write_sens(tmp_path / "n.sens", make_frames(3), num_frames=1 << 40)
    with pytest.raises(InputError, match="truncated at frame 3"):
        list(SensReader(tmp_path / "n.sens").frames(step=1))


def test_corrupt_jpeg_is_skipped_or_strict(tmp_path):
    frames = make_frames(4)
    frames[1]["color"] = b"\x00" * 16 + frames[1]["color"][16:]
    frames[2]["color"] = frames[2]["color"][: len(frames[2]["color"]) // 3]  # truncated JPEG
    write_sens(tmp_path / "j.sens", frames)
    r = SensReader(tmp_path / "j.sens")
    assert [f.index for f in r.frames(step=1)] == [0, 3]
    assert r.dropped == {"corrupt_color": 2}
    with pytest.raises(InputError, match=r"j\.sens: frame 1 \(byte offset \d+\): corrupt color image"):
        list(r.frames(step=1, strict=True))


def test_corrupt_depth_is_skipped(tmp_path):
    frames = make_frames(3)
    frames[1]["depth"] = b"not zlib at all"
    write_sens(tmp_path / "z.sens", frames)
    r = SensReader(tmp_path / "z.sens")
    assert [f.index for f in r.frames(step=1)] == [0, 2]
    assert r.dropped == {"corrupt_depth": 1}


def test_bad_arguments(sens_file):
    r = SensReader(sens_file[0])
    with pytest.raises(InputError, match="frame step"):
        next(r.frames(step=0))
    assert sens.FRAME_HEADER.itemsize == 96


# --- on files written by the synthetic generator -------------------------------------------------


@pytest.fixture(scope="module")
def recorded_scene(tmp_path_factory):
    """One small synthetic scene, with the frames the generator rendered before encoding them."""
    from preprocessing.synthetic import scannet as synth

    scene = synth.scannet_scene(0, 1, small=True)
    rendered = {}
    original = synth.render_frame

    def recording(scene_, index, rng):
        frame = original(scene_, index, rng)
        rendered[index] = (frame.color.copy(), frame.depth_mm.copy())
        return frame

    out = tmp_path_factory.mktemp("recorded_scene")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synth, "render_frame", recording)
        synth.write_scene(scene, out, progress=False)
    return scene, out / f"{scene.scene_id}.sens", rendered


def test_synthetic_header_and_intrinsics(recorded_scene):
    scene, path, _ = recorded_scene
    r = SensReader(path)
    assert r.num_frames == len(scene.poses)
    assert (r.color_width, r.color_height) == scene.size.color
    assert (r.depth_width, r.depth_height) == scene.size.depth
    np.testing.assert_array_equal(r.intrinsic_depth, scene.intrinsic_depth.astype(np.float32))
    np.testing.assert_array_equal(r.intrinsic_color, scene.intrinsic_color.astype(np.float32))
    np.testing.assert_allclose(r.intrinsic(scene.size.depth), scene.intrinsic_depth[:3, :3], rtol=1e-6)
    assert not np.allclose(r.intrinsic_depth, _scene_intrinsic(0))  # per scene, never a constant


def _scene_intrinsic(index):
    from preprocessing.synthetic import scannet_scene

    return scannet_scene(0, index, small=True).intrinsic_depth.astype(np.float32)


def test_synthetic_frames_are_what_the_generator_wrote(recorded_scene):
    scene, path, rendered = recorded_scene
    r = SensReader(path)
    frames = list(r.frames(step=1, size=scene.size.depth))
    invalid = [i for i in range(len(scene.poses)) if not np.isfinite(scene.poses[i]).all()]
    assert invalid and [f.index for f in frames] == [i for i in range(len(scene.poses)) if i not in invalid]
    assert r.dropped == {"non_finite_pose": len(invalid)}
    for f in frames:
        np.testing.assert_array_equal(f.pose, scene.poses[f.index].astype(np.float32))
        assert np.abs(f.depth - rendered[f.index][1] / 1000.0).max() < 1e-3


def test_synthetic_frames_at_colour_size_with_default_step(recorded_scene):
    scene, path, rendered = recorded_scene
    r = SensReader(path)
    frames = list(r.frames(size=scene.size.color))
    expected = [i for i in range(0, len(scene.poses), 20) if np.isfinite(scene.poses[i]).all()]
    assert [f.index for f in frames] == expected
    (w, h), (dw, dh) = scene.size.color, scene.size.depth
    rows = sens.nearest_indices(dh, h)[:, None]
    cols = sens.nearest_indices(dw, w)[None, :]
    for f in frames:
        color, depth_mm = rendered[f.index]
        assert np.abs(f.color.astype(int) - color.astype(int)).mean() < 4  # JPEG quality 90
        np.testing.assert_allclose(f.depth, depth_mm[rows, cols] / 1000.0, atol=1e-3)


def test_corrupted_synthetic_file(recorded_scene, tmp_path):
    _, path, _ = recorded_scene
    data = bytearray(path.read_bytes())
    r = SensReader(path)
    offsets, offset = [], r.frames_offset
    for _ in range(r.num_frames):
        offsets.append(offset)
        cs, ds = struct.unpack_from("<QQ", data, offset + 80)
        offset += 96 + cs + ds
    data[offsets[3] + 96: offsets[3] + 96 + 40] = b"\xff" * 40  # frame 3: JPEG header destroyed
    bad = tmp_path / "bad.sens"
    bad.write_bytes(bytes(data[: offsets[30] + 500]))  # and the file ends inside frame 30
    reader = SensReader(bad)
    got = []
    with pytest.raises(InputError, match=rf"truncated at frame 30 \(byte offset {offsets[30]}\)"):
        for frame in reader.frames(step=1):
            got.append(frame.index)
    assert got == [i for i in range(30) if i not in (3, 13)]
    assert reader.dropped == {"corrupt_color": 1, "non_finite_pose": 1}
