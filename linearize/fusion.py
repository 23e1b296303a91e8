"""Projections that read the same input, as one matrix product: fewer kernel launches per decoded token.

At batch 1 a decode step is launch-bound (benchmarks/RESULTS.md, "Decode against the compiled teacher"): every
layer runs q, k, v, gate and up as five small matrix products over the same hidden state. `fuse_projections`
stacks them in place into `qkv_proj` (Phi-3's layout, which the adapters already read) and `gate_up_proj`, so a
layer launches two instead of five. It is for inference: the stacked weights replace the originals (no copy kept),
so a fused model cannot be trained or saved in its checkpoint's layout; save it first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .adapters import FUSED_QKV, adapter_for, decoder_layers
from .convert import is_converted
from .errors import LinearizeError
from .kinds.base import LinearizedAttention


class GateUpMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up stacked in one `gate_up_proj` (the gated MLP of every adapter row)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_up_proj = stack_linears([mlp.gate_proj, mlp.up_proj])
        self.down_proj, self.act_fn = mlp.down_proj, mlp.act_fn

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def stack_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the outputs of `linears` side by side (a missing bias counts as zeros)."""
    w = torch.cat([lin.weight for lin in linears], dim=0)
    out = nn.Linear(w.shape[1], w.shape[0], bias=any(lin.bias is not None for lin in linears), device=w.device, dtype=w.dtype)
    out.weight.data = w
    if out.bias is not None:
        out.bias.data = torch.cat([lin.bias if lin.bias is not None else w.new_zeros(lin.out_features) for lin in linears])
    return out


@torch.no_grad()
def fuse_projections(model: nn.Module) -> nn.Module:
    """Stack, in place, each converted layer's q/k/v into `qkv_proj` and each gated MLP's gate/up into
    `gate_up_proj`; returns the model. Outputs are unchanged (up to the summation order of a matrix product)."""
    if not is_converted(model):
        raise LinearizeError("fuse_projections takes a model converted with linearize.convert (its layers read qkv_proj)")
    adapter = adapter_for(model.config.linearize["base_model_type"])
    attns = [layer.self_attn for layer in decoder_layers(model) if isinstance(layer.self_attn, LinearizedAttention)
             and not adapter.fused_qkv and not hasattr(layer.self_attn, FUSED_QKV)]
    mlps = [layer for layer in decoder_layers(model) if adapter.gated_mlp and not isinstance(layer.mlp, GateUpMLP)]
    linears = [getattr(a, n) for a in attns for n in ("q_proj", "k_proj", "v_proj")]
    linears += [getattr(layer.mlp, n) for layer in mlps for n in ("gate_proj", "up_proj")]
    odd = sorted({type(lin).__name__ for lin in linears if type(lin) is not nn.Linear})
    if odd:  # a LoRA or quantized layer: stacking its base weight alone would drop the rest silently
        raise LinearizeError(f"fuse_projections stacks plain nn.Linear projections, not {', '.join(odd)}: merge the "
                             "adapters first (merge_and_unload) or decode without fusing")
    for attn in attns:
        setattr(attn, FUSED_QKV, stack_linears([attn.q_proj, attn.k_proj, attn.v_proj]))
        del attn.q_proj, attn.k_proj, attn.v_proj
    for layer in mlps:
        layer.mlp = GateUpMLP(layer.mlp)
    model.fused_projections = True
    return model
