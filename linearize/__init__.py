"""linearize: turn a pretrained Hugging Face causal LM into a subquadratic one.

    model, tok = linearize.load()                      # embedded SmolLM2-135M-Instruct
    linearize.convert(model, "2-27:lolcats(window=64)")  # in place
    model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20)

The names below load on first use, so `linearize --help` imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from typing import Any

from ._version import __version__  # noqa: F401

_EXPORTS = {
    "autoplan": "autoplan", "LinearizeCache": "cache", "convert": "convert", "is_converted": "convert",
    "register_auto_classes": "convert", "LinearizeError": "errors", "ModelLoadError": "errors", "PlanError": "errors",
    "UnsupportedModelError": "errors", "GraphedDecoder": "generation", "generate_graphed": "generation",
    "KINDS": "kinds", "kind_names": "kinds", "register": "kinds", "DEFAULT_MODEL": "loading", "load": "loading",
    "LayerPlan": "plan", "LayerSpec": "plan", "every": "plan", "keep_softmax": "plan", "ratio": "plan",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """`linearize.NAME` for the public names and the submodules, imported on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Keeps `linearize.convert` and `linearize.autoplan` the functions when their modules are imported."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in _EXPORTS and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Registers the converted models' classes with transformers' Auto classes as soon as transformers is imported."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            if not any(getattr(m, "__spec__", None) is not None and getattr(m.__spec__, "_initializing", False)
                       for n, m in list(sys.modules.items()) if n.startswith(__name__ + ".")):
                importlib.import_module(".loading", __name__)  # else that module imports it (or needs no loading)

        spec.loader.exec_module = exec_and_register
        return spec


# `import linearize` makes saved converted models load with AutoModelForCausalLM (importing .loading registers them)
if "transformers" in sys.modules:
    importlib.import_module(".loading", __name__)
else:
    sys.meta_path.insert(0, _RegisterAfterTransformers())
