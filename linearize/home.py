"""Where linearize keeps what it can rebuild (GGUF copies, teacher samples): one root for every cache."""

from __future__ import annotations

import os
from pathlib import Path

OFF = ("0", "off", "false", "no")


def cache_root() -> Path:
    """$LINEARIZE_CACHE if set to a folder, else ~/.cache/linearize (`off` turns off only the optional GGUF copies)."""
    root = os.environ.get("LINEARIZE_CACHE", "")
    return Path(root).expanduser() if root and root.lower() not in OFF else Path.home() / ".cache" / "linearize"


def copies_off() -> bool:
    """LINEARIZE_CACHE=off: no optional copies (the GGUF's dequantized model) are written."""
    return os.environ.get("LINEARIZE_CACHE", "").lower() in OFF
