"""What a model is and what converting it would add (`linearize inspect`, `linearize plan`).

Works from the config alone: the model is built on the meta device, so nothing is loaded and
counts are exact for any size (a GGUF's config comes from its metadata).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .adapters import ADAPTERS, attention_geometry, decoder_layers
from .convert import PREFIX, _build_layers
from .errors import UnsupportedModelError
from .kinds import KINDS, build_options
from .loading import DEFAULT_MODEL, load_config
from .plan import SOFTMAX, LayerPlan, LayerSpec


def _base_config(config: PretrainedConfig) -> PretrainedConfig:
    """The teacher's config of a converted model's config (itself otherwise)."""
    if not config.model_type.startswith(PREFIX):
        return config
    base = config.model_type.removeprefix(PREFIX)
    d = {k: v for k, v in config.to_dict().items() if k not in ("linearize", "model_type", "architectures", "auto_map")}
    return CONFIG_MAPPING[base].from_dict(d)


def skeleton(config: PretrainedConfig) -> torch.nn.Module:
    """The causal LM of `config` on the meta device (no memory, exact shapes)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def layer_costs(model: torch.nn.Module, specs: list[LayerSpec]) -> list[int]:
    """New parameters each layer of `specs` would add to the meta `model` (0 for softmax)."""
    with torch.device("meta"):
        built = _build_layers(model, specs, model.config.model_type)
    return [built[i].new_parameters() if i in built else 0 for i in range(len(specs))]


CACHE_CONTEXT = 4096  # the context at which a plan's cache is compared with the teacher's KV cache


def layer_cache(model: torch.nn.Module, specs: list[LayerSpec], dtype: torch.dtype = torch.bfloat16) -> list[tuple[int, int]]:
    """(bytes per token, fixed bytes) of each layer's decode cache at batch 1 for the meta `model` in
    `dtype`: softmax layers and heads keep keys/values of every token, converted ones a fixed state.
    Measured by running each converted layer on one and on two tokens of meta tensors, so it is exactly
    what the layer keeps (states in fp32, keys/values in `dtype`)."""
    with torch.device("meta"):
        built = _build_layers(model, specs, model.config.model_type)
    attn0 = decoder_layers(model)[0].self_attn
    geo = attention_geometry(attn0, model.config)
    per_token = 2 * geo["num_kv_heads"] * geo["head_dim"] * torch.empty(0, dtype=dtype).element_size()
    out = []
    for i in range(len(specs)):
        if i not in built:
            out.append((per_token, 0))
            continue
        attn = built[i].to(dtype)
        size = []
        for t in (1, 2):
            q = torch.empty(1, t, attn.num_heads, attn.head_dim, device="meta", dtype=dtype)
            kv = torch.empty(1, t, attn.num_kv_heads, attn.head_dim, device="meta", dtype=dtype)
            x = torch.empty(1, t, attn.hidden_size, device="meta", dtype=dtype)
            _, state = attn.student_mix(q, kv, kv, x, None, None)
            size.append(sum(v.numel() * v.element_size() for v in state.values()))
        out.append((size[1] - size[0], 2 * size[0] - size[1]))
    return out


def cache_summary(rows: list[tuple[int, int]], teacher_per_token: int, context: int = CACHE_CONTEXT) -> dict[str, Any]:
    """A plan's cache at `context` tokens against the teacher's KV cache there (`cache_fraction`)."""
    grow, fixed = sum(r[0] for r in rows), sum(r[1] for r in rows)
    total, teacher = grow * context + fixed, teacher_per_token * context
    return {"context": context, "bytes_per_token": grow, "fixed_bytes": fixed, "bytes": total,
            "teacher_bytes": teacher, "cache_fraction": total / teacher}


class CacheMeter:
    """cache_fraction of plans for one model config, memoized per layer spec (planners ask often)."""

    def __init__(self, config: PretrainedConfig, context: int = CACHE_CONTEXT, dtype: torch.dtype = torch.bfloat16):
        self.model, self.context, self.dtype = skeleton(_base_config(config)), context, dtype
        self.memo: dict[LayerSpec, tuple[int, int]] = {}
        self.teacher_per_token = self.rows([LayerSpec(SOFTMAX)])[0][0]

    def rows(self, specs: list[LayerSpec]) -> list[tuple[int, int]]:
        for spec in set(specs) - set(self.memo):
            self.memo[spec] = layer_cache(self.model, [spec], self.dtype)[0]
        return [self.memo[s] for s in specs]

    def summary(self, specs: list[LayerSpec]) -> dict[str, Any]:
        return cache_summary(self.rows(specs), self.teacher_per_token * len(specs), self.context)

    def fraction(self, specs: list[LayerSpec]) -> float:
        return self.summary(specs)["cache_fraction"]


def plan_cache(name_or_path: str | os.PathLike | None, specs: list[LayerSpec], context: int = CACHE_CONTEXT) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    """Per-layer cache rows of `specs` on the model's config (no weights) and their summary at `context`."""
    meter = CacheMeter(load_config(name_or_path), context)
    return meter.rows(specs), meter.summary(specs)


def format_cache(summary: dict[str, Any]) -> str:
    """One line: the cache at the summary's context, its growth and fixed part, the fraction of the teacher's."""
    mib = 2**20
    return (f"cache at {summary['context']:,} tokens: {summary['bytes'] / mib:.2f} MiB = {summary['bytes_per_token']:,} B/token "
            f"x {summary['context']:,} + {summary['fixed_bytes'] / mib:.2f} MiB fixed; teacher KV cache "
            f"{summary['teacher_bytes'] / mib:.2f} MiB; cache_fraction {summary['cache_fraction']:.3f}")


