"""The iterator and resume protocol the fact and document streams share: one batch per item, in order.

A subclass holds its items (facts, document chunks) and says how one item becomes a :class:`Batch`
(``batch_for``) and what names it (``item_id``); this base walks the items ``num_passes`` times and saves
and restores the position. A saved state also records how many items there were and the first one's id,
so a state written for other items is refused instead of silently resuming somewhere else. The state's
key names are the subclass's (``num_facts``/``first_fact_id``, ``num_chunks``/``first_chunk_id``): the
checkpoints already written keep loading.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from data_pipeline.batch import Batch


class ItemStream:
    unit: ClassVar[str] = "items"            # what an item is called in the state and in messages
    id_name: ClassVar[str] = "item"          # the state key of the first item's id: first_<id_name>_id

    def __init__(self, items: Sequence[Any], *, num_passes: int) -> None:
        self._items = items
        self.num_passes = num_passes
        self.position = 0

    def batch_for(self, item: Any) -> Batch:
        raise NotImplementedError

    def item_id(self, item: Any) -> str:
        return item.id

    def __len__(self) -> int:
        return len(self._items) * self.num_passes

    def __iter__(self) -> ItemStream:
        return self

    def __next__(self) -> Batch:
        if self.position >= len(self):
            raise StopIteration
        batch = self.batch_for(self._items[self.position % len(self._items)])
        self.position += 1
        return batch

    def _keys(self) -> tuple[str, str]:
        return f"num_{self.unit}", f"first_{self.id_name}_id"

    def state_dict(self) -> dict:
        count, first = self._keys()
        return {"position": self.position, count: len(self._items), first: self.item_id(self._items[0])}

    def load_state_dict(self, state: dict) -> None:
        count, first = self._keys()
        name, have = type(self).__name__, self.item_id(self._items[0])
        if state.get(count) != len(self._items) or state.get(first) != have:
            raise ValueError(f"{name} state is for {state.get(count)} {self.unit} starting at {state.get(first)!r}, "
                             f"this stream has {len(self._items)} starting at {have!r}")
        if not 0 <= int(state["position"]) <= len(self):
            raise ValueError(f"{name} position {state['position']} out of range 0..{len(self)}")
        self.position = int(state["position"])
