"""GPU memory a distillation recipe needs, stage by stage (`linearize inspect MODEL --config RECIPE`).

The exact parts come from the config on the meta device (nothing loads): frozen weights in the recipe's
dtype, trained parameters (the plan's new ones, LoRA) with their gradients and AdamW's two states, and
the chunked loss's logits. Activations are per token, proportional to a decoder layer's width
(hidden + intermediate size), by one constant measured on an H200 at Llama-3-8B's shape
(benchmarks/RESULTS.md, issue 20): stage 1 keeps one layer's activations at a time (each layer's
transfer loss is backpropagated as soon as it is formed), stage 2 every layer's, or with gradient
checkpointing each layer's input plus one layer's during its recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import PretrainedConfig

from ..adapters import decoder_layers
from ..convert import _build_layers
from ..errors import LinearizeError
from ..info import skeleton
from ..plan import LayerPlan
from .config import DistillConfig
from .run import _lora_targets, resolve_dtypes
from .stages import loss_chunk

# Bytes a token that one decoder layer keeps for its backward pass, per unit of (hidden + intermediate) size, in
# bf16 autocast: 11.42 from stage 1 and 11.50 from stage 2 without checkpointing on the all-lolcats Llama-3-8B
# (1024 x 8 tokens, results/scale_h200.json), what is left of each peak after the exact parts below.
LAYER_BYTES_PER_UNIT = 11.5
ADAM_BYTES = 8  # AdamW's exp_avg and exp_avg_sq, fp32 whatever the parameter's dtype
MARGIN = 0.1  # the estimates' error bound where measured (8%) and a little more: a run is refused only past it
GiB = 2**30


@dataclass
class StageMemory:
    """One stage's peak on each GPU, in bytes, by part."""

    weights: float
    trained: float
    trained_params: int
    activations: float
    loss: float

    @property
    def total(self) -> float:
        return self.weights + self.trained + self.activations + self.loss


def estimate(config: PretrainedConfig, cfg: DistillConfig, gpus: int = 1) -> dict[str, StageMemory]:
    """Each stage's memory on each of `gpus` GPUs (FSDP2 as configs/accelerate/fsdp.yaml shards it: decoder layers
    and the root sharded, two layers gathered at a time, new parameters replicated) for the recipe `cfg`."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    weights_dtype, train_dtype = resolve_dtypes(cfg, torch.device("cuda"), config)
    model = skeleton(config)
    layers = decoder_layers(model)
    specs = LayerPlan.coerce(cfg.plan).resolve(len(layers))
    with torch.device("meta"):
        built = _build_layers(model, specs, model.config.model_type)
    total, per_layer = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in layers[0].parameters())
    new = sum(m.new_parameters() for m in built.values())
    for i, m in built.items():
        layers[i].self_attn = m  # where convert puts them: _lora_targets finds the converted layers' projections
    targets = set(_lora_targets(model, cfg.stage2.lora_targets))
    lora = sum(cfg.stage2.lora_r * (mod.in_features + mod.out_features) for name, mod in model.named_modules() if name in targets)
    wb = weights_dtype.itemsize
    weights = total * wb / gpus + (0 if gpus == 1 else (2 * per_layer + total - len(layers) * per_layer) * wb)

    def trained(replicated: int, sharded: int) -> tuple[float, int]:
        state = 2 * train_dtype.itemsize + ADAM_BYTES  # the parameter, its gradient, AdamW's states
        return (replicated + sharded / gpus) * state, replicated + sharded

    width = LAYER_BYTES_PER_UNIT * (text.hidden_size + text.intermediate_size)
    s1_tokens = cfg.data.seq_len * cfg.stage1.batch_size
    s2_tokens = cfg.data.seq_len * cfg.stage2.batch_size
    if cfg.stage2.gradient_checkpointing:
        per_token = len(layers) * text.hidden_size * wb + width  # each layer's input, one layer recomputed
    else:
        per_token = len(layers) * width
    chunk = min(s2_tokens, loss_chunk(text.vocab_size))
    t1, n1 = trained(new, 0)
    t2, n2 = trained(new if cfg.stage2.train_new_params else 0, lora)
    return {
        "stage1": StageMemory(weights, t1, n1, s1_tokens * width, 0.0),
        "stage2": StageMemory(weights, t2, n2, s2_tokens * per_token, 4 * 4 * chunk * text.vocab_size),
    }


def format_estimate(est: dict[str, StageMemory], cfg: DistillConfig, gpus: int = 1) -> str:
    """`estimate`'s figures as `linearize inspect --config` prints them."""
    on = f"each of {gpus} GPUs (FSDP)" if gpus > 1 else "one GPU"
    lines = [f"memory on {on}, estimated (activations by a constant measured at 8B, within 15% there):"]
    for stage, m in est.items():
        s = getattr(cfg, stage)
        tokens = cfg.data.seq_len * s.batch_size
        how = ""
        if stage == "stage2":
            how = f", gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}"
        lines.append(f"  {stage}: {m.total / GiB:.1f} GiB = weights {m.weights / GiB:.2f} + trained {m.trained / GiB:.2f} "
                     f"({m.trained_params:,} parameters, gradients, AdamW states) + activations {m.activations / GiB:.2f} "
                     f"({cfg.data.seq_len} x {s.batch_size} tokens{how})" + (f" + loss {m.loss / GiB:.2f}" if m.loss else ""))
    return "\n".join(lines)


def check_fits(config: PretrainedConfig, cfg: DistillConfig, capacity: float, gpus: int = 1) -> None:
    """Refuse, before any weights load, a recipe whose estimate exceeds `capacity` bytes (each GPU's memory) by
    more than the estimate's error: one line with what the stage needs and the settings that bring it under."""
    est = estimate(config, cfg, gpus)
    for stage, m in est.items():
        s = getattr(cfg, stage)
        if s.steps == 0 or m.total * (1 - MARGIN) <= capacity:  # a stage that does not run needs nothing
            continue
        fixes = []
        if stage == "stage2" and not s.gradient_checkpointing:
            on = estimate(config, replace(cfg, stage2=replace(s, gradient_checkpointing=True)), gpus)[stage]
            if on.total <= capacity:
                fixes.append(f"set stage2.gradient_checkpointing=true (about {on.total / GiB:.0f} GiB)")
        per_row = m.activations / s.batch_size
        rows = int((capacity - (m.total - m.activations)) // per_row)
        if 0 < rows < s.batch_size:
            fixes.append(f"set {stage}.batch_size={rows} (about {(m.total - m.activations + rows * per_row) / GiB:.0f} GiB)")
        fixes.append("shard over more GPUs (configs/accelerate/fsdp.yaml)")
        raise LinearizeError(f"{stage} needs about {m.total / GiB:.0f} GiB on each GPU (weights {m.weights / GiB:.0f}, activations "
                             f"{m.activations / GiB:.0f}) and the GPU has {capacity / GiB:.0f} GiB: " + ", or ".join(fixes)
                             + " (`linearize inspect MODEL --config RECIPE` shows the estimate)")
