"""Model surgery: `convert` swaps attention modules in place and makes the model a linearized class.

For every supported architecture a config class (`model_type` "linearize_<type>") and a causal-LM
class are derived from the HF ones (module attributes named like `LinearizedLlamaForCausalLM`);
`import linearize` registers them with the Auto classes, so a saved converted model reloads with
`AutoModelForCausalLM.from_pretrained(dir)`; the Hub bundle ships this module as remote code. Its
config records the base architecture and the per-layer plan, and `__init__` rebuilds the layers.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ._version import __version__
from .adapters import ADAPTERS, adapter_for, decoder_layers
from .cache import LinearizeCache
from .errors import LinearizeError
from .kinds import build_options, full_options, kind_class
from .outputs import atomic_dir
from .plan import SOFTMAX, LayerPlan, LayerSpec, specs_to_string

PREFIX = "linearize_"


def _build_layers(model: nn.Module, specs: list[LayerSpec], base_type: str) -> dict[int, nn.Module]:
    """New attention modules for the non-softmax specs (nothing is swapped yet)."""
    adapter = adapter_for(base_type)
    layers = decoder_layers(model)
    new = {}
    for i, spec in enumerate(specs):
        if spec.kind != SOFTMAX:
            options = build_options(spec.kind, dict(spec.options))
            new[i] = kind_class(spec.kind)(layers[i].self_attn, model.config, adapter, options)
    return new


def saved_specs(record: Any, count: int, name: str) -> list[LayerSpec]:
    """The per-layer specs of a converted config's 'linearize' entry (`count` layers); a missing or damaged one says so."""
    layers = record.get("layers") if isinstance(record, dict) else None
    if not (isinstance(layers, list) and len(layers) == count and all(isinstance(d, dict) for d in layers)
            and "base_model_type" in record):
        raise LinearizeError(f"the config of the converted model {name!r} has no valid 'linearize' entry (base_model_type, "
                             f"and layers: one spec for each of its {count} layers): restore its config.json, or convert "
                             "the model again")
    return [LayerSpec.from_dict(d) for d in layers]


class LinearizedMixin:
    """Mixed into a causal-LM class: converted layers from `config.linearize`, their cache, atomic saves."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        specs = saved_specs(getattr(config, "linearize", None), config.get_text_config(decoder=True).num_hidden_layers,
                            getattr(config, "_name_or_path", ""))
        for i, module in _build_layers(self, specs, config.linearize["base_model_type"]).items():
            decoder_layers(self)[i].self_attn = module

    @property
    def layer_plan(self) -> list[LayerSpec]:
        """The resolved per-layer specs (defaults included)."""
        return [LayerSpec.from_dict(d) for d in self.config.linearize["layers"]]

    def new_cache(self) -> LinearizeCache:
        """An empty generation cache for this model."""
        return LinearizeCache(self.config)

    def forward(self, *args: Any, **kwargs: Any):
        use_cache = kwargs.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs[self._cache_kwarg] = self.new_cache()
        return super().forward(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
        out = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        for key in ("cache", "past_key_values"):
            if type(model_kwargs.get(key)) is DynamicCache:  # generate's default, not the user's
                model_kwargs[key] = self.new_cache()
        return out

    def prepare_inputs_for_generation(self, input_ids: Any, *args: Any, attention_mask: Any = None, **kwargs: Any) -> dict:
        # Feature maps act on rotary q/k, so converted layers see absolute positions: a left-padded
        # row must count positions from its first real token (recent transformers leave it out).
        inputs = super().prepare_inputs_for_generation(input_ids, *args, attention_mask=attention_mask, **kwargs)
        mask = attention_mask
        if inputs.get("position_ids") is None and mask is not None and mask.dim() == 2 and not bool(mask.all()):
            new = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -new.shape[1] :]
        return inputs

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        """Same as HF's, but a new folder appears complete or not at all (an existing one is written into, as HF does)."""
        if getattr(self, "fused_projections", False):
            raise LinearizeError("this model's projections were stacked for decoding (linearize.fusion.fuse_projections), "
                                 "a layout its checkpoint does not load into: save the model before fusing it")
        if Path(save_directory).exists():
            return super().save_pretrained(save_directory, *args, **kwargs)
        with atomic_dir(save_directory, "save_pretrained") as tmp:
            return super().save_pretrained(tmp, *args, **kwargs)


