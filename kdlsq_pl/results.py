"""Result records: one JSON file per run, written atomically (temporary file, then rename)."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

REPO_DIR = Path(__file__).resolve().parents[1]
RESULT_FILE = "result.json"


def git_commit() -> str | None:
    """The repository's HEAD commit (with ``-dirty`` if the tree has changes), or ``None``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that decide the numbers."""
    out = {"python": platform.python_version()}
    for pkg in ("torch", "pytorch-lightning", "transformers", "torchmetrics", "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@contextmanager
def atomic_output(path: str | Path, *, directory: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary file (or, with ``directory``, folder) beside ``path`` to write into; when the block
    ends without an error, rename it onto ``path`` (``os.replace``: readers see the old or the new, never a
    half-written one); when it raises, remove it and re-raise. Files end up mode 0644, folders 0755.

    Args:
        replace: an existing ``path`` is replaced (a folder by renaming the old one aside first, then
            deleting it); ``False`` raises ``FileExistsError`` instead and leaves ``path`` as it was.

    Raises:
        FileExistsError: ``path`` exists and ``replace`` is false.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if path.exists() and not replace:
            raise FileExistsError(f"{path} exists; write to a new path (nothing is overwritten)")
        tmp.chmod(0o755 if directory else 0o644)
        if directory and path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`atomic_output`), synced to disk before the rename."""
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_result(out_dir: str | Path) -> dict | None:
    """The ``result.json`` in ``out_dir``, ``None`` if absent; a corrupt one is reported by path and ignored."""
    path = Path(out_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        logging.getLogger("kdlsq_pl").warning("ignoring corrupt result record %s (%s)", path, e)
        return None
