"""Files that exist whole or not at all: every writer goes through a sibling temporary name and a rename,
so a reader (Prometheus, a resumed prep, a student looking for its teacher) never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> Path:
    """`write` fills the temporary path it is given; the result then replaces `path` in one rename."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    return replace_atomically(path, lambda tmp: tmp.write_text(text))


def write_json_atomically(path: Path, content: Any, indent: int | None = 2) -> Path:
    return write_text_atomically(path, json.dumps(content, indent=indent) + "\n")
