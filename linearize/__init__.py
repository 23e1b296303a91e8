"""linearize: turn a pretrained Hugging Face causal LM into a subquadratic one.

    model, tok = linearize.load()                      # embedded SmolLM2-135M-Instruct
    linearize.convert(model, "2-27:lolcats(window=64)")  # in place
    model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=20)
"""

from ._version import __version__  # noqa: F401
from .autoplan import autoplan  # noqa: E402
from .cache import LinearizeCache  # noqa: E402
from .convert import convert, is_converted, register_auto_classes  # noqa: E402
from .errors import LinearizeError, ModelLoadError, PlanError, UnsupportedModelError  # noqa: E402
from .generation import GraphedDecoder, generate_graphed  # noqa: E402
from .kinds import KINDS, kind_names, register  # noqa: E402
from .loading import DEFAULT_MODEL, load  # noqa: E402
from .plan import LayerPlan, LayerSpec, every, keep_softmax, ratio  # noqa: E402

register_auto_classes()  # saved converted models load with AutoModelForCausalLM

from . import hub  # noqa: E402  (linearize.hub.push)

__all__ = [
    "DEFAULT_MODEL", "GraphedDecoder", "autoplan", "KINDS", "LayerPlan", "LayerSpec", "LinearizeCache", "LinearizeError",
    "ModelLoadError", "PlanError", "UnsupportedModelError", "convert", "every", "generate_graphed", "is_converted",
    "keep_softmax", "kind_names", "load", "ratio", "register",
]
