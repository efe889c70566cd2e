"""The assembled model: shapes per preset, losses, gradients vs frozen parts, determinism,
evaluation outputs and gating, parameter groups, model-summary."""

import math
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from tests.model.synthetic_batch import make_batch
from xmask3d.cli import app
from xmask3d.network.config import PRESETS, clean, preset, text_dim
from xmask3d.network.losses import compute_losses, loss_weights
from xmask3d.network.model import build_model, parameter_counts, parameter_groups, summary

DIM = 384  # MiniLM text space of tiny/small
BASE = 4


@pytest.fixture(scope="module")
def batch():
    return make_batch(views=2, points=1200, num_base=BASE, text_dim=DIM, seed=3)


def tiny_model(seed=0, **cfg_changes):
    torch.manual_seed(seed)
    cfg = replace(preset("tiny"), **cfg_changes)
    return build_model(cfg, DIM)


def base_text(seed=1):
    return torch.nn.functional.normalize(
        torch.randn(BASE, DIM, generator=torch.Generator().manual_seed(seed)), dim=-1
    )


def test_tiny_forward_shapes_and_every_loss_term(batch):
    model = tiny_model()
    n, b = len(batch["uv"]), 2
    q = model.cfg.mask_generator.num_queries
    out = model(batch, base_text(), epoch=100)
    assert out["pred_logits"].shape == (b, q, BASE + 1)
    assert out["pred_masks"].shape == (b, q, *model.cfg.mask_generator.mask_size)
    assert len(out["aux"]) == model.cfg.mask_generator.decoder_layers
    for key in ("feats_3d", "feats_2d", "feats_fused"):
        assert out[key].shape == (n, DIM)
    assert out["logits_3d_fused"].shape == (n, BASE + 1)  # paper: null column (Q11)
    assert out["binary_logit"].shape == (n,) and out["global_3d"].shape == (b, DIM)
    assert out["point_probs"].shape == (n, q) and out["mask_clip"].shape == (b, q, DIM)
    assert torch.equal(out["covered"], out["point_mask"] >= 0)
    losses = compute_losses(out, batch, model.cfg.loss, epoch=100)
    weights = loss_weights(model.cfg.loss, len(out["aux"]))
    assert set(losses) == set(weights) | {"total"}
    assert all(torch.isfinite(v) for v in losses.values())
    want = sum(weights[k] * losses[k] for k in weights)
    assert torch.allclose(losses["total"], want)
    # caption loss: the last view has no caption, so only view 0 counts
    mean0 = out["feats_3d"][batch["batch_index"] == 0].mean(0)
    expect = 1 - torch.nn.functional.cosine_similarity(mean0, batch["caption"][0], dim=0)
    assert torch.allclose(losses["loss_explicit_contra_3d"], expect, atol=1e-5)


def test_before_contra_epoch_no_maskclip_and_zero_regularisation(batch):
    model = tiny_model()
    out = model(batch, base_text(), epoch=0)
    assert "mask_clip" not in out
    losses = compute_losses(out, batch, model.cfg.loss, epoch=0)
    assert float(losses["loss_3d_contra"].detach()) == 0.0
    with pytest.raises(ValueError, match="MaskCLIP"):  # a loss config that disagrees with the forward
        compute_losses(out, batch, model.cfg.loss, epoch=100)


def test_gradients_reach_trainable_groups_and_never_frozen_weights(batch):
    model = tiny_model()
    with torch.no_grad():  # open the tanh gates so the 3D condition path carries gradient
        model.mask_generator.alpha_cond.fill_(0.5)
        model.mask_generator.alpha_time.fill_(0.5)
    out = model(batch, base_text(), epoch=100)
    compute_losses(out, batch, model.cfg.loss, epoch=100)["total"].backward()
    frozen = [p for m in model.frozen_modules().values() for p in m.parameters()]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    frozen_ids = {id(p) for p in frozen}
    trainable = [(n, p) for n, p in model.named_parameters() if id(p) not in frozen_ids]
    assert all(p.requires_grad for _, p in trainable)
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, missing
    for part in (
        "backbone3d.unet",
        "backbone3d.implicit",
        "binary_head",
        "mask_generator.context_proj",
        "mask_generator.decoder",
        "classifier",
        "merger",
    ):
        grads = [p.grad.abs().sum() for n, p in trainable if n.startswith(part)]
        assert grads and sum(grads) > 0, part
    groups = parameter_groups(model)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups)) == len(trainable)
    assert not frozen_ids & set(in_groups)
    assert {id(p) for p in groups[0]["params"]} == {
        id(p) for m in (model.backbone3d, model.binary_head) for p in m.parameters()
    }


def test_forward_is_deterministic_with_a_seed(batch):
    runs = []
    for _ in range(2):
        model = tiny_model(seed=7)
        torch.manual_seed(11)
        out = model(batch, base_text(), epoch=100)
        runs.append((out, compute_losses(out, batch, model.cfg.loss, epoch=100)))
    (a, la), (b, lb) = runs
    for key in ("pred_masks", "feats_fused", "binary_logit", "mask_clip"):
        assert torch.equal(a[key], b[key]), key
    assert all(torch.equal(la[k], lb[k]) for k in la)
    other = tiny_model(seed=8)(batch, base_text(), epoch=100)
    assert not torch.equal(other["feats_3d"], a["feats_3d"])


