"""One training step and what it needs: the batch transfer, the optimizer, gradient clipping, and
the one transfer of the logged values to the host.

Kept apart from the loop (``xmask3d.engine.train``) so the step imports only torch: the step
benchmark (benchmarks/bench_step.py) runs on a GPU machine without the tracking and storage stack.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, dict[str, Any], int], Mapping[str, torch.Tensor]]

# Batch keys that stay on the host: the per-sample layout (cumulative point counts) and which
# samples carry a 2D label image, read on the host without a device read.
HOST_KEYS = frozenset({"offset", "has_label_2d"})


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors to `device` (non-blocking: the loader pins them when the device is a GPU), in the
    dtypes the loader made (the model casts at its inputs); ``HOST_KEYS`` of a mapping stay."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: v if k in HOST_KEYS else to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch


def build_optimizer(groups: list[dict[str, Any]], betas: tuple[float, float] = (0.9, 0.999),
                    weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with the fused kernel: one kernel for every parameter, and no per-parameter host
    reads of the step counters as the for-loop implementation does."""
    return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, fused=True)


@torch.no_grad()
def clip_gradients(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients so their global L2 norm is at most `max_norm` (as
    ``torch.nn.utils.clip_grad_norm_``) with multi-tensor kernels on every device; -> the norm
    before clipping, a device tensor (nothing is read on the host)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def train_step(model: nn.Module, batch: Any, epoch: int, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
               *, device: torch.device, grad_clip: float = 0.0, amp: bool = False
               ) -> dict[str, torch.Tensor]:
    """One optimisation step: batch to the device, forward + losses (bf16 autocast with `amp`),
    backward, optional clipping, optimizer step.

    -> {"loss/<term>": value, "grad_norm": ...} as detached 0-d device tensors: the step reads
    nothing on the host (a GPU never waits for Python), the caller transfers them with
    :func:`host_values` every ``log_every`` steps.
    """
    with torch.profiler.record_function("step/transfer"):
        batch = to_device(batch, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
    with autocast:
        losses = loss_fn(model, batch, epoch)
    with torch.profiler.record_function("step/backward"):
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
    values = {f"loss/{k}": v.detach() for k, v in losses.items()}
    with torch.profiler.record_function("step/optimizer"):
        if grad_clip > 0:
            values["grad_norm"] = clip_gradients([p for g in optimizer.param_groups for p in g["params"]],
                                                 grad_clip)
        optimizer.step()
    return values


def host_values(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Device scalars -> Python floats in one transfer (one host synchronisation)."""
    if not values:
        return {}
    numbers = torch.stack([v.float().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, numbers, strict=True))
