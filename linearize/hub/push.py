"""Push a converted model folder to the Hugging Face Hub: stage the repo's exact layout, then one commit.

The staged layout is the saved model (safetensors, config with `auto_map`, tokenizer, plan.yaml,
recipe.yaml, metrics/), eval/ (an eval run's results.json and report.md, when there is one), the
remote code generated from the package, and README.md (the model card). `dry_run` writes that
layout to a local folder and uploads nothing; a real push stages it in a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .._version import __version__
from ..convert import CLASSES, saved_specs
from ..errors import LinearizeError
from ..loading import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_LICENSE, read_config_json
from ..outputs import MARKER, atomic_dir, check_out
from .card import model_card
from .code import ENTRY, auto_map, bundle, entry_module

EVAL_FILES = ("results.json", "report.md", "bench.png")
_NETWORK_ERRORS = {"ConnectionError", "ConnectError", "ConnectTimeout", "TimeoutError", "TimeoutException",
                   "Timeout", "NetworkError", "TransportError", "OfflineModeIsEnabled"}


def _check_license(license: str | None) -> None:
    """A Hub license id: lowercase letters, digits, '.', '-' and '+' (apache-2.0, llama3.1, openrail++, other)."""
    if license is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        raise LinearizeError(f"license {license!r} is not a Hub license id: give one such as apache-2.0, mit or llama3.1 "
                             "(lowercase, no spaces), or 'other'")


def _read_config(model_dir: Path) -> dict[str, Any]:
    if not (model_dir / "config.json").is_file():
        raise LinearizeError(f"{str(model_dir)!r} is not a saved model folder (no config.json): pass the --out folder of "
                             "`linearize convert` or a folder written by save_pretrained")
    config = read_config_json(model_dir)
    if "linearize" not in config:
        raise LinearizeError(f"{str(model_dir)!r} holds a model that linearize did not convert (config.json has no "
                             "'linearize' entry): convert it first (linearize convert, or linearize.convert + save_pretrained)")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    saved_specs(config["linearize"], text.get("num_hidden_layers", -1), str(model_dir))
    if config["linearize"]["base_model_type"] not in CLASSES:
        raise LinearizeError(f"{str(model_dir)!r} is a converted {config['linearize']['base_model_type']!r} model, which "
                             "this transformers version does not have")
    if not list(model_dir.glob("*.safetensors")):
        raise LinearizeError(f"{str(model_dir)!r} has no .safetensors weights: save the model with save_pretrained")
    return config


def base_model_id(model_dir: str | Path, base_model: str | None = None) -> str | None:
    """The Hub id the model was converted from: `base_model`, else the recipe's model if it is a Hub id."""
    if base_model:
        return base_model
    recipe = Path(model_dir) / "recipe.yaml"
    if not recipe.is_file():
        return None
    import yaml

    name = str((yaml.safe_load(recipe.read_text()) or {}).get("model", ""))
    if name == DEFAULT_MODEL:
        return DEFAULT_MODEL_HUB_ID
    is_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.endswith(".gguf") and not Path(name).exists()
    return name if is_hub_id else None


def find_eval(model_dir: str | Path, eval_dir: str | Path | None = None) -> Path | None:
    """The eval run to publish: `eval_dir`, else `<model_dir>/eval` or `<model_dir>-eval` (where `make eval` writes)."""
    model_dir = Path(model_dir)
    if eval_dir is not None:
        if not (Path(eval_dir) / "results.json").is_file():
            raise LinearizeError(f"eval folder {str(eval_dir)!r} has no results.json: give the --out folder of `linearize eval`")
        return Path(eval_dir)
    for d in (model_dir / "eval", model_dir.with_name(model_dir.name + "-eval")):
        if (d / "results.json").is_file():
            return d
    return None


def _place(src: Path, dst: Path, link: bool) -> None:
    """Copy `src` to `dst`; or hard-link it where the file system allows (a temporary staging of many-GB weights)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            return os.link(src, dst)
        except OSError:
            pass
    shutil.copy2(src, dst)


def _files(root: Path) -> list[str]:
    """The repo's files under a staged layout, repo-relative (not linearize's ownership marker)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MARKER)


