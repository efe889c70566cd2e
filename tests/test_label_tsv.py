"""A label TSV that is not UTF-8 is one clear error naming the file, before any scene is processed."""

from __future__ import annotations

from pathlib import Path

import pytest

from preprocessing import pipeline
from preprocessing.scannet.mesh import read_label_tsv
from storage.errors import InputError

TSV = "id\traw_category\tcategory\n1\twall\twall\n2\tchair\tchair\n"


def test_non_utf8_label_tsv_names_the_file(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_bytes(TSV.replace("chair", "chaise longue \xe9").encode("latin-1"))
    with pytest.raises(InputError, match=rf"{path}: not UTF-8 text \(byte 0xe9 at offset \d+\)") as error:
        read_label_tsv(path)
    assert "\n" not in str(error.value)
    path.write_text(TSV, encoding="utf-8")  # fixed in place: read anew (cached per file version)
    assert read_label_tsv(path) == {"wall": 1, "chair": 2}


def test_prepare_store_fails_once_on_a_bad_tsv_before_writing(synthetic_scannet, tmp_path):
    raw = tmp_path / "raw"
    for path in Path(synthetic_scannet).rglob("*"):
        target = raw / path.relative_to(synthetic_scannet)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.name != "scannetv2-labels.combined.tsv":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    tsv = raw / "scannetv2-labels.combined.tsv"
    tsv.write_bytes((Path(synthetic_scannet) / tsv.name).read_bytes() + "caf\xe9\n".encode("cp1252"))
    store = tmp_path / "s.zarr"
    with pytest.raises(InputError, match=rf"{tsv}: not UTF-8 text"):
        pipeline.prepare_store("scannet", raw, store, pipeline.PreprocessConfig(captions=None))
    assert not store.exists()
