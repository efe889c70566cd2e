"""The project's model loader never runs code from a checkpoint (docs/training.md, "Loading a
registered model safely"): a checkpoint whose pickle calls a function is refused, nothing runs."""

from __future__ import annotations

import os

import pytest
import torch

from storage.errors import InputError
from xmask3d.engine.checkpoint import FORMAT, load_checkpoint


class Payload:
    """Unpickling this calls os.mkdir(marker): the side effect shows whether code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoint_with_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "last.pt"
    torch.save({"format": FORMAT, "model": {}, "extra": Payload(str(marker))}, path)
    with pytest.raises(InputError, match=f"{path}: not a readable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what an unrestricted unpickler does with the same file
    assert marker.is_dir()
