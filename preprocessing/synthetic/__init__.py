"""Synthetic datasets written in the real raw formats (ScanNet v2, Stanford3dDataset_v1.2).

Used by the demo and the tests: every reader in `preprocessing/` is exercised on files that a
third-party tool would read the same way. See docs/synthetic.md.
"""

from preprocessing.synthetic.geometry import RayHits, Render, SceneGeometry, SceneObject, Surface
from preprocessing.synthetic.s3dis import write_s3dis
from preprocessing.synthetic.s3dis_rooms import S3DISRoomSpec, s3dis_room
from preprocessing.synthetic.scannet import ScanNetScene, scannet_scene, write_scannet
from preprocessing.synthetic.sens import SensFrameBytes, SensHeader, encode_color, encode_depth, write_sens

__all__ = [
    "RayHits", "Render", "SceneGeometry", "SceneObject", "Surface", "ScanNetScene", "scannet_scene",
    "write_scannet", "S3DISRoomSpec", "s3dis_room", "write_s3dis", "SensFrameBytes", "SensHeader",
    "encode_color", "encode_depth", "write_sens",
]
