"""Background statistics: counting, the safetensors file, refusing foreign files, checkpoint state."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_update import SparseMemoryFinetuner, SparseMemoryFinetuningArgs


def make_finetuner(num_slots: int = 16, **kwargs) -> SparseMemoryFinetuner:
    args = SparseMemoryFinetuningArgs(enabled=True, top_t=kwargs.pop("top_t", 3), **kwargs)
    return SparseMemoryFinetuner(args, torch.nn.Parameter(torch.zeros(num_slots, 2)))


def collect(ft: SparseMemoryFinetuner, batches: list[torch.Tensor]) -> None:
    ft.background_tracker.start_collection()
    for b in batches:
        ft.background_tracker.add_batch_indices(b)
    ft.background_tracker.stop_collection()


BATCHES = [
    torch.tensor([[1, 1, 2], [3, -1, -1]]),
    torch.tensor([[2, 2, 5], [5, 5, -1]]),
    torch.tensor([[-1, -1, -1], [-1, -1, -1]]),
    torch.tensor([[1, 15, 0], [0, 0, 0]]),
]


def test_document_frequency_counts_batches_not_lookups() -> None:
    ft = make_finetuner()
    tracker = ft.background_tracker
    tracker.start_collection()
    counts = tracker.add_batch_indices(BATCHES[0])
    assert counts[:4].tolist() == [0, 2, 1, 1]
    for b in BATCHES[1:]:
        tracker.add_batch_indices(b)
    tracker.stop_collection()
    expected = [0] * 16
    for b in BATCHES:
        for i in set(b[b >= 0].tolist()):
            expected[i] += 1
    assert tracker.document_frequency.tolist() == expected
    assert tracker.document_frequency.dtype == torch.int64
    assert tracker.num_batches == 4
    with pytest.raises(RuntimeError, match="start_collection"):
        tracker.add_batch_indices(BATCHES[0])
    tracker.start_collection(reset=False)  # resume keeps the statistics
    tracker.add_batch_indices(BATCHES[0])
    assert tracker.num_batches == 5 and tracker.document_frequency[1].item() == 3
    tracker.start_collection()  # default: start over
    assert tracker.num_batches == 0 and int(tracker.document_frequency.sum()) == 0


def test_save_load_roundtrip_and_metadata(tmp_path: Path) -> None:
    ft = make_finetuner()
    collect(ft, BATCHES)
    path = tmp_path / "bg_indices.pt"
    ft.save_background_indices(path, metadata={"corpus": "dclm-sample"})
    other = make_finetuner()
    meta = other.load_background_indices(path)
    assert torch.equal(other.background_tracker.document_frequency, ft.background_tracker.document_frequency)
    assert other.background_tracker.num_batches == 4
    assert meta["corpus"] == "dclm-sample" and meta["num_slots"] == "16" and meta["format_version"] == "1"
    assert not list(tmp_path.glob("*.tmp.*"))
    # The file is plain safetensors: readable without this package.
    from safetensors.torch import load_file

    assert load_file(str(path))["document_frequency"].tolist() == ft.background_tracker.document_frequency.tolist()
    with pytest.raises(ValueError, match="reserved"):
        ft.save_background_indices(tmp_path / "x.pt", metadata={"num_slots": "3"})


def test_load_refuses_other_memory_size(tmp_path: Path) -> None:
    ft = make_finetuner(16)
    collect(ft, BATCHES)
    path = tmp_path / "bg.safetensors"
    ft.save_background_indices(path)
    with pytest.raises(ValueError) as err:
        make_finetuner(32).load_background_indices(path)
    msg = str(err.value)
    assert str(path) in msg and "N=16" in msg and "N=32" in msg and "re-run the background stage" in msg
    assert "\n" not in msg


def test_save_without_batches_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no background batches"):
        make_finetuner().save_background_indices(tmp_path / "bg.pt")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="background stage"):
        make_finetuner().load_background_indices(tmp_path / "nope.pt")


def test_truncated_and_garbage_files_raise_value_error(tmp_path: Path) -> None:
    ft = make_finetuner()
    collect(ft, BATCHES)
    good = tmp_path / "good.pt"
    ft.save_background_indices(good)
    data = good.read_bytes()
    cases = {
        "truncated.pt": data[: len(data) - 20],
        "header_only.pt": data[:8],
        "empty.pt": b"",
        "text.pt": b"hello world, not a tensor file at all",
    }
    for name, payload in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(ValueError, match="not a valid") as err:
            make_finetuner().load_background_indices(path)
        assert str(path) in str(err.value)


def test_foreign_safetensors_files_raise_value_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cases = {
        "no_meta.st": ({"document_frequency": torch.zeros(16, dtype=torch.int64)}, None),
        "wrong_dtype.st": (
            {"document_frequency": torch.zeros(16, dtype=torch.float32)},
            {"format": "sparse_update.background", "format_version": "1", "num_slots": "16", "num_batches": "3"},
        ),
        "df_too_big.st": (
            {"document_frequency": torch.full((16,), 9, dtype=torch.int64)},
            {"format": "sparse_update.background", "format_version": "1", "num_slots": "16", "num_batches": "3"},
        ),
        "newer.st": (
            {"document_frequency": torch.zeros(16, dtype=torch.int64)},
            {"format": "sparse_update.background", "format_version": "99", "num_slots": "16", "num_batches": "3"},
        ),
    }
    for name, (tensors, meta) in cases.items():
        path = tmp_path / name
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(ValueError, match="not a valid") as err:
            make_finetuner(16).load_background_indices(path)
        assert str(path) in str(err.value)


class _RunsCodeOnLoad:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_never_unpickled(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "bg_indices.pt"
    with open(evil, "wb") as f:
        if writer == "pickle":
            pickle.dump(_RunsCodeOnLoad(str(marker)), f)
        else:
            torch.save({"document_frequency": _RunsCodeOnLoad(str(marker))}, f)
    with pytest.raises(ValueError, match="not a valid") as err:
        make_finetuner().load_background_indices(evil)
    assert str(evil) in str(err.value)
    assert not marker.exists(), "loading the background file executed code from it"

    # Control: the payload is live — unpickling a copy in another process does run it.
    control_marker = tmp_path / "CONTROL"
    control = tmp_path / "control.pt"
    with open(control, "wb") as f:
        pickle.dump(_RunsCodeOnLoad(str(control_marker)), f)
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(control)!r}, 'rb'))"], check=True)
    assert control_marker.exists()


def test_state_dict_roundtrip_through_torch_save(tmp_path: Path) -> None:
    ft = make_finetuner(16, top_t=2)
    collect(ft, BATCHES)
    ft.update_trainable_indices(torch.tensor([4, 4, 6, 7, 7, 7]))
    path = tmp_path / "ckpt.pt"
    torch.save(ft.state_dict(), path)
    restored = make_finetuner(16, top_t=2)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(restored.trainable_indices, ft.trainable_indices)
    assert torch.equal(restored.background_tracker.document_frequency, ft.background_tracker.document_frequency)
    assert restored.background_tracker.num_batches == 4
    assert not restored.background_tracker.is_collecting
    # The next step continues identically (overlap with the restored selection included).
    nxt = torch.tensor([4, 6, 6, 9])
    assert restored.update_trainable_indices(nxt) == ft.update_trainable_indices(nxt)

    fresh = make_finetuner(16)
    fresh.load_state_dict(make_finetuner(16).state_dict())
    assert fresh.trainable_indices is None
    with pytest.raises(ValueError, match="N=16.*N=8"):
        make_finetuner(8).load_state_dict(ft.state_dict())
    with pytest.warns(UserWarning, match="top_t"):
        make_finetuner(16, top_t=5).load_state_dict(ft.state_dict())


def test_collection_state_survives_checkpoint() -> None:
    ft = make_finetuner()
    ft.background_tracker.start_collection()
    ft.background_tracker.add_batch_indices(BATCHES[0])
    resumed = make_finetuner()
    resumed.load_state_dict(ft.state_dict())
    assert resumed.background_tracker.is_collecting
    resumed.background_tracker.add_batch_indices(BATCHES[1])
    ft.background_tracker.add_batch_indices(BATCHES[1])
    assert torch.equal(resumed.background_tracker.document_frequency, ft.background_tracker.document_frequency)
