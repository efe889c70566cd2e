"""Store safety with real processes: two writers, SIGKILL at the overwrite swap and during store
creation, settings changes, stale and live locks (docs/store.md, "Writing")."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from preprocessing.pipeline import PreprocessConfig, complete_scenes, prepare_store, preprocess_scannet_scene
from storage.errors import InputError
from storage.lease import Lease, LeaseHeldError, this_process
from storage.schema import ARRAYS
from storage.store import (
    CLAIM_PREFIX,
    LOCK_NAME,
    NEW_PREFIX,
    create_store,
    open_store,
    recover_store,
    store_lock,
)
from tests.test_store import write_scene

SCENE = "scene0001_00"  # a train scene of the synthetic raw data

PAUSE = """
import os, sys, time
from pathlib import Path
def pause(ready, go):
    Path(ready).write_text(str(os.getpid()))
    while not Path(go).exists():
        time.sleep(0.05)
"""

# preprocess one scene with the plain per-scene function; optionally stop at frame 3 until told
SCENE_SCRIPT = PAUSE + """
from storage.store import SceneWriter
from storage.errors import InputError
from preprocessing.pipeline import PreprocessConfig, preprocess_scannet_scene
raw, store, scene, ready, go = sys.argv[1:6]
if ready != "-":
    added = SceneWriter.add_frame
    def add_then_wait(self, color, depth, labels=None):
        added(self, color, depth, labels)
        if self._frames["count"] == 3:
            self._flush_frames()
            pause(ready, go)
    SceneWriter.add_frame = add_then_wait
try:
    print(preprocess_scannet_scene(Path(raw), scene, Path(store), PreprocessConfig(
        captions=None, show_progress=False), "train").status)
except InputError as error:
    print(error)
    sys.exit(2)
"""

# a whole run (store lock, prepare_store, Dask LocalCluster); optionally stop after prepare_store
RUN_SCRIPT = PAUSE + """
from storage.errors import InputError
from preprocessing import pipeline, run
raw, store, scene, wait, ready, go = sys.argv[1:7]
if ready != "-":
    prepare = pipeline.prepare_store
    def prepare_then_wait(*args, **kwargs):
        out = prepare(*args, **kwargs)
        pause(ready, go)
        return out
    pipeline.prepare_store = prepare_then_wait
try:
    summaries = run.run_preprocess("scannet", Path(raw), Path(store), pipeline.PreprocessConfig(
        captions=None, show_progress=False), scenes=[scene], workers=1, lock_wait_s=float(wait))
except InputError as error:
    print(error)
    sys.exit(2)
print(" ".join(s.status for s in summaries))
"""


def start(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, limit_s: float = 240.0) -> None:
    """Wait until ``proc`` created ``path`` (a synchronisation point, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.communicate()}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, limit_s: float = 300.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=limit_s)
    return proc.returncode, out, err


def assert_whole(store, scene_id: str) -> None:
    """A listed scene holds every array of a ScanNet scene, with lengths that agree with its attrs."""
    scene = store.scene(scene_id)
    n, f = scene.num_points, scene.num_frames
    for name in ("points/xyz", "points/rgb", "points/nyu40", "points/category"):
        assert scene[name].shape[0] == n, name
    for name in ("frames/index", "frames/pose", "frames/intrinsic", "frames/color", "frames/depth",
                 "captions/text", "captions/clip"):
        assert scene[name].shape[0] == f, name
        scene[name][:]  # every chunk is readable
    assert scene["proj/offsets"].shape == (f + 1,)
    assert scene["proj/point"].shape[0] == int(scene["proj/offsets"][-1])


def arrays(scene) -> dict[str, np.ndarray]:
    return {name: scene[name][:] for name in ARRAYS if name in scene}


def assert_same_arrays(a, b) -> None:
    left, right = arrays(a), arrays(b)
    assert left.keys() == right.keys()
    for name in left:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


@pytest.fixture(scope="module")
def reference(synthetic_scannet, tmp_path_factory) -> Path:
    """``SCENE`` preprocessed without captions, frame step 20, in this process (the clean run)."""
    store = tmp_path_factory.mktemp("safety_ref") / "ref.zarr"
    cfg = PreprocessConfig(captions=None, show_progress=False)
    _, cfg = prepare_store("scannet", Path(synthetic_scannet), store, cfg, [SCENE])
    assert preprocess_scannet_scene(Path(synthetic_scannet), SCENE, store, cfg, "train").status == "written"
    return store