def test_infer_outputs_and_binary_gating(batch):
    model = tiny_model().eval()
    all_text = torch.nn.functional.normalize(torch.randn(6, DIM), dim=-1)
    is_base = torch.tensor([True, True, False, True, False, True])
    out = model.infer(batch, all_text, is_base)
    n, q = len(batch["uv"]), model.cfg.mask_generator.num_queries
    assert out["feats_fused"].shape == (n, DIM) and out["mask_clip"].shape == (2, q, DIM)
    assert out["mask_logits"].shape == (2, q, 7)
    assert ((out["point_mask"] >= -1) & (out["point_mask"] < q)).all()
    assert torch.equal(out["covered"], out["point_mask"] >= 0)
    assert math.isclose(out["logit_scale"], 1 / 0.07, rel_tol=1e-5)
    # gating: base-like masks lose the novel columns, novel-like ones the base + null columns
    base_like = out["mask_binary"] > model.cfg.binary_2d_thresh
    blocked = out["mask_logits"] <= -1e9
    assert torch.equal(blocked[..., :6][base_like], (~is_base).expand(int(base_like.sum()), -1))
    assert blocked[..., 6][~base_like].all() and not blocked[..., 6][base_like].any()
    # a covered point's mask covers at least one point of its view (dropped queries never win)
    covered = out["point_mask"] >= 0
    assert out["mask_keep"][batch["batch_index"][covered], out["point_mask"][covered]].all()
    # uncovered points keep the 3D feature
    assert torch.equal(out["feats_fused"][~covered], out["feats_3d"][~covered])
    ungated = model.infer(batch, all_text)
    assert (ungated["mask_logits"] > -1e9).all()


def test_fusion_switch_and_clean_options(batch):
    model = tiny_model(fusion=False)
    assert model.merger is None
    out = model(batch, base_text())
    assert torch.equal(out["feats_fused"], out["feats_3d"])
    cleaned = clean(preset("tiny"))
    assert cleaned.loss.mask_selection == "scores" and not cleaned.loss.ce_null_column
    assert not cleaned.loss.null_segment and preset("paper").loss.mask_selection == "labels"
    out = build_model(cleaned, DIM)(batch, base_text())
    assert out["logits_3d_pure"].shape[-1] == BASE  # no null column


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_on_meta_and_count_parameters(name):
    """small/paper are only built (on the meta device): their CPU forward is too heavy for a unit test."""
    table = summary(name)
    assert "sd_unet" in table and "total" in table
    if name == "paper":
        assert text_dim(preset(name).text_encoder) == 768
        assert "859,520,964" in table  # SD 1.x UNet
        assert "303,966,208" in table  # CLIP ViT-L/14 image tower
    else:
        assert preset(name).text_encoder == "minilm"


def test_tiny_counts_trainable_and_frozen():
    counts = parameter_counts(tiny_model())
    assert counts["sd_unet"][0] == 0 and counts["sd_unet"][1] > 0
    assert counts["clip_image"][0] == 0 and counts["backbone3d"][1] == 0
    assert counts["mask_generator_head"][0] > 0


def test_model_summary_command():
    result = CliRunner().invoke(app, ["model-summary", "--preset", "tiny"])
    assert result.exit_code == 0 and "backbone3d" in result.output
    bad = CliRunner().invoke(app, ["model-summary", "--preset", "huge"])
    assert bad.exit_code == 2


@pytest.mark.slow
def test_small_forward_backward_shapes(batch):
    """The small preset on CPU (about 5 s for one step on one loaded core)."""
    torch.manual_seed(0)
    model = build_model("small", DIM)
    out = model(batch, base_text(), epoch=100)
    q = model.cfg.mask_generator.num_queries
    assert out["pred_masks"].shape == (2, q, 64, 64) and out["mask_clip"].shape == (2, q, DIM)
    losses = compute_losses(out, batch, model.cfg.loss, epoch=100)
    losses["total"].backward()
    assert torch.isfinite(losses["total"])
    assert model.backbone3d.head.weight.grad is not None and model.mask_generator.alpha_cond.grad is not None


@pytest.mark.slow
def test_tiny_overfits_one_batch(batch):
    """20 AdamW steps on one batch: every supervised head learns (3D CE, masks, binary, regulariser)."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(parameter_groups(model, lr_3d=3e-3, lr_other=1e-3))
    history = []
    for _ in range(20):
        out = model(batch, base_text(), epoch=100)
        losses = compute_losses(out, batch, model.cfg.loss, epoch=100)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    first, last = history[0], history[-1]
    assert last["total"] < 0.6 * first["total"]
    assert last["loss_3d_pure"] < 0.2 * first["loss_3d_pure"]
    assert last["loss_ce"] < 0.5 * first["loss_ce"] and last["loss_binary"] < 0.5 * first["loss_binary"]
    assert any(h["loss_3d_contra"] > 0 for h in history)  # masks got selected and regularised
