"""MaskCLIP image tower: mask-token semantics and loading from local open_clip checkpoints."""

import copy
import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from storage.errors import InputError
from xmask3d.network.clip import TINY_CLIP_CFG, ClipConfig, ClipImageTower, clip_preset

EMBED = 24


@pytest.fixture(scope="module")
def tower() -> ClipImageTower:
    torch.manual_seed(0)
    return ClipImageTower(ClipConfig.tiny(), EMBED)


def _half_masks(b: int) -> torch.Tensor:
    """Logits at the tower size (32x32, patch 8): q0 everything, q1 nothing, q2 the left half."""
    m = torch.full((b, 3, 32, 32), -10.0)
    m[:, 0] = 10.0
    m[:, 2, :, :16] = 10.0
    return m


def test_full_mask_token_is_the_image_embedding(tower):
    images = torch.rand(2, 3, 240, 320)
    emb = tower.mask_embed(images, _half_masks(2))
    assert emb.shape == (2, 3, EMBED)
    torch.testing.assert_close(emb[:, 0], tower.encode_image(images), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(emb[:, 1], emb[:, 0], atol=1e-3)  # empty mask: only the class token
    assert not torch.allclose(emb[:, 2], emb[:, 0], atol=1e-3)


def test_mask_tokens_do_not_see_each_other(tower):
    images = torch.rand(1, 3, 32, 32)
    masks = _half_masks(1)
    all_three = tower.mask_embed(images, masks)
    for q in range(3):
        alone = tower.mask_embed(images, masks[:, q : q + 1])
        torch.testing.assert_close(alone[:, 0], all_three[:, q], atol=1e-5, rtol=1e-5)


def test_mask_token_ignores_patches_outside_its_mask():
    """With one layer a mask token reads only the class token and its own patches (deeper towers
    mix the outside in through the image tokens, as the official MaskCLIP)."""
    cfg = copy.deepcopy(TINY_CLIP_CFG)
    cfg["vision_cfg"]["layers"] = 1
    torch.manual_seed(0)
    tower = ClipImageTower(ClipConfig(model_name="", model_cfg=cfg), EMBED)
    images = torch.rand(1, 3, 32, 32)
    perturbed = images.clone()
    perturbed[..., 16:] = torch.rand(1, 3, 32, 16)  # the right half: outside mask 2
    a = tower.mask_embed(images, _half_masks(1))
    b = tower.mask_embed(perturbed, _half_masks(1))
    torch.testing.assert_close(a[:, 2], b[:, 2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a[:, 1], b[:, 1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-4)


def test_patch_masks_and_attention_mask(tower):
    logits = torch.full((1, 2, 64, 64), -10.0)
    logits[0, 0, :20, :20] = 10.0  # covers part of patches (0,0),(0,1),(1,0),(1,1) -> max-pool keeps them
    pm = tower.patch_masks(logits)
    assert pm.shape == (1, 2, 16)
    assert pm[0, 0].view(4, 4)[:2, :2].all() and pm[0, 0].sum() == 4 and not pm[0, 1].any()
    blocked = tower.attention_mask(pm)
    q = 2
    assert blocked.shape == (1, q + 1 + 16, q + 1 + 16)
    assert blocked[0, :, :q].all()  # nobody attends to mask tokens
    assert not blocked[0, q:, q:].any()  # image tokens attend as usual
    assert not blocked[0, :q, q].any()  # mask tokens always see the class token
    torch.testing.assert_close(blocked[0, 0, q + 1 :], ~pm[0, 0])


def test_frozen(tower):
    assert all(not p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.visual.training
    out = tower.mask_embed(torch.rand(1, 3, 32, 32), _half_masks(1))
    assert not out.requires_grad


def _tiny_clip() -> open_clip.CLIP:
    torch.manual_seed(7)
    return open_clip.CLIP(**{**copy.deepcopy(TINY_CLIP_CFG), "embed_dim": EMBED}).eval()


def test_checkpoint_file_round_trip(tmp_path):
    model = _tiny_clip()
    path = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(99)  # the tower must not keep its own random init
    tower = ClipImageTower(
        ClipConfig(model_name="", model_cfg=copy.deepcopy(TINY_CLIP_CFG), checkpoint=str(path)), EMBED
    )
    images = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        expected = model.encode_image(tower._prepare(images))
    torch.testing.assert_close(tower.encode_image(images), expected, atol=0, rtol=0)


def test_local_dir_round_trip(tmp_path):
    model = _tiny_clip()
    cfg = {**copy.deepcopy(TINY_CLIP_CFG), "embed_dim": EMBED}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file(model.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    tower = ClipImageTower(ClipConfig(checkpoint=str(tmp_path)), EMBED)
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = model.encode_image(tower._prepare(images))
    torch.testing.assert_close(tower.encode_image(images), expected, atol=0, rtol=0)
    with pytest.raises(InputError, match="output dim"):
        ClipImageTower(ClipConfig(checkpoint=str(tmp_path)), EMBED + 1)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(InputError, match="not found"):
        ClipImageTower(ClipConfig.paper(tmp_path / "missing.bin"), 768)
    with pytest.raises(InputError, match="open_clip_config.json"):
        ClipImageTower(ClipConfig(checkpoint=str(tmp_path)), EMBED)
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(InputError, match="weights"):
        ClipImageTower(ClipConfig(checkpoint=str(tmp_path)), EMBED)
    save_file(_tiny_clip().state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(InputError, match="model_cfg"):  # config without the model_cfg key
        ClipImageTower(ClipConfig(checkpoint=str(tmp_path)), EMBED)
    with pytest.raises(InputError, match="preset"):
        clip_preset("huge")
    with pytest.raises(InputError, match="open_clip model"):
        ClipImageTower(ClipConfig(model_name="ViT-Q-99"), EMBED)


def test_paper_preset_is_vit_l14():
    cfg = clip_preset("paper")
    assert cfg.model_name == "ViT-L-14-quickgelu" and cfg.model_cfg is None
    vision = open_clip.get_model_config(cfg.model_name)["vision_cfg"]
    assert (vision["image_size"], vision["patch_size"], vision["width"], vision["layers"]) == (
        224,
        14,
        1024,
        24,
    )
