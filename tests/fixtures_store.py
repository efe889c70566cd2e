"""Session fixtures with a preprocessed synthetic Zarr store (owned by the storage work)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_store(synthetic_scannet, tmp_path_factory) -> Path:
    """The ``synthetic_scannet`` raw scenes preprocessed into a store (MiniLM view and region
    captions, step 20).

    Built with the plain per-scene function in this process (no Dask cluster), so it is fast.
    Read-only for tests: copy it before writing.
    """
    from preprocessing.pipeline import PreprocessConfig, prepare_store, preprocess_scannet_scene

    store = tmp_path_factory.mktemp("synthetic_store") / "scannet.zarr"
    cfg = PreprocessConfig(captions=Path(synthetic_scannet) / "captions.json", text_encoder="minilm",
                           region_captions=Path(synthetic_scannet) / "region_captions.json",
                           show_progress=False)
    listing, cfg = prepare_store("scannet", Path(synthetic_scannet), store, cfg)
    for scene_id, split in listing.items():
        summary = preprocess_scannet_scene(Path(synthetic_scannet), scene_id, store, cfg, split)
        assert summary.status == "written", summary
    return store
