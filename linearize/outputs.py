"""Where commands may write: the one rule for every output folder or file, and the atomic writers that apply it.

A command writes only a path it creates, or one it wrote before (a folder holding the marker file
`.linearize-out` that names the command, or a file starting with the command's header line). Anything
else that exists is refused unless `force`; a path that is or contains the current folder, or that is,
contains or lies inside one of the command's inputs, is refused even then.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ._version import __version__
from .errors import OutputError

MARKER = ".linearize-out"


def header(command: str) -> str:
    """The first line of a file `command` writes (its ownership mark)."""
    return f"# written by linearize {command}\n"


def _owned(target: Path, command: str) -> bool:
    """Whether replacing `target` loses nothing but what `command` wrote there before."""
    if target.is_dir():
        marker = target / MARKER
        if not marker.is_file():
            return not any(target.iterdir())  # an empty folder
        try:
            return json.loads(marker.read_text()).get("command") == command
        except (ValueError, AttributeError):
            return False
    with open(target, "rb") as f:
        return f.read(len(header(command))) == header(command).encode()


def _check_writable(folder: Path, path: str) -> None:
    """Fail now (before any model loads) if nothing can be created where `path` goes."""
    while not folder.exists():
        folder = folder.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".linearize-probe-", dir=folder))
    except OSError as e:
        raise OutputError(f"cannot write {path!r}: {e.strerror or e} ({folder})") from None


def check_out(path: str | os.PathLike, command: str, *, force: bool = False, inputs: Iterable = ()) -> Path:
    """The resolved output path, once it is known that writing it destroys nothing linearize did not write."""
    target = Path(path).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputError(f"output {str(path)!r} is (or contains) the current folder: give a new folder, e.g. out/run")
    for item in inputs:
        src = Path(str(item)).expanduser().resolve() if item is not None else None
        if src is not None and src.exists() and (target == src or target in src.parents or src in target.parents):
            raise OutputError(f"output {str(path)!r} is, contains or lies inside the input {str(item)!r}: "
                              "give a folder outside it")
    if target.exists() and not force and not _owned(target, command):
        raise OutputError(f"{str(path)!r} already exists and was not written by `linearize {command}`: give a new "
                          "output path, or pass --force to replace it")
    _check_writable(target.parent, str(path))
    return target


@contextmanager
def atomic_dir(path: str | os.PathLike, command: str, *, force: bool = False, inputs: Iterable = ()) -> Iterator[str]:
    """Yield a temporary sibling folder; on success it replaces `path` (see `check_out`), on error it is removed."""
    target = check_out(path, command, force=force, inputs=inputs)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    except OSError as e:
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    try:
        yield tmp
        Path(tmp, MARKER).write_text(json.dumps({"command": command, "linearize_version": __version__}) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it a normal folder's mode
        for f in Path(tmp).rglob("*"):  # and its files a normal file's (transformers writes safetensors 0600)
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~umask)
        if target.exists():
            old = tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)
            os.replace(target, Path(old) / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file(path: str | os.PathLike, text: str, command: str, *, force: bool = False, inputs: Iterable = ()) -> Path:
    """Write `command`'s header and `text` to `path` (see `check_out`); the file appears whole or not at all."""
    target = check_out(path, command, force=force, inputs=inputs)
    if target.is_dir():
        raise OutputError(f"{str(path)!r} is a folder: give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(header(command) + text)
        os.replace(tmp, target)
    except OSError as e:
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    return target
