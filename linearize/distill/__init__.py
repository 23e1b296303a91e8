"""Distillation: stage 1 attention transfer, stage 2 LoRA fine-tune, driven by YAML recipes."""

from .config import DistillConfig, load_config
from .run import distill
from .stages import attention_mode, new_parameters, perplexity

__all__ = ["DistillConfig", "attention_mode", "distill", "load_config", "new_parameters", "perplexity"]