# --- two writers ------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_run_fails_naming_the_owner_or_waits_then_skips(synthetic_scannet, reference, tmp_path):
    """Two real runs on one store: the second fails at once with one line naming the store and the
    first run's pid, or (with a wait) runs after it and skips the scene; nothing half-written is listed."""
    store = tmp_path / "s.zarr"
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = start(RUN_SCRIPT, synthetic_scannet, store, SCENE, 0, ready, go)
    wait_for(ready, first)  # the first run holds the lock and has prepared the store
    owner = json.loads((store / LOCK_NAME).read_text())
    assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()

    code, out, err = finish(start(RUN_SCRIPT, synthetic_scannet, store, SCENE, 0, "-", "-"))
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, out + err
    assert str(store) in lines[0] and f"pid {first.pid} on {socket.gethostname()}" in lines[0]
    assert "writer lock is held" in lines[0]

    waiting = start(RUN_SCRIPT, synthetic_scannet, store, SCENE, 600, "-", "-")
    go.write_text("")
    code, out, err = finish(first)
    assert code == 0 and out.splitlines()[-1] == "written", out + err
    code, out, err = finish(waiting)
    assert code == 0 and out.splitlines()[-1] == "skipped", out + err
    opened = open_store(store)
    assert opened.scene_ids() == [SCENE] and not (store / LOCK_NAME).exists()
    assert_whole(opened, SCENE)
    assert_same_arrays(opened.scene(SCENE), open_store(reference).scene(SCENE))


@pytest.mark.slow
def test_two_writers_of_one_scene_cannot_both_win_and_cleanup_spares_a_live_writer(
        synthetic_scannet, reference, tmp_path):
    store = tmp_path / "s.zarr"
    prepare_store("scannet", synthetic_scannet, store, PreprocessConfig(captions=None), [SCENE])
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = start(SCENE_SCRIPT, synthetic_scannet, store, SCENE, ready, go)
    wait_for(ready, first)  # half-way through the scene's frames
    scenes = store / "scenes"
    assert (scenes / SCENE / "frames" / "color").is_dir() and (scenes / f"{CLAIM_PREFIX}{SCENE}").exists()

    code, out, err = finish(start(SCENE_SCRIPT, synthetic_scannet, store, SCENE, "-", "-"))
    assert code == 2 and f"scene {SCENE} is held by pid {first.pid}" in out, out + err
    # a second run's start-up cleanup leaves a live writer's scene alone
    assert recover_store(open_store(store, "r+")) == []
    prepare_store("scannet", synthetic_scannet, store, PreprocessConfig(captions=None), [SCENE])
    assert (scenes / SCENE / "frames" / "color").is_dir() and open_store(store).scene_ids() == []

    go.write_text("")
    code, out, err = finish(first)
    assert code == 0 and out.splitlines()[-1] == "written", out + err
    opened = open_store(store)
    assert opened.scene_ids() == [SCENE]
    assert_same_arrays(opened.scene(SCENE), open_store(reference).scene(SCENE))
    assert sorted(os.listdir(scenes)) == [SCENE, "zarr.json"]


# --- SIGKILL at the overwrite swap ------------------------------------------------------------

SWAP_HOOKS = """
import os, shutil, signal, sys
import storage.store as st
path, point = sys.argv[1:3]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
calls = {"put": 0, "link": 0}
real_put, real_link, real_rmtree = st.put_bytes, os.link, shutil.rmtree
def put(target, data):
    calls["put"] += 1
    if (point, calls["put"]) in (("invalidate", 1), ("final-meta", 2)):
        die()
    real_put(target, data)
def link(src, dst):
    if st.NEW_PREFIX in str(dst) or "scenes" not in str(dst):  # zarr's own exclusive writes
        return real_link(src, dst)
    calls["link"] += 1
    if point == "link" and calls["link"] == 4:
        die()
    real_link(src, dst)
def rmtree(target, *a, **k):
    if point == "cleanup" and calls["put"] == 2 and os.path.basename(target).startswith(st.NEW_PREFIX):
        die()
    real_rmtree(target, *a, **k)
st.put_bytes, os.link, shutil.rmtree = put, link, rmtree  # module-wide: storage.objects calls them
"""
SWAP_SCRIPT = SWAP_HOOKS + """
from storage.store import open_store
from tests.test_store import write_scene
write_scene(open_store(path, "r+"), "scene0000_00", frames=2)
"""


