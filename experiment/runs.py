"""Run folders and result files that are never half-written.

Every JSON result is written to a temporary file in the same folder and renamed
into place, so a reader sees either the old file or the complete new one. Floats
that are not finite become ``null``: JSON has no NaN, and an undefined metric
must not look like a number.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def plain(value):
    """``value`` as JSON-ready plain data: tensors and numpy to lists/numbers, NaN/inf to None."""
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(plain(data), indent=2, allow_nan=False)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def new_run_dir(root: str | os.PathLike, exp_name: str) -> Path:
    """``<root>/<exp_name>/version_<n>`` with the next free n, created race-free."""
    base = Path(root) / exp_name
    base.mkdir(parents=True, exist_ok=True)
    taken = [
        int(p.name.split("_", 1)[1])
        for p in base.glob("version_*")
        if p.name.split("_", 1)[1].isdigit()
    ]
    version = max(taken, default=-1) + 1
    while True:
        candidate = base / f"version_{version}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            version += 1
