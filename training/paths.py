"""Output paths handed over on a command line: why one cannot be written, as one line (checked up front,
before any work, so a bad --out never costs a run and never surfaces as a traceback)."""
from __future__ import annotations

import os
from pathlib import Path


def output_path_problem(path: str | os.PathLike[str], *, want_dir: bool) -> str | None:
    """None when `path` can be created or written as a directory (`want_dir`) or as a file; else the reason."""
    if not str(path).strip():
        return "is empty"
    path = Path(path)
    if path.exists():
        if want_dir and not path.is_dir():
            return "is a file, not a directory"
        if not want_dir and path.is_dir():
            return "is a directory, not a file"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        return f"lies under {existing}, which is a file"
    writable_dir = existing if existing.is_dir() else existing.parent
    if not os.access(writable_dir, os.W_OK | os.X_OK):
        return f"cannot be written ({writable_dir} is not writable)"
    return None
