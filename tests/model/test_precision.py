"""Frozen conv/linear weights stored in bf16 under autocast: same numbers, no per-step copies.

CPU autocast (bf16) applies the same policy to convolutions and linear layers as CUDA autocast,
so the 2D branch of the `tiny` model (random SD UNet + VAE + CLIP tower) checks on CPU that the
cast changes nothing autocast computes and removes the copies of frozen weights.
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from xmask3d.engine.train import DistInfo, TrainConfig, fit
from xmask3d.network.model import build_model
from xmask3d.network.precision import FrozenWeights, frozen_matmul_weights


class CopyCounter(TorchDispatchMode):
    """Counts dtype copies (``aten::_to_copy``) of the tensors in `watched` and of all tensors."""

    def __init__(self, watched: list[torch.Tensor]):
        super().__init__()
        self.watched = {t.data_ptr() for t in watched}
        self.of_watched = 0
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.total += 1
            self.of_watched += args[0].data_ptr() in self.watched
        return func(*args, **(kwargs or {}))


def test_only_layers_without_trainable_parameters_are_selected():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(3, 3, 1),
                          nn.MultiheadAttention(4, 2, batch_first=True))
    model[1].requires_grad_(False)
    model[2].requires_grad_(False)
    model[3].requires_grad_(False)
    model[4].requires_grad_(False)
    half_frozen = nn.Linear(4, 4)
    half_frozen.bias.requires_grad_(False)
    model.append(half_frozen)
    selected = {id(p) for p in frozen_matmul_weights(model)}
    expected = {id(model[1].weight), id(model[1].bias), id(model[3].weight), id(model[3].bias),
                id(model[4].in_proj_weight), id(model[4].in_proj_bias), id(model[4].out_proj.weight),
                id(model[4].out_proj.bias)}
    assert selected == expected  # not the trainable Linear, the LayerNorm, or a half-trainable layer


def test_the_original_tensors_come_back_even_after_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).half()).requires_grad_(False)
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    frozen = FrozenWeights(model, torch.bfloat16)
    with pytest.raises(RuntimeError, match="inside"), frozen.lowered() as cast:
        assert cast == 4
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert not torch.equal(model[0].weight.float(), values[0])  # bf16 rounded the float32 values
        raise RuntimeError("inside")
    assert [p.dtype for p in model.parameters()] == [torch.float32] * 2 + [torch.float16] * 2
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values, strict=True))  # exact values


def test_original_state_names_the_state_dict_entries_with_their_original_values():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Conv2d(3, 3, 1)))
    model[1].requires_grad_(False)
    expected = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("1.")}
    frozen = FrozenWeights(model, torch.bfloat16)
    with frozen.lowered():
        assert model.state_dict()["1.0.weight"].dtype == torch.bfloat16
        saved = frozen.original_state()
    assert set(saved) == set(expected) == {"1.0.weight", "1.0.bias"}
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], expected[k]) for k in saved)


def _two_d_branch_step(model, images, dim):
    """Forward + backward of the 2D branch (mask generator, MaskCLIP) under CPU bf16 autocast."""
    g3 = torch.randn(2, dim, generator=torch.Generator().manual_seed(1)).requires_grad_()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.mask_generator(images, g3)
        clip = model.clip.mask_embed(images, out["pred_masks"].detach())
    (out["pred_masks"].float().square().mean() + out["mask_embed"].float().square().mean()).backward()
    grads = [p.grad.clone() for p in model.mask_generator.parameters() if p.grad is not None]
    return [out["pred_masks"].detach().clone(), out["mask_embed"].detach().clone(), clip, g3.grad], grads


def test_tiny_2d_branch_is_bit_identical_and_stops_copying_frozen_weights():
    torch.manual_seed(0)
    dim = 384
    model = build_model("tiny", dim).train()
    images = torch.rand(2, 3, 120, 160, generator=torch.Generator().manual_seed(2))
    frozen = frozen_matmul_weights(model)
    assert len(frozen) > 100  # the UNet, VAE and CLIP tower layers

    reference, reference_grads = _two_d_branch_step(model, images, dim)
    with CopyCounter(frozen) as before:
        _two_d_branch_step(model, images, dim)
    with FrozenWeights(model, torch.bfloat16).lowered():
        cast_out, cast_grads = _two_d_branch_step(model, images, dim)
        with CopyCounter(frozen) as after:
            _two_d_branch_step(model, images, dim)
    # the cast is the conversion autocast made on every call: the same bits come out
    for ref, got in zip(reference, cast_out, strict=True):
        assert torch.equal(ref, got)
    assert len(reference_grads) == len(cast_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(reference_grads, cast_grads, strict=True))
    assert before.of_watched > 100
    assert after.of_watched == 0
    assert after.total <= before.total - before.of_watched
    assert {p.dtype for p in model.parameters()} == {torch.float32}


class _Points(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randn(3, generator=torch.Generator().manual_seed(i))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast training runs on CUDA only")
def test_fit_with_amp_runs_steps_on_bf16_frozen_weights_and_restores_them(tmp_path):
    model = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 1))
    model[0].requires_grad_(False)
    frozen_values = model[0].weight.detach().clone()
    seen: list[torch.dtype] = []

    def loss_fn(m, batch, epoch):
        seen.append(m[0].weight.dtype)
        return {"loss": m(batch).float().square().mean()}

    cfg = TrainConfig(epochs=1, loop=1, batch_size=2, amp=True, num_workers=0, checkpoint_every=0,
                      warmup_iters=0)
    fit(model, _Points(), torch.stack, loss_fn, cfg, is_3d=lambda name: False, checkpoint_dir=tmp_path,
        info=DistInfo(device=torch.device("cuda")))
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert model[0].weight.dtype == torch.float32
    assert torch.equal(model[0].weight.cpu(), frozen_values)
