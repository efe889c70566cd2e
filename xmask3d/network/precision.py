"""Frozen weights stored in the autocast dtype, so autocast does not copy them on every forward.

Under autocast every convolution and linear layer casts its float32 weight and bias to bfloat16
on every call. Autocast caches those casts only for leaf tensors that require grad, so the frozen
Stable Diffusion UNet, VAE and CLIP image tower (1.25 B parameters in the `paper` preset) are
copied again in every training step: one copy kernel per weight tensor and 2 bytes written per
parameter. A frozen weight never changes, so it can be cast once: the layer then receives the
bfloat16 tensor autocast would have made (the same round-to-nearest-even conversion), so the
results are bit-identical and the copies disappear (``benchmarks/bench_frozen_casts.py``).

Only weights the autocast policy casts anyway are stored in the low dtype: those of ``nn.Linear``,
``nn.Conv1d/2d/3d`` and the input projection of ``nn.MultiheadAttention``. Normalisation weights,
embeddings and every trainable parameter stay float32. A layer whose weight was cast must run
under autocast of that dtype; outside it a float32 input would meet a bfloat16 weight, so
:class:`FrozenWeights` puts the original float32 tensors back around validation and at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

MATMUL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def frozen_matmul_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights and biases autocast casts on every call, of the layers with no trainable
    parameter (every parameter of the layer has ``requires_grad`` False)."""
    found: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, MATMUL_LAYERS):
            params = [p for p in (module.weight, module.bias) if p is not None]
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            params = [p for p in (module.in_proj_weight, module.in_proj_bias) if p is not None]
        else:
            continue
        if params and not any(p.requires_grad for p in params):
            found.extend(params)
    return found


class FrozenWeights:
    """A model's frozen conv/linear weights, switched between the autocast dtype (:meth:`lowered`,
    around steps that run under ``torch.autocast(dtype=dtype)``) and their exact original values.

    The originals are kept once, in host memory (the ``paper`` preset: 1.25 B parameters, 4.7 GiB
    per process), so the device holds only the low-precision copy while steps run and switching
    back restores the very values the model was built or loaded with.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self.params = frozen_matmul_weights(model)
        self.originals = [p.detach().to("cpu", copy=True) for p in self.params]
        names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        self.names = [names[id(p)] for p in self.params]

    def original_state(self) -> dict[str, torch.Tensor]:
        """State-dict entries (parameter name -> original tensor, host memory) for a checkpoint
        written while the weights are lowered: checkpoints always hold the original values."""
        return dict(zip(self.names, self.originals, strict=True))

    def lower(self) -> int:
        """Store every frozen weight in the low dtype, in place (the Parameter objects stay the
        same) -> how many tensors changed dtype."""
        changed = 0
        for p in self.params:
            if p.dtype != self.dtype:
                p.data = p.data.to(self.dtype)
                changed += 1
        return changed

    def restore(self) -> None:
        """Put the original tensors back (dtype and values)."""
        for p, original in zip(self.params, self.originals, strict=True):
            p.data = original.to(p.device, copy=True)

    @contextmanager
    def lowered(self) -> Iterator[int]:
        """Low dtype inside the block, the originals again on exit (also on an error); yields
        how many tensors were cast."""
        try:
            yield self.lower()
        finally:
            self.restore()