@pytest.mark.parametrize("point", ["invalidate", "link", "final-meta", "cleanup"])
def test_kill_at_the_overwrite_swap_keeps_a_complete_copy_and_the_rerun_finishes_it(tmp_path, point):
    path = tmp_path / "s.zarr"
    write_scene(create_store(path, "scannet", None, 0), "scene0000_00", frames=3)
    expected = create_store(tmp_path / "expected.zarr", "scannet", None, 0)
    write_scene(expected, "scene0000_00", frames=2)
    old = create_store(tmp_path / "old.zarr", "scannet", None, 0)
    write_scene(old, "scene0000_00", frames=3)

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SWAP_SCRIPT), str(path), point],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = open_store(path, "r+")
    new = store.scenes_dir / f"{NEW_PREFIX}scene0000_00"
    # never both copies lost: the listed scene is whole (old or new), or the new copy is complete
    if store.scene_ids():
        scene = store.scene("scene0000_00")
        assert_same_arrays(scene, (expected if scene.num_frames == 2 else old).scene("scene0000_00"))
    else:
        assert point in ("link", "final-meta")
        new_attrs = zarr.open_group(str(new), mode="r").attrs
        assert new_attrs["complete"] is True and new_attrs["num_frames"] == 2

    actions = recover_store(store)
    swapped = [f"finished replacing scene scene0000_00 from {new.name}"]
    assert (actions == swapped) == (point != "cleanup"), actions  # after the swap: only cleanup left
    assert store.scene_ids() == ["scene0000_00"]
    assert_same_arrays(store.scene("scene0000_00"), expected.scene("scene0000_00"))
    assert sorted(os.listdir(store.scenes_dir)) == ["scene0000_00", "zarr.json"]


@pytest.mark.slow
def test_settings_change_rewrites_the_scene_and_a_kill_in_its_swap_is_recovered(
        synthetic_scannet, reference, tmp_path):
    """A scene made with frame step 20 is rewritten (not skipped) by a run with step 10; that run is
    killed in the swap, the next run finishes it, and the run after that skips the scene."""
    raw = Path(synthetic_scannet)
    path = tmp_path / "s.zarr"
    shutil.copytree(reference, path)
    step10 = PreprocessConfig(captions=None, show_progress=False, frame_step=10)
    listing, _ = prepare_store("scannet", raw, path, step10, [SCENE])
    assert complete_scenes("scannet", raw, path, listing, step10) == []  # made with other settings
    assert complete_scenes("scannet", raw, path, listing, PreprocessConfig(captions=None)) == [SCENE]
    store = open_store(path)
    assert store.changed_settings(SCENE, _fingerprint(raw, step10)) == ["frame_step: 20 -> 10"]

    script = SWAP_HOOKS + """
from pathlib import Path
from preprocessing.pipeline import PreprocessConfig, preprocess_scannet_scene
preprocess_scannet_scene(Path(sys.argv[3]), sys.argv[4], path, PreprocessConfig(
    captions=None, show_progress=False, frame_step=10), "train")
"""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(path), "link", str(raw), SCENE],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert open_store(path).scene_ids() == []  # the old copy is invalidated, the new one waits

    prepare_store("scannet", raw, path, step10, [SCENE])  # recovers: the complete new copy goes in
    store = open_store(path)
    assert store.scene_ids() == [SCENE] and store.scene(SCENE).attrs["frame_step"] == 10
    assert_whole(store, SCENE)
    step20 = set(open_store(reference).scene(SCENE)["frames/index"][:].tolist())
    index = store.scene(SCENE)["frames/index"][:].tolist()
    assert step20 < set(index) and all(i % 10 == 0 for i in index) and any(i % 20 for i in index)
    assert preprocess_scannet_scene(raw, SCENE, path, step10, "train").status == "skipped"


def _fingerprint(raw: Path, cfg: PreprocessConfig) -> dict:
    from preprocessing.pipeline import scene_fingerprint

    return scene_fingerprint("scannet", raw, SCENE, "train", cfg)


