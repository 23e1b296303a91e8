"""Projections that read the same input, as one matrix product: fewer kernel launches per decoded token.

At batch 1 a decode step is launch-bound (benchmarks/RESULTS.md, "Decode against the compiled teacher"): every
layer runs q, k, v, gate and up as five small matrix products over the same hidden state. `fuse_projections`
stacks them in place into `qkv_proj` (Phi-3's layout, which the adapters already read) and `gate_up_proj`, so a
layer launches two instead of five. It is for inference: the stacked weights replace the originals (no copy kept),
so a fused model cannot be trained or saved in its checkpoint's layout; save it first.

`FusedStep` goes further for graphed decoding (`GraphedDecoder(fused_layers=True)`): one token through every layer on
the skinny kernels (`kernels.dense`): five launches a layer, the kind's step among them: RMSNorm + q/k/v + rotary,
the kind's step, o_proj + residual, RMSNorm + gate/up + SiLU gate, down_proj + residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import FUSED_QKV, adapter_for, decoder_layers
from .convert import is_converted
from .errors import LinearizeError
from .kernels import qkv_rope, rms_linear, rope_tables
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


@dataclass
class _Layer:
    """One decoder layer as `FusedStep` reads it: the attention (for its mixer) and the dense weights."""

    attn: LinearizedAttention
    norm1: tuple[Tensor, float]  # RMSNorm weight and epsilon
    qkv: tuple[Tensor, Tensor | None]  # weight [(H + 2 Hk) D, C] and bias
    qk_norm: tuple[Tensor, float] | None  # [2, D]: q's and k's per-head norm weights (Qwen3)
    o: tuple[Tensor, Tensor | None]
    norm2: tuple[Tensor, float]
    gate_up: tuple[Tensor, Tensor | None]  # gate rows over up rows
    down: tuple[Tensor, Tensor | None]


def _weights(linear: nn.Module, what: str) -> tuple[Tensor, Tensor | None]:
    if type(linear) is not nn.Linear:  # LoRA, quantized: the kernels read a plain weight
        raise LinearizeError(f"fused_layers reads plain nn.Linear projections, {what} is a {type(linear).__name__}: merge the "
                             "adapters first (merge_and_unload) or decode without fused_layers")
    return linear.weight, linear.bias


def _norm(module: nn.Module, what: str) -> tuple[Tensor, float]:
    if not (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")):
        raise LinearizeError(f"fused_layers needs RMSNorm layers, {what} is a {type(module).__name__}: decode without fused_layers")
    return module.weight, float(module.variance_epsilon)


def _stacked_qkv(attn: nn.Module) -> tuple[Tensor, Tensor | None]:
    """q, k, v stacked: a fused layer's own `qkv_proj`, or (a layer kept softmax whole, whose HF module still reads its
    own projections) a stacked copy."""
    if hasattr(attn, FUSED_QKV):
        return _weights(getattr(attn, FUSED_QKV), "qkv_proj")
    return _weights(stack_linears([attn.q_proj, attn.k_proj, attn.v_proj]), "q/k/v")


class FusedStep:
    """One decode token through every layer of a pre-norm RMSNorm model with stacked projections (`fuse_projections`)
    on the skinny kernels: the embedding, per layer the dense kernels around the kind's own step (`student_mix`, which
    updates the layer's state in place), the final norm and head. `attns[i]` is layer i's attention (a
    `LinearizedAttention`; the decoder's `ExactAttention` for layers kept softmax whole). Same result as the model's
    forward up to rounding (each kernel rounds once, where HF rounds between its ops)."""

    def __init__(self, model: nn.Module, attns: list[LinearizedAttention]):
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        model_type = model.config.linearize["base_model_type"]
        if not adapter_for(model_type).prenorm_rms or getattr(config, "hidden_act", None) != "silu":
            raise LinearizeError(f"fused_layers runs pre-norm RMSNorm layers with a SiLU-gated MLP; {model_type} "
                                 f"(hidden_act {getattr(config, 'hidden_act', None)!r}) is not one: decode without fused_layers")
        rotary = model.model.rotary_emb
        if getattr(rotary, "rope_type", "default") in ("dynamic", "longrope"):
            raise LinearizeError(f"fused_layers keeps the rotary frequencies fixed; rope type {rotary.rope_type!r} changes them "
                                 "with the length: decode without fused_layers")
        self.inv_freq, self.rope_scale = rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0))
        self.layers = []
        for i, (layer, attn) in enumerate(zip(decoder_layers(model), attns)):
            if 2 * self.inv_freq.numel() != attn.head_dim:
                raise LinearizeError(f"fused_layers rotates whole heads; this model's rotary covers {2 * self.inv_freq.numel()} "
                                     f"of {attn.head_dim} channels: decode without fused_layers")
            if not hasattr(layer.mlp, "gate_up_proj") or (attn.kind != "softmax" and not hasattr(attn, FUSED_QKV)):
                raise LinearizeError("fused_layers reads stacked projections: call linearize.fusion.fuse_projections(model) first")
            qk_norm = None
            if attn.adapter.qk_norm:
                (wq, eps), (wk, _) = _norm(attn.q_norm, f"layer {i}'s q_norm"), _norm(attn.k_norm, f"layer {i}'s k_norm")
                qk_norm = (torch.stack([wq, wk]), eps)
            self.layers.append(_Layer(
                attn, _norm(layer.input_layernorm, f"layer {i}'s input_layernorm"), _stacked_qkv(attn), qk_norm,
                _weights(attn.o_proj, f"layer {i}'s o_proj"), _norm(layer.post_attention_layernorm, f"layer {i}'s post_attention_layernorm"),
                _weights(layer.mlp.gate_up_proj, f"layer {i}'s gate_up_proj"), _weights(layer.mlp.down_proj, f"layer {i}'s down_proj"),
            ))
        self.embed, self.norm = model.model.embed_tokens, _norm(model.model.norm, "the final norm")
        self.head = _weights(model.lm_head, "lm_head")

    def __call__(self, tokens: Tensor, positions: Tensor, cache: Any) -> Tensor:
        """Logits [B, V] of tokens [B, 1] at positions [B, 1]; `cache` holds each layer's state (a StateLayer)."""
        x = self.embed(tokens[:, 0])
        cos, sin = rope_tables(positions[:, 0], self.inv_freq, self.rope_scale)
        for layer, slot in zip(self.layers, cache.layers):
            a = layer.attn
            qkn, qk_eps = layer.qk_norm or (None, 1e-6)
            q, k, v, xn = qkv_rope(x, *layer.qkv, norm=layer.norm1[0], eps=layer.norm1[1], heads=(a.num_heads, a.num_kv_heads),
                                   cos=cos, sin=sin, qk_norm=qkn, qk_eps=qk_eps)
            y, state = a.student_mix(q[:, None], k[:, None], v[:, None], xn[:, None], None, slot.state)
            slot.store(state, 1)
            x = rms_linear(y.reshape(x.shape[0], -1), *layer.o, residual=x)
            h = rms_linear(x, *layer.gate_up, norm=layer.norm2[0], eps=layer.norm2[1], act="swiglu")
            x = rms_linear(h, *layer.down, residual=x)
        return rms_linear(x, *self.head, norm=self.norm[0], eps=self.norm[1])
