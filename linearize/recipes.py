"""The shipped recipes (configs/*.yaml), found without importing the distillation code (`linearize --help` lists them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def recipes_dir() -> Path | None:
    """The recipes folder: configs/ beside the package (a source checkout) or inside it (an installed wheel)."""
    here = Path(__file__).resolve().parent
    for d in (here / "configs", here.parent / "configs"):
        if d.is_dir():
            return d
    return None


def recipes() -> dict[str, tuple[Path, str]]:
    """{name: (file, its first comment line)} of the shipped recipes."""
    d = recipes_dir()
    out = {}
    for f in sorted(d.glob("*.yaml")) if d else []:
        first = next((line for line in f.read_text().splitlines() if line.startswith("#")), "# ")
        out[f.stem] = (f, first.lstrip("# ").strip())
    return out


def read_yaml(file: Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a recipe, a plan file); anything else raises `error` in one line."""
    import yaml

    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise error(f"{what} {str(file)!r} is not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
    except UnicodeDecodeError as e:
        raise error(f"{what} {str(file)!r} is not UTF-8 text ({e.reason} at byte {e.start:,}): give a YAML file") from None
    if not isinstance(data, dict):
        raise error(f"{what} {str(file)!r} is not a YAML mapping of keys")
    return data