def stage(model_dir: str | Path, out: str | Path, repo_id: str, *, eval_dir: str | Path | None = None,
          base_model: str | None = None, license: str | None = None, force: bool = False, link: bool = False) -> list[str]:
    """Write the repo's layout to `out` (complete or not at all; `force`: replace a folder another command
    wrote; `link`: hard-link the model's files instead of copying them); returns its files, repo-relative.
    `license` (a Hub license id) defaults to the embedded model's, else "other" (see the base model)."""
    _check_license(license)
    model_dir = Path(model_dir)
    results_dir = find_eval(model_dir, eval_dir)
    output = dict(force=force, inputs=[model_dir, results_dir])
    check_out(out, "push", **output)
    config = _read_config(model_dir)
    config_cls, model_cls = (c.__name__ for c in CLASSES[config["linearize"]["base_model_type"]])
    results = json.loads((results_dir / "results.json").read_text()) if results_dir else None
    base = base_model_id(model_dir, base_model)
    license = license or (DEFAULT_MODEL_LICENSE if base == DEFAULT_MODEL_HUB_ID else "other")
    card = model_card(model_dir, repo_id, base_model=base, eval_results=results, license=license)
    code = {**bundle(), ENTRY: entry_module(config_cls, model_cls)}
    with atomic_dir(out, "push", **output) as tmp:
        root = Path(tmp)
        for src in sorted(model_dir.rglob("*")):
            rel = src.relative_to(model_dir)
            if src.is_file() and not any(p.startswith(".") for p in rel.parts) and rel.as_posix() != "README.md":
                _place(src, root / rel, link)
        config["auto_map"] = auto_map(config_cls, model_cls)
        (root / "config.json").unlink()  # it may be a hard link to the model folder's: never write through it
        (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if results_dir is not None and model_dir.resolve() not in results_dir.resolve().parents:
            for name in EVAL_FILES:
                if (results_dir / name).is_file():
                    _place(results_dir / name, root / "eval" / name, link)
        for name, text in code.items():
            (root / name).write_text(text)
        (root / "README.md").write_text(card)
    return _files(Path(out))


def upload_operations(staged: str | Path, existing: list[str] = ()) -> list:
    """The commit: add every staged file, delete the repo's files the new layout no longer has."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    staged = Path(staged)
    files = _files(staged)
    adds = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(staged / f)) for f in files]
    deletes = [CommitOperationDelete(path_in_repo=f) for f in sorted(existing) if f not in files and f != ".gitattributes"]
    return adds + deletes


def _hub(what: str, call, *args: Any, **kwargs: Any) -> Any:
    """Run one Hub call; network and HTTP failures become errors that say what to do."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return call(*args, **kwargs)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = {401: "the token was rejected: log in again (hf auth login) or set HF_TOKEN",
                403: "the token may not write there: use a token with write access, or a repo under your own name"}
        raise LinearizeError(f"the Hub refused {what} (HTTP {status}): {hint.get(status, e)}") from e
    except Exception as e:
        if not {c.__name__ for c in type(e).__mro__} & _NETWORK_ERRORS:
            raise
        raise LinearizeError(f"cannot reach the Hugging Face Hub while {what} ({type(e).__name__}: {e}). Check the network "
                             "(and that HF_HUB_OFFLINE is unset), or use --dry-run to build the repo locally") from e


def push(model_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         dry_run: bool = False, out: str | Path | None = None, eval_dir: str | Path | None = None,
         base_model: str | None = None, license: str | None = None, force: bool = False, token: str | None = None,
         api: Any = None) -> list:
    """Upload a converted model folder as `repo_id` in one commit; returns the commit's operations.

    `dry_run`: write the layout to `out` (default `<model_dir>-hub`) and upload nothing. A repo that
    exists with content from elsewhere is refused unless `force`; one from an earlier push is updated.
    The token comes from `token`, else the usual places (HF_TOKEN, `hf auth login`).
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HFValidationError, RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise LinearizeError(f"invalid repo id {repo_id!r}: use 'user/name' or 'org/name' ({e})") from None
    _check_license(license)
    model_dir = Path(model_dir)
    if dry_run:
        out = Path(out) if out is not None else model_dir.with_name(model_dir.name + "-hub")
        stage(model_dir, out, repo_id, eval_dir=eval_dir, base_model=base_model, license=license, force=force)
        return upload_operations(out)
    _read_config(model_dir)  # a bad folder fails before anything touches the network
    if api is None:
        token = token or get_token()
        if not token:
            raise LinearizeError("no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with write "
                                 "access (or use --dry-run to build the repo locally)")
        api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "repo"
        stage(model_dir, staged, repo_id, eval_dir=eval_dir, base_model=base_model, license=license, link=True)
        existing: list[str] = []
        if _hub(f"looking up {repo_id}", api.repo_exists, repo_id):

            def files() -> list[str]:
                try:
                    return api.list_repo_files(repo_id, revision=revision)
                except RevisionNotFoundError:
                    return []  # a new branch

            existing = _hub(f"listing {repo_id}", files)
            others = [f for f in existing if f != ".gitattributes"]
            if others and ENTRY not in existing and not force:
                raise LinearizeError(
                    f"the Hub repo {repo_id} already holds other content ({', '.join(others[:4])}"
                    f"{', ...' if len(others) > 4 else ''}), not an earlier linearize push: push to a new repo id, "
                    "or pass --force to replace its files")
        else:
            _hub(f"creating {repo_id}", api.create_repo, repo_id, private=private, exist_ok=True)
        if revision:
            _hub(f"creating branch {revision}", api.create_branch, repo_id, branch=revision, exist_ok=True)
        ops = upload_operations(staged, existing)
        config = json.loads((staged / "config.json").read_text())
        _hub(f"uploading to {repo_id}", api.create_commit, repo_id, ops, revision=revision,
             commit_message=f"linearize {__version__}: {config['linearize']['plan']}")
    return ops
