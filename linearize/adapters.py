"""How to take apart each supported architecture's attention: a small table, not modeling copies.

Every supported model keeps its decoder layers at `model.layers[i]` with the attention at
`.self_attn`, receives (cos, sin) rotary embeddings from the decoder layer, and uses its own
module's `apply_rotary_pos_emb`. What differs is listed per `model_type` below.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import UnsupportedModelError


FUSED_QKV = "qkv_proj"  # q, k, v stacked in one Linear: Phi-3's own layout, and any layer after `fuse_projections`


@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps its attention projections and what it applies to q/k."""

    modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # taken over by converted layers
    fused_qkv: bool = False  # one `qkv_proj` holds q, k, v stacked (Phi-3)
    qk_norm: bool = False  # per-head RMSNorm on q and k before rotary (Qwen3)
    gated_mlp: bool = True  # MLP = down_proj(act_fn(gate_proj(x)) * up_proj(x)), gate and up separate (Phi-3: stacked)
    # decoder layer = RMSNorm, attention, residual add, RMSNorm, gated MLP, residual add (what `fusion.FusedStep` runs)
    prenorm_rms: bool = True

    def project(self, attn: nn.Module, x: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """q [B,T,H,D], k and v [B,T,Hk,D], with rotary applied, from hidden states x [B,T,C]."""
        b, t, _ = x.shape
        h, hk, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        if self.fused_qkv or hasattr(attn, FUSED_QKV):
            q, k, v = getattr(attn, FUSED_QKV)(x).split([h * d, hk * d, hk * d], dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q, k, v = q.view(b, t, h, d), k.view(b, t, hk, d), v.view(b, t, hk, d)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = position_embeddings
        q, k = attn.rotary_fn(q, k, cos, sin, unsqueeze_dim=2)
        return q, k, v


ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter(),  # also SmolLM2
    "mistral": Adapter(),
    "qwen2": Adapter(),
    "qwen3": Adapter(modules=("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"), qk_norm=True),
    "phi3": Adapter(modules=(FUSED_QKV, "o_proj"), fused_qkv=True, gated_mlp=False),
    "gemma2": Adapter(prenorm_rms=False),  # soft-capping read from the module; norms after the blocks too, weight 1 + w
}


def adapter_for(model_type: str) -> Adapter:
    """The adapter of `model_type`, or an error listing the supported architectures."""
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}. "
            "Adding one is a row in linearize/adapters.py if its attention follows the same pattern."
        )
    return ADAPTERS[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM of a supported architecture."""
    return model.model.layers


def rotary_fn(attn: nn.Module):
    """The `apply_rotary_pos_emb` of the modeling file that defines `attn` (handles partial rotary)."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def attention_geometry(attn: nn.Module, config) -> dict:
    """Head counts, head size, score scale, soft-cap and sliding window (keys within the last W positions,
    None for full attention) of an HF attention module."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    head_dim = getattr(attn, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return {
        "num_heads": text.num_attention_heads,
        "num_kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        "head_dim": head_dim,
        "hidden_size": text.hidden_size,
        "scaling": float(getattr(attn, "scaling", head_dim**-0.5)),
        "softcap": getattr(attn, "attn_logit_softcapping", None),
        # per layer where HF sets it on the module (Gemma 2, Qwen 2/3), else the whole model's (Mistral, Phi-3)
        "sliding_window": attn.sliding_window if hasattr(attn, "sliding_window") else getattr(text, "sliding_window", None),
    }


def key_validity(attention_mask: Tensor | None, t: int) -> Tensor | None:
    """[B,T] bool marking real (non-padding) tokens among the last T, from a 2D or 4D HF mask."""
    if attention_mask is None or not isinstance(attention_mask, Tensor):
        return None
    if attention_mask.dim() == 2:
        valid = attention_mask[:, -t:].bool()
    elif attention_mask.dim() == 4:  # key j is real if any of the T queries may attend to it
        block = attention_mask[:, 0, -t:, -t:]
        allowed = block if block.dtype == torch.bool else block > torch.finfo(block.dtype).min / 2
        valid = allowed.any(dim=1)
    else:
        return None
    if torch.compiler.is_compiling() or (valid.is_cuda and torch.cuda.is_current_stream_capturing()):
        return valid  # a compiled or captured step cannot read the mask on the host; an all-True one changes nothing
    return None if bool(valid.all()) else valid
