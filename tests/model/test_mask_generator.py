"""The 2D mask generator (tiny preset): shapes, gradients, the alpha = 0 identity, loading, determinism."""

import json
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from storage.errors import InputError
from xmask3d.network.clip import ClipConfig, ClipImageTower
from xmask3d.network.mask_generator import (
    FEATURE_TAPS,
    MaskClassifier,
    MaskGenerator,
    MaskGeneratorConfig,
    mask_generator_preset,
    tap_modules,
)

COND, EMBED = 16, 24


def _tiny(**overrides) -> MaskGenerator:
    torch.manual_seed(0)
    return MaskGenerator(replace(MaskGeneratorConfig.tiny(), **overrides), cond_dim=COND, embed_dim=EMBED)


@pytest.fixture(scope="module")
def gen() -> MaskGenerator:
    return _tiny()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 240, 320, generator=g), torch.randn(2, COND, generator=g)


def test_tiny_shapes(gen, batch):
    images, g3d = batch
    out = gen(images, g3d)
    cfg = gen.cfg
    assert cfg.mask_size == (16, 16)
    assert out["pred_masks"].shape == (2, cfg.num_queries, 16, 16)
    assert out["mask_embed"].shape == (2, cfg.num_queries, EMBED)
    assert len(out["aux"]) == cfg.decoder_layers  # initial prediction + all layers but the last
    for aux in out["aux"]:
        assert aux["pred_masks"].shape == out["pred_masks"].shape
        assert aux["mask_embed"].shape == out["mask_embed"].shape
    levels = gen.multiscale_features(gen.extract_features(images, g3d))
    assert {s: tuple(x.shape) for s, x in levels.items()} == {
        4: (2, 32, 16, 16),
        8: (2, 32, 8, 8),
        16: (2, 32, 4, 4),
        32: (2, 32, 2, 2),
    }


def test_gradients_reach_trainable_parts_only():
    gen = _tiny()
    with torch.no_grad():  # open the tanh gates so the condition projections get gradient too
        gen.alpha_cond.fill_(0.5)
        gen.alpha_time.fill_(0.5)
    clf = MaskClassifier(EMBED)
    torch.manual_seed(0)
    tower = ClipImageTower(ClipConfig.tiny(), EMBED)
    images, g3d = torch.rand(2, 3, 64, 64), torch.randn(2, COND, requires_grad=True)
    out = gen.train()(images, g3d)
    target = tower.mask_embed(images, out["pred_masks"].detach())
    text = torch.randn(5, EMBED)
    loss = clf.logits(out["mask_embed"], text).logsumexp(-1).mean()
    loss = loss + (1 - torch.cosine_similarity(out["mask_embed"], target, dim=-1)).mean()
    loss = loss + sum(a["pred_masks"].sigmoid().mean() + a["mask_embed"].pow(2).mean() for a in out["aux"])
    loss = loss + out["pred_masks"].sigmoid().mean()
    loss.backward()

    assert not gen.unet.training and not gen.vae.training and not tower.visual.training
    for name, p in gen.named_parameters():
        if name.startswith(("unet.", "vae.")):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None, name
    for name, p in tower.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    for mod in (gen.context_proj, gen.time_proj, gen.pixel_decoder, gen.decoder, gen.projections):
        assert sum(p.grad.abs().sum() for p in mod.parameters()) > 0
    assert gen.alpha_cond.grad.abs().sum() > 0 and gen.alpha_time.grad.abs().sum() > 0
    assert clf.logit_scale.grad is not None and clf.null_embed.grad is not None
    assert g3d.grad.abs().sum() > 0  # back through the frozen UNet to the 3D branch


