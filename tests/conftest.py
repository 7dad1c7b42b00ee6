"""Session fixtures shared by the trainer-level tests: one tiny base model and its background run."""
from __future__ import annotations

import pytest

from tests.launch import SMALL, train


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """`pre/`: 3 pretrain steps (checkpoints at 2 and 3); `bg/`: 3 background batches from it (2 ranks)."""
    root = tmp_path_factory.mktemp("tiny_runs")
    pre, bg = root / "pre", root / "bg"
    train("--config", "recipes/configs/tiny_pretrain.yaml", f"--output_dir={pre}", "--max_steps=3",
          "--checkpoint.interval=2", *SMALL)
    train("--config", "recipes/configs/tiny_background.yaml", f"--output_dir={bg}", f"--init_from={pre}",
          "--sparse.background_batches=3", *SMALL)
    return root
