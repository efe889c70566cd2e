"""Component switches (the ablation study): parameters removed, loss terms absent, checkpoints
record the switches and refuse a model with other ones, evaluation rebuilds the recorded model."""

from dataclasses import asdict, replace

import pytest
import torch

from storage.errors import InputError
from tests.model.synthetic_batch import make_batch
from xmask3d.network.config import (
    SWITCHES,
    check_switches,
    model_config_from_dict,
    preset,
    variant_name,
    variant_switches,
    with_switches,
)
from xmask3d.network.losses import compute_losses, loss_weights
from xmask3d.network.model import build_model, trainable_parameters

DIM = 384
BASE = 4

# parameter-name prefixes each switch owns
OWNED = {
    "implicit_condition": ("mask_generator.context_proj.", "mask_generator.alpha_cond",
                           "mask_generator.time_proj.", "mask_generator.alpha_time", "backbone3d.implicit."),
    "fusion": ("merger.",),
    "binary_head": ("binary_head.",),
}


@pytest.fixture(scope="module")
def batch():
    return make_batch(views=2, points=900, num_base=BASE, text_dim=DIM, seed=5)


@pytest.fixture(scope="module")
def full():
    torch.manual_seed(0)
    return build_model(preset("tiny"), DIM)


def text():
    g = torch.Generator().manual_seed(1)
    return torch.nn.functional.normalize(torch.randn(BASE, DIM, generator=g), dim=-1)


def names(model):
    return {n for n, _ in model.named_parameters()}


def test_defaults_are_all_on_and_copied_into_the_parts():
    cfg = preset("tiny")
    assert cfg.switches() == dict.fromkeys(SWITCHES, True)
    off = with_switches(cfg, implicit_condition=False, mask_regularization=False, fusion=False,
                        binary_head=False, caption_losses=False)
    assert off.mask_generator.implicit_condition is False
    assert (off.loss.mask_regularization, off.loss.fusion, off.loss.binary_head, off.loss.caption_losses) == (
        False, False, False, False)
    with pytest.raises(InputError, match="unknown model switch"):
        with_switches(cfg, fuson=False)
    scores = replace(cfg, loss=replace(cfg.loss, mask_selection="scores"))
    with pytest.raises(InputError, match="needs binary_head"):
        with_switches(scores, binary_head=False)
    with_switches(scores, binary_head=False, mask_regularization=False)  # no selection, no conflict


@pytest.mark.parametrize("switch", ["implicit_condition", "fusion", "binary_head"])
def test_switch_off_removes_its_parameters(full, switch):
    torch.manual_seed(0)
    model = build_model(with_switches(preset("tiny"), **{switch: False}), DIM)
    owned = {n for n in names(full) if n.startswith(OWNED[switch])}
    assert owned, f"the full model has no {switch} parameters"
    assert names(model) == names(full) - owned  # removed, and nothing else changed
    removed = sum(p.numel() for n, p in full.named_parameters() if n in owned)
    assert trainable_parameters(model) == trainable_parameters(full) - removed
    assert not any(k.startswith(OWNED[switch]) for k in model.state_dict())


def test_every_switch_off_forward_losses_and_inference(full, batch):
    cfg = with_switches(preset("tiny"), implicit_condition=False, mask_regularization=False, fusion=False,
                        binary_head=False, caption_losses=False)
    torch.manual_seed(0)
    model = build_model(cfg, DIM)
    out = model(batch, text(), epoch=100)  # past contra_start_epoch: the full model would run MaskCLIP
    assert out["binary_logit"] is None and out["global_3d"] is None
    assert "mask_clip" not in out
    assert torch.equal(out["feats_fused"], out["feats_3d"])
    losses = compute_losses(out, batch, model.cfg.loss, epoch=100)
    absent = {"loss_3d", "loss_explicit_contra", "loss_explicit_contra_3d", "loss_explicit_contra_2d_pre",
              "loss_binary", "loss_3d_contra"}
    assert not absent & set(losses)
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_3d_pure", "total"} <= set(losses)
    weights = loss_weights(model.cfg.loss, len(out["aux"]))
    assert set(losses) == set(weights) | {"total"}
    assert torch.allclose(losses["total"], sum(weights[k] * losses[k] for k in weights))
    losses["total"].backward()
    model.eval()
    is_base = torch.tensor([True] * BASE + [False, False])
    all_text = torch.nn.functional.normalize(torch.randn(BASE + 2, DIM), dim=-1)
    inferred = model.infer(batch, all_text, is_base=is_base)
    assert inferred["binary_logit"] is None and inferred["mask_binary"] is None
    assert (inferred["mask_logits"] > -1e9).all()  # nothing gated without the binary head

    full_losses = compute_losses(full(batch, text(), epoch=100), batch, full.cfg.loss, epoch=100)
    assert absent <= set(full_losses)