def test_alpha_zero_leaves_the_unet_unchanged(gen):
    """With the gates at 0 the conditioned UNet equals the plain SD UNet fed E("")."""
    plain = UNet2DConditionModel(**gen.cfg.unet).eval()
    plain.load_state_dict(gen.unet.state_dict())
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(2, 4, 8, 8, generator=g)
    g3d = torch.randn(2, COND, generator=g)
    t = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        ref = plain(latent, t, encoder_hidden_states=gen.empty_context.expand(2, -1, -1)).sample
        ctx, temb = gen.condition(g3d)
        out = gen.unet(latent, t, encoder_hidden_states=ctx, class_labels=temb).sample
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        # ... so the tapped features do not depend on the 3D feature at all
        images = torch.rand(2, 3, 64, 64, generator=g)
        f1 = gen.extract_features(images, g3d)
        f2 = gen.extract_features(images, torch.randn(2, COND, generator=g))
        for a, b in zip(f1, f2, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("gate", ["alpha_cond", "alpha_time"])
def test_each_gate_conditions_the_unet(gate, batch):
    gen = _tiny()
    with torch.no_grad():
        getattr(gen, gate).fill_(1.0)
        images, g3d = batch
        f1 = gen.extract_features(images, g3d)
        f2 = gen.extract_features(images, -g3d)
    unet_taps = [i for i, m in enumerate(gen.taps) if any(m is x for x in gen.unet.modules())]
    assert len(unet_taps) == 4
    for i in range(len(f1)):
        same = torch.equal(f1[i], f2[i])
        assert same != (i in unet_taps)  # the VAE features are unconditioned


def test_aspect_preserving_image_size(batch):
    """Q10 off: a 4:3-shaped input size gives 4:3 masks."""
    gen = _tiny(image_size=(64, 128))
    out = gen(*batch)
    assert out["pred_masks"].shape == (2, 8, 16, 32)
    assert gen.noise.shape == (1, 4, 8, 16)


def test_no_condition_option_has_no_condition_modules(batch):
    gen = _tiny(implicit_condition=False)
    assert not hasattr(gen, "context_proj") and gen.unet.config.class_embed_type is None
    out = gen(*batch)
    assert out["pred_masks"].shape == (2, 8, 16, 16)


def test_noise_option(gen, batch):
    images, g3d = batch
    with torch.no_grad():
        clean = _tiny(noise="none").extract_features(images, g3d)
        noisy = gen.extract_features(images, g3d)
    # the fixed seed-42 noise only changes the UNet input (VAE taps come first in FEATURE_TAPS)
    torch.testing.assert_close(clean[0], noisy[0])
    assert not torch.equal(clean[3], noisy[3])
    with pytest.raises(InputError):
        _tiny(noise="random").extract_features(images, g3d)


def test_deterministic_with_a_seed(batch):
    images, g3d = batch
    with torch.no_grad():
        a = _tiny()(images, g3d)
        b = _tiny()(images, g3d)
    torch.testing.assert_close(a["pred_masks"], b["pred_masks"], atol=0, rtol=0)
    torch.testing.assert_close(a["mask_embed"], b["mask_embed"], atol=0, rtol=0)


def _write_text_encoder(root, dim: int):
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(root / "tokenizer")
    torch.manual_seed(5)
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
    )
    model = CLIPTextModel(cfg).eval()
    model.save_pretrained(root / "text_encoder")
    return model, vocab