def test_fingerprint_changes_with_each_setting_and_source_file(synthetic_scannet, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(synthetic_scannet, raw)
    base = _fingerprint(raw, PreprocessConfig(captions=None))
    assert base == _fingerprint(raw, PreprocessConfig(captions=None))
    for change in ({"frame_step": 10}, {"image_size": (160, 120)}, {"margin": 4}, {"depth_tolerance": 0.1},
                   {"captions": raw / "captions.json"}):
        assert _fingerprint(raw, PreprocessConfig(**{"captions": None, **change})) != base, change
    sens = raw / "scans" / SCENE / f"{SCENE}.sens"
    stat = sens.stat()
    os.utime(sens, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = _fingerprint(raw, PreprocessConfig(captions=None))
    assert touched != base and touched["sources"]["sens"][0] == stat.st_size


# --- store creation ---------------------------------------------------------------------------

CREATE_SCRIPT = """
import os, signal, sys
from pathlib import Path
from storage.store import create_store
path, point = Path(sys.argv[1]), sys.argv[2]
real = os.replace
def replace(src, dst):
    dst = Path(dst)
    if dst.name == "zarr.json" and (dst.parent.name == "scenes") == (point == "scenes-meta"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
create_store(path, "scannet", None, 0)
"""


@pytest.mark.parametrize("point", ["scenes-meta", "root-meta"])
def test_kill_during_store_creation_then_rerun_creates_it(tmp_path, point):
    path = tmp_path / "s.zarr"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CREATE_SCRIPT), str(path), point],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (path / "zarr.json").exists()  # the root metadata is written whole or not at all
    with pytest.raises(InputError, match="interrupted store creation"):
        open_store(path)
    store = create_store(path, "scannet", None, 0)
    write_scene(store, "scene0000_00")
    assert open_store(path).scene_ids() == ["scene0000_00"]
    assert not [p for p in path.rglob("*.partial")]


def test_partial_root_from_a_stepwise_create_is_repaired_or_reported(tmp_path):
    # what creating in steps (group first, attrs after) left when killed in between
    path = tmp_path / "s.zarr"
    zarr.open_group(str(path), mode="w-")
    with pytest.raises(InputError, match="interrupted store creation"):
        open_store(path)
    assert create_store(path, "scannet", None, 0).attrs["schema_version"] == 2
    # ... but metadata without schema_version next to scenes is reported, never rewritten
    write_scene(open_store(path, "r+"), "scene0000_00")
    (path / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    before = (path / "zarr.json").read_bytes()
    with pytest.raises(InputError, match="without schema_version.*not touching it"):
        create_store(path, "scannet", None, 0)
    assert (path / "zarr.json").read_bytes() == before


# --- the lock ---------------------------------------------------------------------------------


def test_lock_of_a_killed_process_is_taken_over_and_a_live_one_is_named(tmp_path):
    path = tmp_path / "s.zarr"
    script = ("import os, signal, sys\nfrom storage.store import store_lock\n"
              "with store_lock(sys.argv[1], 'preprocess scannet'):\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL and (path / LOCK_NAME).exists()
    with store_lock(path, "second run") as lease:  # its owner is gone: taken over
        assert json.loads((path / LOCK_NAME).read_text())["token"] == lease.owner.token
        held = f"{path}: the store's writer lock is held by pid {os.getpid()}"
        with pytest.raises(LeaseHeldError, match=held):
            with store_lock(path, "third run"):
                pass
    assert os.listdir(path) == []  # the lock is gone with its owner


def _write_owner(path: Path, **changes) -> None:
    owner = {**this_process("elsewhere").__dict__, **changes}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(owner))


def test_stale_rule_other_host_heartbeat_and_reused_pid(tmp_path):
    lock = tmp_path / "lock"
    _write_owner(lock, host="node-b", pid=4242)  # another host, fresh heartbeat: alive
    with pytest.raises(LeaseHeldError, match="held by pid 4242 on node-b .* after waiting"):
        Lease(lock, "me").acquire(wait_s=0.2, poll_s=0.05)
    _write_owner(lock, host="node-b", pid=4242, heartbeat=time.time() - 3600)  # heartbeat too old
    with Lease(lock, "me") as lease:
        assert json.loads(lock.read_text())["token"] == lease.owner.token
    _write_owner(lock, pid=os.getpid(), pid_start=1)  # this host, our pid, another start time: reused
    with Lease(lock, "me") as lease:
        assert json.loads(lock.read_text())["token"] == lease.owner.token
    assert not lock.exists()


def test_lock_refuses_a_file_or_foreign_directory_without_touching_it(tmp_path):
    target = tmp_path / "file.zarr"
    target.write_text("keep")
    with pytest.raises(InputError, match="is a file"):
        with store_lock(target, "run"):
            pass
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a Zarr store"):
        with store_lock(foreign, "run"):
            pass
    assert target.read_text() == "keep" and os.listdir(foreign) == ["notes.txt"]
