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

from user_errors import UserError


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


def current_umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(plain(data), indent=2, allow_nan=False)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; a results file is as readable as any other output.
        os.fchmod(handle, 0o666 & ~current_umask())
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


def check_output_dir(path: str | os.PathLike, option: str) -> None:
    """UserError unless the folder ``path`` exists or can be made, and is writable; creates nothing.

    Called before any work, so that a run never ends by failing to save what it did.
    """
    path = Path(path)
    existing = _nearest_existing(path, f"{option} {path}")
    if not existing.is_dir():
        if existing == path:
            raise UserError(f"{option} {path} is a file, not a folder")
        raise UserError(f"{option} {path} cannot be made: {existing} is a file")
    where = "" if existing == path else f" in {existing}"
    _probe(
        existing, f"{option} {path} cannot be {'written' if existing == path else 'made'}{where}"
    )


def check_output_file(path: str | os.PathLike, option: str) -> None:
    """UserError unless the file ``path`` can be written (replaced or created); creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    existing = _nearest_existing(path.parent, f"{option} {path}")
    if not existing.is_dir():
        raise UserError(f"{option} {path} cannot be written: {existing} is a file")
    # The file is replaced by renaming a temporary file into place: its folder must be writable.
    _probe(existing, f"{option} {path} cannot be written in {existing}")


def _nearest_existing(folder: Path, shown: str) -> Path:
    """Where the missing folders of ``folder`` would be made."""
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise UserError(f"{shown} cannot be made: {existing} is a broken link")
        if existing.parent == existing:
            break
        existing = existing.parent
    return existing


def _probe(folder: Path, message: str) -> None:
    # os.access says yes to root on a read-only folder, so try it: a file made and removed at once.
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
    except OSError as err:
        raise UserError(f"{message} ({err.strerror or type(err).__name__})") from None
    os.close(handle)
    os.unlink(probe)


#: the run folder, set by the first process for those Lightning starts (they save files there)
RUN_DIR_VARIABLE = "ILRG_ATTACK_RUN_DIR"


def is_primary_process() -> bool:
    """Is this the process that writes a multi-process run's results (global rank 0)? Read
    from the variables Lightning and cluster launchers set, before any Trainer exists."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "NODE_RANK", "LOCAL_RANK"))