def test_save_from_pretrained_round_trip(tmp_path, batch):
    text_model, vocab = _write_text_encoder(tmp_path, 16)
    paths = dict(text_encoder_path=str(tmp_path / "text_encoder"), tokenizer_path=str(tmp_path / "tokenizer"))
    src = _tiny(**paths)
    src.unet.save_pretrained(tmp_path / "unet")
    src.vae.save_pretrained(tmp_path / "vae")
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["block_out_channels"] == [8, 8, 16, 16]

    cfg = MaskGeneratorConfig.paper(tmp_path)  # the SD folder layout
    assert cfg.unet_path == str(tmp_path / "unet")
    torch.manual_seed(123)  # a different random init of everything that is not loaded
    loaded = MaskGenerator(
        replace(
            MaskGeneratorConfig.tiny(),
            **{k: getattr(cfg, k) for k in ("unet_path", "vae_path", "text_encoder_path", "tokenizer_path")},
        ),
        cond_dim=COND,
        embed_dim=EMBED,
    )
    for (name, a), b in zip(src.unet.state_dict().items(), loaded.unet.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    for a, b in zip(src.vae.state_dict().values(), loaded.vae.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not loaded.unet.training and not any(p.requires_grad for p in loaded.unet.parameters())

    # E("") is the text encoder's output for [BOS, EOS, pad...]
    ids = torch.full((1, 77), vocab["<|endoftext|>"])
    ids[0, 0] = vocab["<|startoftext|>"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.empty_context, text_model(input_ids=ids).last_hidden_state)

    trainable = {k: v for k, v in src.state_dict().items() if not k.startswith(("unet.", "vae."))}
    loaded.load_state_dict(trainable, strict=False)
    images, g3d = batch
    with torch.no_grad():
        a, b = src(images, g3d), loaded(images, g3d)
    torch.testing.assert_close(a["pred_masks"], b["pred_masks"], atol=0, rtol=0)
    torch.testing.assert_close(a["mask_embed"], b["mask_embed"], atol=0, rtol=0)


def test_bad_inputs(tmp_path, gen):
    with pytest.raises(InputError, match="preset"):
        mask_generator_preset("huge")
    with pytest.raises(InputError, match="config.json"):
        MaskGenerator(replace(MaskGeneratorConfig.tiny(), unet_path=str(tmp_path)), COND, EMBED)
    with pytest.raises(InputError, match="multiple of 64"):
        MaskGenerator(replace(MaskGeneratorConfig.tiny(), image_size=(96, 64)), COND, EMBED)
    with pytest.raises(InputError, match="global_3d"):
        gen(torch.rand(2, 3, 64, 64), torch.randn(2, COND + 1))


def test_presets():
    paper = mask_generator_preset("paper")
    assert paper.unet["block_out_channels"] == (320, 640, 1280, 1280)
    assert paper.unet["cross_attention_dim"] == 768 and paper.image_size == (512, 512)
    assert (paper.num_queries, paper.hidden_dim, paper.pixel_decoder_layers, paper.decoder_layers) == (
        50,
        256,
        6,
        9,
    )
    assert paper.mask_size == (128, 128) and paper.feature_channels == 512 and paper.noise == "fixed"
    assert mask_generator_preset("small").image_size == (256, 256)


@pytest.mark.slow
def test_small_preset_forward_backward():
    torch.manual_seed(0)
    gen = MaskGenerator(mask_generator_preset("small"), cond_dim=32, embed_dim=48)
    out = gen(torch.rand(1, 3, 240, 320), torch.randn(1, 32))
    assert out["pred_masks"].shape == (1, 50, 64, 64) and out["mask_embed"].shape == (1, 50, 48)
    assert len(out["aux"]) == 6
    out["mask_embed"].sum().backward()
    assert gen.alpha_cond.grad is not None and all(p.grad is None for p in gen.unet.parameters())


def test_paper_taps_are_the_official_features():
    """SD 1.x layout (built on the meta device: no memory): tapped channels as spec §3."""
    cfg = mask_generator_preset("paper")
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**cfg.unet), AutoencoderKL(**cfg.vae)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert [m.in_channels for m in tap_modules(unet, vae)] == [512, 512, 512, 640, 512, 960, 1920, 2560]
    assert [s for *_, s in FEATURE_TAPS] == [4, 4, 8, 8, 8, 16, 32, 32]


def test_classifier_logits():
    text = torch.randn(4, EMBED)
    clf = MaskClassifier(EMBED, null_init=text[0])
    torch.testing.assert_close(clf.null_embed.data[0], text[0])
    assert clf.scale.item() == pytest.approx(1 / 0.07)
    emb = torch.randn(2, 3, EMBED)
    logits = clf.logits(emb, text)
    assert logits.shape == (2, 3, 5)
    assert clf.logits(emb, text, with_null=False).shape == (2, 3, 4)
    cos = torch.cosine_similarity(emb[:, :, None], text[None, None], dim=-1)
    torch.testing.assert_close(logits[..., :4], cos / 0.07, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[..., 4], logits[..., 0])  # null initialised to text[0]
    torch.testing.assert_close(clf.point_logits(emb[0], text), logits[0])
    with torch.no_grad():
        clf.logit_scale.fill_(10.0)
    assert clf.scale.item() == 100.0
