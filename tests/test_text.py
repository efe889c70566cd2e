"""Text encoders: the packaged MiniLM, the random-init open_clip tiny tower, spec parsing."""

import pytest
import torch

from preprocessing.text import build_text_encoder
from storage.errors import InputError


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm")


def test_minilm_embeds_normalised_deterministic_and_meaningful(minilm):
    out = minilm.encode(["a wooden chair", "an armchair", "the ocean at night", "a wooden chair"])
    assert out.shape == (4, 384) and out.dtype == torch.float32 and minilm.dim == 384
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out[0], out[3])
    assert out[0] @ out[1] > out[0] @ out[2] + 0.2  # real pretrained weights, not random
    assert minilm.encode([]).shape == (0, 384)


def test_openclip_tiny_is_random_init_but_identical_in_every_build(caplog):
    with caplog.at_level("WARNING"):
        a = build_text_encoder("openclip-tiny")
    assert "random-init" in caplog.text
    b = build_text_encoder("openclip-tiny")
    assert a.name == "openclip-tiny" and a.dim == 64 and a.random_init
    x, y = a.encode(["a chair", "a table"]), b.encode(["a chair", "a table"])
    assert x.shape == (2, 64) and torch.allclose(x, y)
    assert not torch.allclose(x[0], x[1])
    assert not any(p.requires_grad for p in a.tower.parameters())


@pytest.mark.parametrize("spec, message", [
    ("bert", "unknown text encoder"),
    ("openclip:ViT-L-14", "openclip:MODEL:CHECKPOINT"),
    ("openclip:ViT-L-14:/nonexistent/clip.bin", "checkpoint not found"),
])
def test_bad_specs_are_input_errors(spec, message):
    with pytest.raises(InputError, match=message):
        build_text_encoder(spec)


@pytest.mark.slow
def test_openclip_loads_real_weights_from_a_local_checkpoint(tmp_path):
    """A checkpoint file (here: a small registered architecture with seeded weights) is loaded with
    open_clip's own loader; a checkpoint of another architecture is refused."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32-alt")
    path = tmp_path / "clip.bin"
    torch.save(model.state_dict(), path)
    enc = build_text_encoder(f"openclip:ViT-S-32-alt:{path}")
    assert enc.name == "openclip:ViT-S-32-alt:clip.bin" and enc.dim == 256 and not enc.random_init
    texts = ["a sofa", "a lamp"]
    expected = model.eval().encode_text(open_clip.get_tokenizer("ViT-S-32-alt")(texts), normalize=True)
    assert torch.allclose(enc.encode(texts), expected, atol=1e-5)
    with pytest.raises(InputError, match="cannot load ViT-S-32 weights"):
        build_text_encoder(f"openclip:ViT-S-32:{path}")