def describe(name_or_path: str | os.PathLike | None = None, config: PretrainedConfig | None = None) -> dict[str, Any]:
    """Architecture, sizes, adapter, parameter counts and per-kind additions of a model (`config`: its config,
    already read)."""
    config = config if config is not None else load_config(name_or_path)
    base = _base_config(config)
    text = base.get_text_config(decoder=True) if hasattr(base, "get_text_config") else base
    info: dict[str, Any] = {
        "model": str(name_or_path or DEFAULT_MODEL), "model_type": base.model_type,
        "architecture": (getattr(config, "architectures", None) or ["?"])[0],
        "layers": text.num_hidden_layers, "hidden_size": text.hidden_size, "heads": text.num_attention_heads,
        "kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        "vocab_size": text.vocab_size, "adapter": None, "plan": None,
    }
    if base.model_type not in ADAPTERS:
        info["unsupported"] = str(UnsupportedModelError(
            f"architecture {base.model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"))
        return info
    adapter = ADAPTERS[base.model_type]
    info["adapter"] = {"model_type": base.model_type, "modules": list(adapter.modules), "fused_qkv": adapter.fused_qkv,
                       "qk_norm": adapter.qk_norm}
    model = skeleton(base)
    info["architecture"] = type(model).__name__ + (" (converted)" if config.model_type.startswith(PREFIX) else "")
    attn0 = decoder_layers(model)[0].self_attn
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["attention_parameters_per_layer"] = sum(p.numel() for m in adapter.modules for p in getattr(attn0, m).parameters())
    if config.model_type.startswith(PREFIX):
        info["plan"] = config.linearize["plan"]
        specs = [LayerSpec.from_dict(d) for d in config.linearize["layers"]]
        info["added_parameters"] = sum(layer_costs(model, specs))
        info["cache"] = CacheMeter(base).summary(specs)
    else:
        info["kv_cache_bytes_per_token"] = CacheMeter(base).teacher_per_token * info["layers"]
    n = info["layers"]
    info["kinds"] = {}
    for kind in sorted(KINDS):
        per_layer = layer_costs(model, [LayerSpec(kind)] + [LayerSpec(SOFTMAX)] * (n - 1))[0]
        info["kinds"][kind] = {"per_layer": per_layer, "all_layers": per_layer * n,
                               "percent_of_model": 100.0 * per_layer * n / info["parameters"],
                               "defaults": dict(vars(build_options(kind, {})))}
    return info


def format_description(info: dict[str, Any]) -> str:
    """`describe`'s dict as the text `linearize inspect` prints."""
    lines = [f"model: {info['model']}",
             f"architecture: {info['architecture']} (model_type {info['model_type']})",
             f"layers: {info['layers']}, hidden {info['hidden_size']}, heads {info['heads']} (kv {info['kv_heads']}), "
             f"head_dim {info['head_dim']}, vocab {info['vocab_size']}"]
    if info["adapter"] is None:
        return "\n".join(lines + [f"adapter: none: {info['unsupported']}"])
    a = info["adapter"]
    lines += [f"adapter: {a['model_type']} (takes over {', '.join(a['modules'])}; fused qkv: {a['fused_qkv']}, "
              f"q/k norm: {a['qk_norm']})",
              f"parameters: {info['parameters']:,} before conversion ({info['attention_parameters_per_layer']:,} in each "
              "layer's attention projections)"]
    if info["plan"]:
        lines.append(f"converted: {info['plan']} ({info['added_parameters']:,} parameters added)")
        lines.append(format_cache(info["cache"]))
    else:
        lines.append(f"KV cache: {info['kv_cache_bytes_per_token']:,} bytes per token (bf16), "
                     f"{info['kv_cache_bytes_per_token'] * CACHE_CONTEXT / 2**20:.2f} MiB at {CACHE_CONTEXT:,} tokens")
    lines.append("each kind would add (default options):")
    width = max(len(k) for k in info["kinds"])
    for kind, k in info["kinds"].items():
        opts = ", ".join(f"{o}={v}" for o, v in k["defaults"].items())
        lines.append(f"  {kind:<{width}}  {k['per_layer']:>12,} per layer, {k['all_layers']:>14,} on all layers "
                     f"({k['percent_of_model']:.2f}% of the model)  [{opts}]")
    return "\n".join(lines)


def resolve_plan(
    name_or_path: str | os.PathLike | None, plan: LayerPlan | str | dict, config: PretrainedConfig | None = None,
) -> tuple[PretrainedConfig, list[LayerSpec]]:
    """The model's config and `plan` resolved against its layers, from the config alone (`config`: already read): an
    unsupported architecture or a plan that does not fit the model fails before any weights load."""
    config = _base_config(config if config is not None else load_config(name_or_path))
    if config.model_type not in ADAPTERS:
        raise UnsupportedModelError(f"architecture {config.model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}")
    return config, LayerPlan.coerce(plan).resolve(config.get_text_config(decoder=True).num_hidden_layers)


def plan_rows(name_or_path: str | os.PathLike | None, plan: LayerPlan | str | dict) -> tuple[list[LayerSpec], list[int]]:
    """`plan` resolved against the model's layers, and each layer's added parameters."""
    config, specs = resolve_plan(name_or_path, plan)
    return specs, layer_costs(skeleton(config), specs)
