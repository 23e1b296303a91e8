"""Distillation recipes: YAML files under configs/ read into dataclasses; any key can be overridden
from the command line as ``section.key=value``."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any

import yaml

from ..errors import LinearizeError
from ..recipes import read_yaml, recipes


DTYPES = ("float32", "bfloat16")


class ConfigError(LinearizeError, ValueError):
    """A recipe or override that does not fit the recipe schema."""


@dataclass
class DataConfig:
    source: str = "teacher"  # "teacher" (sampled from the model), a local txt/json/jsonl/parquet, or a Hub dataset
    text_column: str = "text"
    template: str | None = None  # e.g. "{instruction}\n{input}\n{output}" for alpaca-style records
    hub_config: str | None = None  # the dataset's configuration name on the Hub
    split: str = "train"
    seq_len: int = 256
    val_fraction: float = 0.1
    max_texts: int | None = None
    teacher_sequences: int = 32  # teacher-generated corpus: how many samples, each up to seq_len tokens
    teacher_temperature: float = 1.0
    teacher_len: int | None = None  # tokens per teacher sample (default seq_len); shorter samples pack into longer rows
    recall_mix: float = 0.0  # fraction of training rows that are recall-rich synthetic rows (distill/recall_data.py)
    cache_dir: str = ""  # teacher samples kept under it; empty: `home.cache_root()` ($LINEARIZE_CACHE or ~/.cache/linearize)


@dataclass
class StageConfig:
    steps: int = 20
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    save_every: int = 50  # checkpoint every N steps (and at the end, and on Ctrl-C)


@dataclass
class Stage1Config(StageConfig):
    steps: int = 30
    lr: float = 1e-2
    attn_ce_weight: float = 0.0  # `hedgehog` layers: + weight x cross-entropy of attention weights vs the teacher's


@dataclass
class Stage2Config(StageConfig):
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"])
    train_new_params: bool = True  # keep feature maps, gates and mixing factors trainable
    kl_weight: float = 0.0  # weight of KL(teacher || student) on next-token distributions
    ce_weight: float = 1.0
    merge: bool = True  # fold LoRA into the weights before saving
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward: activations of one layer at a time


@dataclass
class DistillConfig:
    model: str = "smollm2-135m"
    plan: str | dict = "0-1:softmax,2-27:lolcats(window=64),28-:softmax"
    seed: int = 0
    # the original (frozen) weights while distilling and in the saved model: "float32", "bfloat16", or "auto"
    # (bfloat16 for a bfloat16 checkpoint on a GPU, half the memory and exact; float32 otherwise)
    dtype: str = "auto"
    train_dtype: str = "float32"  # the trained parameters (the kinds' new ones and LoRA): "float32" or "bfloat16"
    compile: str | None = None  # torch.compile backend ("inductor") for the decoder layers' norms and MLPs; None: eager
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Refuse values no run can use (before any model loads): known dtypes, positive sizes and counts."""
        for key, value, allowed in (("dtype", self.dtype, (*DTYPES, "auto")), ("train_dtype", self.train_dtype, DTYPES)):
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not a dtype distillation runs in: give one of {', '.join(allowed)}")
        if self.compile is not None:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.compile not in backends:
                raise ConfigError(f"compile={self.compile!r} is not a torch.compile backend: give inductor (or another of "
                                  f"torch._dynamo.list_backends()), "
                                  "or null")
        bad = [f"{k}={v}" for k, v, ok in [
            ("data.seq_len", self.data.seq_len, self.data.seq_len >= 2),
            ("data.val_fraction", self.data.val_fraction, 0 < self.data.val_fraction < 1),
            ("data.teacher_sequences", self.data.teacher_sequences, self.data.teacher_sequences > 0),
            ("data.teacher_len", self.data.teacher_len, self.data.teacher_len is None or self.data.teacher_len > 0),
            ("data.recall_mix", self.data.recall_mix, 0 <= self.data.recall_mix < 1),
            *[(f"{name}.{k}", getattr(s, k), getattr(s, k) > 0) for name, s in (("stage1", self.stage1), ("stage2", self.stage2))
              for k in ("batch_size", "save_every")],
            *[(f"{name}.steps", s.steps, s.steps >= 0) for name, s in (("stage1", self.stage1), ("stage2", self.stage2))],
            *[(f"{name}.lr", s.lr, 0 < s.lr < math.inf) for name, s in (("stage1", self.stage1), ("stage2", self.stage2))],
            *[(f"{name}.weight_decay", s.weight_decay, 0 <= s.weight_decay < math.inf)
              for name, s in (("stage1", self.stage1), ("stage2", self.stage2))],
            ("data.max_texts", self.data.max_texts, self.data.max_texts is None or self.data.max_texts > 0),
            ("stage2.lora_r", self.stage2.lora_r, self.stage2.lora_r > 0),
            ("stage2.lora_dropout", self.stage2.lora_dropout, 0 <= self.stage2.lora_dropout < 1),
        ] if not ok]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: sequence length must be at least 2, val_fraction between 0 and 1, "
                              "recall_mix and lora_dropout in [0, 1), batch sizes, lengths, counts and learning rates "
                              "positive, steps and weight_decay 0 or more")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, UnionType) else ()
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args):
        if type(None) in args or hint is Any:
            return None
        raise ConfigError(f"{key} cannot be null")
    types = [a for a in args if a is not type(None)] or [hint]
    for t in types:
        origin = typing.get_origin(t) or t
        if origin is list:
            items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
            return [str(v) for v in items]
        if origin is dict and isinstance(value, dict):
            return value
        if origin is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false", "1", "0", "yes", "no"):
                return str(value).lower() in ("true", "1", "yes")
            continue
        if origin is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                return int(value)
            continue
        if origin is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            try:
                return float(value)
            except (TypeError, ValueError):
                continue
        if origin is str and not isinstance(value, (dict, list)):
            return str(value)
    raise ConfigError(f"{key}={value!r} does not fit the type {getattr(hint, '__name__', hint)}")


def _update(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown recipe key {full!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full!r} is a section: give it keys, e.g. {full}.steps=10")
            _update(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file from its path or its name (`smollm2-135m` for configs/smollm2-135m.yaml)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    known = recipes()
    if str(name_or_path) in known:
        return known[str(name_or_path)][0]
    raise ConfigError(f"recipe {str(name_or_path)!r} does not exist: give a YAML file or one of the recipes "
                      f"({', '.join(known) or 'none found'})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DistillConfig:
    """A recipe from YAML (a file or a recipe name; or the defaults), then ``a.b=value`` overrides on top."""
    cfg = DistillConfig()
    if path is not None:
        _update(cfg, read_yaml(recipe_path(path), "recipe", ConfigError))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, value = item.split("=", 1)
        nested: dict[str, Any] = {}
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:  # not YAML (e.g. a template with braces): take the text as is
            node[parts[-1]] = value
        try:
            _update(cfg, nested)
        except ConfigError:
            if not isinstance(node[parts[-1]], (dict, list)):
                raise
            node[parts[-1]] = value  # YAML's mapping or list where text belongs (a template such as {instruction})
            _update(cfg, nested)
    return cfg
