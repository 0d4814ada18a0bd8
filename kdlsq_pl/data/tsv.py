"""Reading GLUE TSVs in the standard layout (quoting off, as BERT's ``run_classifier.py``).

Kept free of torch / transformers imports so that config validation is fast.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Mapping

from kdlsq_pl.errors import ConfigError

REPO_DIR = Path(__file__).resolve().parents[2]
#: Searched when neither ``data.glue_dir`` nor ``GLUE_DIR`` is set.
DEFAULT_GLUE_DIRS = (REPO_DIR.parent / "shared" / "data" / "glue",)

csv.field_size_limit(1 << 24)


def resolve_glue_dir(glue_dir: str | None) -> Path | None:
    """Return the local GLUE root to read, or ``None`` to use the hub.

    Order: ``glue_dir`` (``data.glue_dir``, which defaults to ``$GLUE_DIR``), then the sibling
    ``../shared/data/glue`` of this repository. An explicitly given directory that does not exist
    raises ``ConfigError`` rather than silently falling back to the hub.
    """
    if glue_dir not in (None, ""):
        path = Path(os.path.expanduser(str(glue_dir)))
        if not path.is_dir():
            raise ConfigError(f"data.glue_dir={glue_dir} is not a directory; point it (or GLUE_DIR) at a GLUE root holding <TASK>/train.tsv and dev.tsv")
        return path
    for path in DEFAULT_GLUE_DIRS:
        if path.is_dir():
            return path
    return None


def task_files(task: Mapping[str, Any], glue_root: Path) -> dict[str, Path]:
    """Map split keys (``train``, then each ``dev_files`` key) to the task's TSV paths.

    Raises ``ConfigError`` naming the first missing file.
    """
    folder = glue_root / task["dir"]
    if not folder.is_dir():
        raise ConfigError(f"task={task['name']}: no folder {folder} in the GLUE directory {glue_root}; allowed: a GLUE root with {task['dir']}/{task['train_file']}")
    files = {"train": folder / task["train_file"]}
    files.update({key: folder / name for key, name in task["dev_files"].items()})
    for path in files.values():
        if not path.is_file():
            raise ConfigError(f"task={task['name']}: missing file {path}; the GLUE layout needs {', '.join(p.name for p in files.values())}")
    return files


def read_glue_tsv(path: Path, task: Mapping[str, Any]) -> dict[str, list]:
    """Read one labelled GLUE TSV into columns ``text_a``, ``text_b``, ``label``, ``idx``.

    Args:
        path: the TSV (UTF-8, an optional BOM as in MRPC, quoting off).
        task: the task config (``header``, ``columns``, ``labels``).

    Returns:
        Lists of equal length: ``label`` holds class ids (int) or, for regression (empty
        ``labels``), float scores; ``idx`` is the 0-based row number (the example id).

    Raises:
        ConfigError: a file that is not UTF-8, empty, has a row with too few columns, or a label
        outside the task's label set; the message names the file and line.
    """
    cols = task["columns"]
    labels = list(task["labels"])
    label_ids = {name: i for i, name in enumerate(labels)}
    need = max(c for c in cols.values() if c is not None and c >= 0) + 1
    out: dict[str, list] = {"text_a": [], "text_b": [], "label": [], "idx": []}
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); GLUE TSVs are UTF-8") from None
    if task["header"]:
        rows = rows[1:]
    if not rows:
        raise ConfigError(f"{path}: no data rows; expected a GLUE {task['dir']} TSV")
    first_line = 2 if task["header"] else 1
    for n, row in enumerate(rows):
        line = n + first_line
        if len(row) < need:
            raise ConfigError(f"{path}:{line}: {len(row)} columns, task={task['name']} needs at least {need} (columns {dict(cols)})")
        raw = row[cols["label"]].strip()
        if labels:
            if raw not in label_ids:
                raise ConfigError(f"{path}:{line}: label {raw!r} is not in task={task['name']} labels; allowed: {', '.join(labels)}")
            label: int | float = label_ids[raw]
        else:
            try:
                label = float(raw)
            except ValueError:
                raise ConfigError(f"{path}:{line}: label {raw!r} is not a number; task={task['name']} is a regression task") from None
        out["text_a"].append(row[cols["text_a"]])
        out["text_b"].append(row[cols["text_b"]] if cols.get("text_b") is not None else None)
        out["label"].append(label)
        out["idx"].append(n)
    return out
