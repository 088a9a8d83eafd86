"""Reading a JSON file, with a damaged or missing one as a one-line error naming it (pure)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ILoRAError
from .paths import check_regular_file


def read_json(path: Path, what: str) -> Any:
    """The file's JSON value; `what` names the file in errors ("task manifest", "run summary", ...)."""
    if not Path(path).exists():
        raise ILoRAError(f"{path}: missing ({what})")
    check_regular_file(path, f"{what}: ")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))  # a byte-order mark is harmless
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ILoRAError(f"{path}: damaged {what}, not valid JSON ({err})") from None
