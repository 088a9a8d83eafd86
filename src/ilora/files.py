"""Files in and out, one way each: the check every reader of a user's file makes, JSON read with a
damaged file named in one line, JSON written atomically, and content digests (what caches and records
are keyed by, never a path or a modification time). Pure: no torch, no transformers."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from ilora.errors import ILoRAError


def check_regular_file(path: Path, prefix: str = "") -> None:
    """`path` is a regular file ilora can read (more than once: data files are checked, then loaded).
    Every reader of a user's file calls this, so each cause reads the same: `prefix` names the role."""
    path = Path(path)
    if path.is_dir():
        raise ILoRAError(f"{prefix}{path}: a directory, not a file")
    if not path.exists():
        raise ILoRAError(f"{prefix}{path}: no such file")
    if not path.is_file():
        raise ILoRAError(
            f"{prefix}{path}: not a regular file (a pipe, socket or device); ilora reads its "
            "inputs more than once: save it to a file"
        )


def read_json(path: Path, what: str) -> Any:
    """The file's JSON value; `what` names the file in errors ("task manifest", "run summary", ...)."""
    if not Path(path).exists():
        raise ILoRAError(f"{path}: missing ({what})")
    check_regular_file(path, f"{what}: ")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))  # a byte-order mark is harmless
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ILoRAError(f"{path}: damaged {what}, not valid JSON ({err})") from None


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    """Write `data` as JSON beside `path` and rename it into place: a reader sees the old file or the
    new one, never half of one. A NaN here is a bug and fails loudly (JSON has no NaN)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=indent, default=str, allow_nan=False))
    os.replace(tmp, path)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite: what a score, a timing or a stored
    priority read back from a file must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def cache_dir() -> Path:
    """Where ilora keeps what it builds once (the SmolLM2 copy, the benchmarks' wheels): $ILORA_CACHE, or
    ilora/ under $XDG_CACHE_HOME (default ~/.cache)."""
    root = os.environ.get("ILORA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ilora"
    return Path(root)
