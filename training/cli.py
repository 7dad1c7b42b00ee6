"""What the recipes' command lines share: fire parses `--key=value` words; errors are one line, exit code 2."""
from __future__ import annotations

import os
import sys
import traceback

import fire

from training.replicas import ReplicaDivergence


def run_cli(fn, argv: list[str], *, name: str) -> int:
    """Run `fn` through fire; user errors become one `error: ...` line and exit code 2 (SMF_TRACEBACK=1
    shows the traceback)."""
    try:
        fire.Fire(fn, command=argv, name=name)
        return 0
    except (ValueError, FileNotFoundError, FloatingPointError, ReplicaDivergence) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {message}", file=sys.stderr, flush=True)
        if os.environ.get("SMF_TRACEBACK"):
            traceback.print_exc()
        return 2
    except fire.core.FireExit as err:
        return int(err.code or 0)
