"""Caption JSON reading and embedding: missing captions are listed, never invented."""

import json

import numpy as np
import pytest

from preprocessing.captions import embed_captions, load_captions, scene_captions
from preprocessing.text import build_text_encoder
from storage.errors import InputError


def test_load_and_select_scene_captions(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"scene0000_00": {"0": "a sofa by a wall", "40": "a table"}}))
    caps = load_captions(path)
    assert caps == {"scene0000_00": {0: "a sofa by a wall", 40: "a table"}}
    texts, missing = scene_captions(caps, "scene0000_00", [0, 20, 40])
    assert texts == ["a sofa by a wall", "", "a table"] and missing == [20]
    with pytest.raises(InputError, match="no captions for scene scene0001_00"):
        scene_captions(caps, "scene0001_00", [0], source=path)


@pytest.mark.parametrize("content, message", [
    (None, "caption file not found"),
    ("{not json", "not a valid caption JSON"),
    ("[1, 2]", "expected an object"),
    ('{"s": {"x": "t"}}', "not an integer"),
    ('{"s": {"1": 3}}', "not a string"),
    ('{"s": "text"}', "must map frame indices"),
])
def test_bad_caption_files(tmp_path, content, message):
    path = tmp_path / "captions.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        load_captions(path)
    assert str(path) in str(info.value)


def test_embed_captions_zero_rows_for_missing_and_batches_agree():
    enc = build_text_encoder("openclip-tiny")
    texts = ["a chair", "", "a lamp", "a bed", "  "]
    out = embed_captions(texts, enc, batch_size=2)
    assert out.dtype == np.float16 and out.shape == (5, 64)
    assert not out[1].any() and not out[4].any()
    whole = embed_captions(texts, enc, batch_size=64)
    assert not whole[1].any() and not whole[4].any()  # exact: a missing caption is a zero row
    # other batch sizes may round differently (BLAS paths), then float16: agree to its precision
    np.testing.assert_allclose(out.astype(np.float32), whole.astype(np.float32), rtol=0, atol=2e-3)
    np.testing.assert_allclose(out[0], enc.encode(["a chair"])[0].numpy(), atol=2e-3)
