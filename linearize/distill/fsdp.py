"""Fully sharded data parallel (PyTorch FSDP2) for models that do not fit one GPU.

Chosen by `accelerate launch --config_file configs/accelerate/fsdp.yaml` (which sets
ACCELERATE_USE_FSDP=true) or by setting that variable under `torchrun`. Every decoder layer and
the root are sharded with `fully_shard`; the frozen weights and the LoRA adapters live as shards.
The kinds' new parameters (feature maps, gates, mixing factors: a few MB) are left out of the
sharding and replicated, because stage 1 backpropagates each layer's loss inside that layer's
forward, where FSDP's backward hooks cannot run; the training loop averages their gradients
itself. Checkpoints and the saved model hold full tensors, gathered here, so a run can resume on
another number of processes.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor


def requested() -> bool:
    """True when the launcher asked for FSDP (accelerate's FSDP config sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def shard(model: nn.Module, device: torch.device, replicated: Iterable[nn.Parameter]) -> None:
    """Shard each decoder layer and the root over all processes; `replicated` stay whole on `device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    keep = set(replicated)
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, ignored_params=keep & set(layer.parameters()))
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, ignored_params=keep)
    with torch.no_grad():  # what FSDP leaves alone (the replicated parameters, loose buffers) goes to the device too
        for t in [*model.parameters(), *model.buffers()]:
            if not isinstance(t, DTensor) and t.device != device:
                t.data = t.data.to(device)


def full(t: Tensor) -> Tensor:
    """The whole tensor (a collective for shards: every process must call it in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: Tensor, param: Tensor) -> Tensor:
    """`value` (a whole tensor) placed as `param` is: this process's shard of it if `param` is sharded."""
    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    return value.to(param.device)


def gather_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict with every sharded tensor gathered whole, on the CPU."""
    return {**state, "state": {i: {k: full(v).cpu() if isinstance(v, Tensor) else v for k, v in s.items()}
                               for i, s in state["state"].items()}}


def scatter_optimizer_state(state: dict[str, Any], params: list[Tensor]) -> dict[str, Any]:
    """The inverse of `gather_optimizer_state` for the optimizer over `params` (in its order)."""
    return {**state, "state": {i: {k: like(v, params[int(i)]) if isinstance(v, Tensor) and v.shape == params[int(i)].shape else v
                                   for k, v in s.items()} for i, s in state["state"].items()}}


def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` for a mix of sharded and whole parameters."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.stack([full(torch.linalg.vector_norm(g.float())).to(grads[0].device) for g in grads]).norm()
    total = float(total)
    scale = min(1.0, max_norm / (total + 1e-6))
    for g in grads:
        g.mul_(scale)
    return total
