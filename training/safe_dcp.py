"""torch.distributed.checkpoint without unpickling arbitrary objects.

Stock DCP reads `.metadata` with `pickle.load` and non-tensor entries with `torch.load(weights_only=False)`:
a crafted checkpoint would run code on load. Here the metadata goes through an unpickler that only
resolves DCP's own metadata classes (and torch sizes, dtypes, paths), and byte entries load with
`weights_only=True`. Anything else is refused with a one-line ValueError naming the checkpoint.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

# Exact (module, name) pairs only. A whole-module allowance let a protocol-4 pickle name `os.system` as
# the dotted global "os.system" looked up through the metadata module's own `os` attribute.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {(_DCP_METADATA, n) for n in ("BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex",
                                         "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                                         "_MEM_FORMAT_ENCODING")}
_ALLOWED |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
            ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
            ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if "." in name:   # protocol 4 resolves dotted names attribute by attribute: never follow them
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} does not hold checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _corrupt(path: str | Path, err: BaseException) -> ValueError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(f"checkpoint {path} is truncated, corrupted or not a checkpoint ({first[:200]}); "
                      "delete it to resume from an earlier one")


def stored_keys(path: str | Path) -> set[str]:
    return set(stored_shapes(path))


def stored_shapes(path: str | Path) -> dict[str, tuple[int, ...] | None]:
    """Every stored key and, for tensors, its (global) shape: read from the metadata only."""
    try:
        meta = SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata
        return {k: (tuple(v.size) if hasattr(v, "size") else None) for k, v in meta.items()}
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError, IndexError) as err:
        raise _corrupt(path, err) from None


def check_shapes(path: str | Path, expected: dict[str, tuple[int, ...]]) -> None:
    """A healthy checkpoint of another model size: say what differs (never call it corrupted)."""
    stored = stored_shapes(path)
    differ = [(k, stored[k], shape) for k, shape in expected.items()
              if stored.get(k) is not None and tuple(stored[k]) != tuple(shape)]
    if differ:
        key, there, here = differ[0]
        raise ValueError(f"checkpoint {path} was written for another model: {len(differ)} weight(s) differ in shape, "
                         f"e.g. {key} is {list(there)} there and {list(here)} in this model; use the model.preset / "
                         "model.overrides of the run that wrote it")


def load(state: dict, path: str | Path) -> None:
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)),
                 planner=SafeLoadPlanner(allow_partial_load=True))
    except (CheckpointException, OSError, EOFError, pickle.UnpicklingError, RuntimeError) as err:
        raise _corrupt(path, err) from None
