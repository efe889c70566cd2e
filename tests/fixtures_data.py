"""Session fixtures with synthetic raw ScanNet / S3DIS data, written once per test session.

`synthetic_scannet`: 3 small scenes (320x240 color, 160x120 depth), seed 0, in the raw ScanNet v2
layout; scene0000_00 and scene0001_00 are train, scene0002_00 is val.
`synthetic_s3dis`: 3 rooms (Area_1/office_1, Area_5/conferenceRoom_1, Area_1/hallway_1); the
fixture returns the directory that contains `Stanford3dDataset_v1.2`.
Rebuild a scene's geometry and cameras with `preprocessing.synthetic.scannet_scene(0, index)`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SYNTHETIC_SCANNET_SCENES = ("scene0000_00", "scene0001_00", "scene0002_00")
SYNTHETIC_S3DIS_ROOMS = ("Area_1/office_1", "Area_5/conferenceRoom_1", "Area_1/hallway_1")


@pytest.fixture(scope="session")
def synthetic_scannet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a raw ScanNet v2 layout with 3 small synthetic scenes (seed 0)."""
    from preprocessing.synthetic import write_scannet

    root = tmp_path_factory.mktemp("synthetic_scannet")
    write_scannet(root, scenes=3, small=True, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def synthetic_s3dis(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory containing `Stanford3dDataset_v1.2` with 3 synthetic rooms in Area_1 and Area_5."""
    from preprocessing.synthetic import write_s3dis

    root = tmp_path_factory.mktemp("synthetic_s3dis")
    write_s3dis(root, rooms=3, seed=0, progress=False)
    return root
