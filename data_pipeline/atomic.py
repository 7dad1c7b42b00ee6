"""One way to write a file so that no reader ever sees half of it: a unique temporary name beside it, then
a rename. Every file the project writes whole (data, tokenizers, summaries, checkpoints' safetensors, eval
JSON) goes through `atomic_write`; sparse_update keeps its own (it is a library with no project imports)."""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike[str], data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write `data` (bytes, UTF-8 text, or a function that writes to the open binary file) to `path`; the
    parent folder is created. The file follows the umask like any other (mkstemp would make it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