@pytest.mark.parametrize("switch,terms", [
    ("mask_regularization", {"loss_3d_contra"}),
    ("caption_losses", {"loss_explicit_contra", "loss_explicit_contra_3d", "loss_explicit_contra_2d_pre"}),
])
def test_loss_only_switches_drop_their_terms(switch, terms):
    cfg = with_switches(preset("tiny"), **{switch: False})
    weights = loss_weights(cfg.loss)
    assert not terms & set(weights)
    assert terms <= set(loss_weights(preset("tiny").loss))
    assert cfg.loss.contra_active(1000) is (switch != "mask_regularization")


def test_variant_names_round_trip():
    assert variant_switches("full") == {}
    assert variant_switches("no-fusion") == {"fusion": False}
    both = variant_switches("no-implicit-condition+no-binary-head")
    assert both == {"implicit_condition": False, "binary_head": False}
    assert variant_name(both) == "no-implicit-condition+no-binary-head"
    for bad in ("no-fuson", "fusion", ""):
        with pytest.raises(InputError, match="unknown ablation variant"):
            variant_switches(bad)


def test_model_config_round_trip_and_switch_mismatch():
    cfg = with_switches(preset("tiny"), fusion=False, caption_losses=False)
    recorded = asdict(cfg)
    again = model_config_from_dict(recorded, "ckpt.pt")
    assert again == cfg
    # lists (a JSON round trip) become tuples again
    listed = {**recorded, "backbone": {**recorded["backbone"], "planes": list(cfg.backbone.planes)}}
    assert model_config_from_dict(listed).backbone.planes == cfg.backbone.planes
    with pytest.raises(InputError, match="ckpt.pt: unknown ModelConfig field"):
        model_config_from_dict({**recorded, "wings": True}, "ckpt.pt")
    check_switches(recorded, cfg, "ckpt.pt")
    with pytest.raises(InputError, match=r"ckpt.pt: checkpoint was trained with fusion=off, "
                                         r"caption_losses=off .*the model has fusion=on, caption_losses=on"):
        check_switches(recorded, preset("tiny"), "ckpt.pt")
    old = {k: v for k, v in asdict(preset("tiny")).items() if k not in SWITCHES}
    check_switches(old, preset("tiny"), "old.pt")  # records without switches: everything was on


def test_inference_rebuilds_the_recorded_variant(tmp_path):
    from xmask3d.engine.checkpoint import save_checkpoint
    from xmask3d.engine.predict import load_model_for_inference

    cfg = with_switches(preset("tiny"), fusion=False, binary_head=False)
    torch.manual_seed(3)
    model = build_model(cfg, DIM)
    path = save_checkpoint(tmp_path / "last.pt", {
        "model": model.state_dict(), "preset": "tiny", "benchmark": "scannet20-b15n4",
        "text_encoder": {"name": "minilm", "dim": DIM, "spec": "minilm"}, "model_config": asdict(cfg)})
    loaded = load_model_for_inference(path, device="cpu")
    assert loaded.model.cfg.switches() == cfg.switches()
    assert loaded.model.merger is None and loaded.model.binary_head is None
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_region_captions_variant_part():
    from xmask3d.network.config import variant_supervision

    assert variant_switches("region-captions") == {} and variant_supervision("region-captions") == "region"
    mixed = "region-captions+no-fusion"
    assert variant_switches(mixed) == {"fusion": False} and variant_supervision(mixed) == "region"
    assert variant_name(variant_switches(mixed), variant_supervision(mixed)) == "no-fusion+region-captions"
    assert variant_supervision("no-fusion") is None and variant_name({}, None) == "full"