def _linearized_classes(model_type: str) -> tuple[type, type]:
    base_config = CONFIG_MAPPING[model_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    config_cls = type(f"Linearized{base_config.__name__}", (base_config,), {"model_type": PREFIX + model_type})
    # transformers renamed forward's `past_key_values` to `cache` in 5.2x
    cache_kwarg = "cache" if "cache" in inspect.signature(base_model.forward).parameters else "past_key_values"
    attrs = {"config_class": config_cls, "_cache_kwarg": cache_kwarg}

    def forward(self, *args: Any, **kwargs: Any):
        return LinearizedMixin.forward(self, *args, **kwargs)

    attrs["forward"] = functools.wraps(base_model.forward)(forward)  # generate() reads its signature
    model_cls = type(f"Linearized{base_model.__name__}", (LinearizedMixin, base_model), attrs)
    return config_cls, model_cls


CLASSES: dict[str, tuple[type, type]] = {}
for _type in ADAPTERS:
    if _type in CONFIG_MAPPING:  # an older transformers may lack one architecture
        CLASSES[_type] = _linearized_classes(_type)
        globals().update({cls.__name__: cls for cls in CLASSES[_type]})  # importable by name (pickle, auto_map)


def register_auto_classes() -> None:
    """Make AutoConfig / AutoModelForCausalLM load saved converted models (`import linearize` does this)."""
    for model_type, (config_cls, model_cls) in CLASSES.items():
        AutoConfig.register(PREFIX + model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def is_converted(model: nn.Module) -> bool:
    return isinstance(model, LinearizedMixin)


def convert(model: PreTrainedModel, plan: LayerPlan | str | dict) -> PreTrainedModel:
    """Replace the attention of the layers `plan` selects, in place, and return the same model.

    Pretrained projections are kept; each kind adds only its new parameters (on the model's
    device and dtype). The model's class becomes the linearized subclass of its HF class and
    its config records the plan. Everything is checked before anything changes.
    """
    if is_converted(model):
        raise LinearizeError("this model is already converted; convert the original model instead")
    base_type = getattr(model.config, "model_type", None)
    adapter_for(base_type)
    if base_type not in CLASSES:
        raise LinearizeError(f"this transformers version has no {base_type!r} architecture")
    num_layers = len(decoder_layers(model))
    specs = LayerPlan.coerce(plan).resolve(num_layers)
    new_modules = _build_layers(model, specs, base_type)

    config_cls, model_cls = CLASSES[base_type]
    model.config = copy.copy(model.config)  # its own: other models built from the same config object stay as they were
    model.config.__class__ = config_cls
    model.config.linearize = {
        "base_model_type": base_type,
        "plan": specs_to_string(specs),
        "layers": [{"kind": s.kind, **full_options(s)} for s in specs],
        "linearize_version": __version__,
    }
    for i, module in new_modules.items():
        decoder_layers(model)[i].self_attn = module
    model.__class__ = model_cls
    return model


@contextmanager
def converted(model: PreTrainedModel, plan: LayerPlan | str | dict) -> Iterator[PreTrainedModel]:
    """`convert` for the duration of a block; the original attention modules and classes come back
    after it (the converted layers share the original projections, so nothing is copied)."""
    layers = decoder_layers(model)
    originals = [layer.self_attn for layer in layers]
    model_cls, config = model.__class__, model.config
    convert(model, plan)
    try:
        yield model
    finally:
        for layer, attn in zip(layers, originals):
            layer.self_attn = attn
        model.__class__, model.config = model_cls, config
