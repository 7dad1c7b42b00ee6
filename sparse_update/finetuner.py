"""SparseMemoryFinetuner: global TF-IDF row selection plus the mask / row-sync gradient hooks.

Data path per step (DESIGN.md §4): memory indices → local counts → all_reduce(SUM) → TF-IDF → top-t rows;
backward (tensor hook keeps only those rows) → optimizer step pre-hook (mask again, all_reduce the t×d
selected rows, divide by world size, write them back as the only nonzero rows) → SGD.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from . import comm
from .args import SparseMemoryFinetuningArgs
from .compat import ReferenceFinetunerAPI
from .background import BackgroundTracker, load_background_statistics, save_background_file
from .hook import gather_rows_, mask_rows, rows_to_grad
from .tfidf import (Indices, count_slot_accesses, kl_scores, quantiles,
                    rank_lexicographic, score_slots, select_all_accessed, sequence_votes, sequences_read,
                    top_k_positions)

STATE_VERSION = 1


class SparseMemoryFinetuner(ReferenceFinetunerAPI):
    """Selects the trainable rows of a memory-values table each step and restricts updates to them.

    `values` is the values nn.Parameter [N, d] (not the keys). When torch.distributed is initialised (or
    `process_group` is given), counts, background statistics and the selected gradient rows are reduced
    over that group, so every rank selects the same rows and keeps a bit-identical table.

    The reference implementation's get_stats(), collect_background_indices() and cleanup() come from
    ReferenceFinetunerAPI (compat.py).
    """

    def __init__(
        self,
        args: SparseMemoryFinetuningArgs,
        values: torch.nn.Parameter,
        *,
        process_group: "dist.ProcessGroup | None" = None,
    ) -> None:
        if not isinstance(args, SparseMemoryFinetuningArgs):
            raise TypeError(f"args must be SparseMemoryFinetuningArgs, got {type(args).__name__}")
        if not isinstance(values, Tensor) or values.dim() < 1:
            raise TypeError("values must be the memory-values parameter, a tensor of shape [N, value_dim]")
        if values.is_meta:
            raise ValueError(
                "the memory-values parameter is on the meta device; build the finetuner after the model is "
                "materialised (to_empty() replaces meta parameters with new objects the hooks would miss)"
            )
        if args.enabled and not values.requires_grad:
            raise ValueError(
                "the memory-values parameter does not require grad; sparse memory finetuning trains it, "
                "so set values.requires_grad_(True) (freeze the other parameters instead)"
            )
        self.args = args
        self._values = values
        self._process_group = process_group
        self._num_slots = int(values.shape[0])
        self.background_tracker = BackgroundTracker(num_slots=self._num_slots, global_counts=self._global_counts)
        self._trainable: Tensor | None = None
        self._grad_synced = False  # set by sync_gradients(), cleared by the next backward or selection
        self._optimizer_hooks: list[tuple[weakref.ref, RemovableHandle]] = []
        self.synced_bytes_last_step = 0
        """Bytes all-reduced for the values gradient by the last sync (t×d elements + 1 flag; 0 single-process)."""
        self.synced_rows_last_step = 0
        """Rows all-reduced for the values gradient by the last sync (0 single-process)."""
        self.count_bytes_last_step = 0
        """Bytes of slot counts the last count exchange moved per rank (N x 4 dense, or world x read slots x 8
        sparse; 0 single-process). See SparseMemoryFinetuningArgs.count_exchange."""
        self._param_hook: RemovableHandle | None = None
        self._post_hook: RemovableHandle | None = None
        self._grad_accumulator: Any = None   # values' AccumulateGrad node (set when enabled)
        self._mask_after_accumulate: Tensor | None = None
        """Rows to keep, set by the tensor hook when it left a dense gradient for the post-accumulate hook
        to mask in place (see _on_backward)."""
        if args.enabled:
            # A weak reference: the parameter must not keep a dropped finetuner (and its state) alive.
            ref = weakref.ref(self)

            def _grad_hook(grad: Tensor) -> Tensor | None:
                finetuner = ref()
                return None if finetuner is None else finetuner._on_backward(grad)

            def _after_accumulate(param: Tensor) -> None:
                finetuner = ref()
                if finetuner is not None:
                    finetuner._on_accumulated(param)

            self._param_hook = values.register_hook(_grad_hook)
            with torch.enable_grad():   # values' AccumulateGrad node (the tensor keeps it while it lives)
                self._grad_accumulator = values.view_as(values).grad_fn.next_functions[0][0]
            # Where .grad may be modified: the in-place mask of a dense gradient, and (dense_output) the
            # densifying of a sparse one (a tensor hook may not change the layout; AdamW then works even
            # without attach()).
            self._post_hook = values.register_post_accumulate_grad_hook(_after_accumulate)

    # ------------------------------------------------------------------ selection
    @property
    def num_slots(self) -> int:
        """N, the number of rows of the values table."""
        return self._num_slots

    @property
    def trainable_indices(self) -> Tensor | None:
        """Sorted LongTensor of the rows trainable this step (None before the first selection)."""
        return self._trainable

    def _device(self) -> torch.device:
        return self._values.device

    def _group(self) -> "dist.ProcessGroup | None":
        return comm.resolve_group(self._process_group)

    def _global_counts(self, indices: Indices) -> Tensor:
        """int32 counts [N] of the global batch: local counts, then combined over ranks by args.count_exchange:
        one all_reduce(SUM) of the N counts, or an all_gather of each rank's (slot, count) pairs of the slots
        it read (padded to the largest rank's number: one all_reduce(MAX) of a scalar decides the size and,
        under "auto", the cheaper exchange, alike on every rank). Exact integers either way."""
        counts = count_slot_accesses(indices, self._num_slots, device=self._device())
        group = self._group()
        world = comm.world_size(group)
        if world == 1:
            self.count_bytes_last_step = 0
            return counts
        dense_bytes = counts.numel() * counts.element_size()
        mode = self.args.count_exchange
        if mode == "dense":
            self.count_bytes_last_step = dense_bytes
            return comm.all_reduce_sum_(counts, group)
        read = counts.nonzero().flatten()
        width = int(comm.all_reduce_max_(torch.tensor([read.numel()], dtype=torch.int64, device=counts.device),
                                         group).item())
        sparse_bytes = world * width * 2 * counts.element_size()
        if mode == "auto" and sparse_bytes >= dense_bytes:
            self.count_bytes_last_step = dense_bytes
            return comm.all_reduce_sum_(counts, group)
        pairs = torch.full((width, 2), -1, dtype=counts.dtype, device=counts.device)
        pairs[:read.numel(), 0] = read.to(counts.dtype)
        pairs[:read.numel(), 1] = counts.index_select(0, read)
        total = torch.zeros_like(counts)
        for part in comm.all_gather(pairs, group):
            real = part[:, 0] >= 0
            total.index_add_(0, part[real, 0].long(), part[real, 1])
        self.count_bytes_last_step = sparse_bytes
        return total

    @torch.no_grad()
    def update_trainable_indices(self, indices: Indices) -> dict[str, float]:
        """Select this step's trainable rows from the memory indices of this rank's batch.

        `indices`: LongTensor of any shape, or a list of them (one per memory layer); -1 = padding.
        Collective when distributed (every rank calls it once per step, before backward). Returns logging
        statistics: accessed (unique slots in the global batch), selected, overlap_prev (fraction of the
        selection also selected last step; 0 on the first step), score_p50 / score_p90 / score_max (over
        the selected rows). Returns {} when args.enabled is False.
        """
        if not self.args.enabled:
            return {}
        tracker = self.background_tracker
        if self.args.mode == "top_t" and self.args.use_idf and tracker.num_batches == 0:
            raise RuntimeError(
                "use_idf=True needs background statistics: call load_background_indices(path) (or collect "
                "them with background_tracker) before update_trainable_indices, or set use_idf=False"
            )
        ranking = self.args.ranking
        if self.args.mode == "top_t" and ranking == "kl" and tracker.access_counts is None:
            raise RuntimeError(
                "ranking='kl' needs the background access counts, which these background statistics (written "
                "before they were recorded) lack; re-run the background stage"
            )
        counts = self._global_counts(indices)
        # Work on the accessed slots only: after the bincount, nothing below touches all N slots.
        accessed = select_all_accessed(counts)
        idf = None
        if self.args.use_idf:
            idf_all = tracker.inverse_document_frequency()
            idf = idf_all.index_select(0, accessed.to(idf_all.device))
        scores = score_slots(counts.index_select(0, accessed), idf)     # TF-IDF (TF when idf is None)
        extra: dict[str, float] = {}
        if self.args.mode != "top_t":
            selected, selected_scores = accessed, scores
        elif ranking == "kl":
            q = tracker.background_access_probability()
            scores = kl_scores(counts.index_select(0, accessed), q.index_select(0, accessed.to(q.device)))
            positions = top_k_positions(scores, self.args.top_t)
            selected, selected_scores = accessed[positions], scores[positions]
        elif ranking == "seq_tfidf":
            # every sequence's own top t/R slots (R = sequences of the global batch that read something), their
            # union first (most-voted first when it overflows), the rest of the budget by the batch TF-IDF
            group = self._group()
            rows = comm.all_reduce_sum_(torch.tensor([sequences_read(indices)], dtype=torch.int64, device=self._device()), group)
            share = max(1, self.args.top_t // max(1, int(rows.item())))
            votes = comm.all_reduce_sum_(sequence_votes(indices, self._num_slots, tracker.inverse_document_frequency(),
                                                        share, device=self._device()), group)
            votes = votes.index_select(0, accessed)
            positions = rank_lexicographic(votes, scores, self.args.top_t)
            selected, selected_scores = accessed[positions], scores[positions]
            extra = {"seq_union": int((votes > 0).sum()), "seq_share": share}
        else:
            positions = top_k_positions(scores, self.args.top_t)
            selected, selected_scores = accessed[positions], scores[positions]
        previous = self._trainable
        self._trainable = selected.to(self._device())
        self._grad_synced = False

        num_selected = selected.numel()
        overlap = 0.0
        if previous is not None and num_selected:
            overlap = torch.isin(selected, previous.to(selected.device)).sum().item() / num_selected
        p50, p90, pmax = quantiles(selected_scores, (0.5, 0.9, 1.0))
        return {
            "accessed": accessed.numel(),
            "selected": num_selected,
            "overlap_prev": overlap,
            "score_p50": p50,
            "score_p90": p90,
            "score_max": pmax,
            **extra,
        }

    def _require_selection(self) -> Tensor:
        if self._trainable is None:
            raise RuntimeError(
                "no trainable memory rows selected yet: call finetuner.update_trainable_indices(indices) "
                "with this batch's memory indices before backward() / optimizer.step()"
            )
        return self._trainable

    # ------------------------------------------------------------------ gradient hooks
    def _on_backward(self, grad: Tensor) -> Tensor | None:
        self._grad_synced = False  # new gradient contributions: the next step must sync again
        self._mask_after_accumulate = None
        if not self.args.mask_in_backward:
            return None
        if self.args.mode == "all_accessed" and self._trainable is not None:
            return None  # every row this rank read is selected (union over ranks): the mask is the identity
        rows = self._require_selection().to(grad.device)
        if not grad.is_sparse and not grad.requires_grad and self._values.grad is None and self._accumulates():
            # A dense gradient that becomes .grad as it is (the first contribution since zero_grad): mask it
            # there, in place, once accumulated, instead of building a second N x d tensor here (a tensor hook
            # must not modify its input). The same values as mask_rows: the kept rows untouched, zeros elsewhere.
            self._mask_after_accumulate = rows
            return None
        # sparse, or accumulating onto an existing .grad (only this contribution is masked by this selection)
        return mask_rows(grad, rows, dense_output=False)  # a tensor hook must keep the gradient's layout

    def _accumulates(self) -> bool:
        """Whether this backward accumulates into values.grad (not torch.autograd.grad, whose result the
        post-accumulate hook never sees: there the tensor hook masks as before)."""
        try:
            return bool(torch._C._will_engine_execute_node(self._grad_accumulator))
        except (AttributeError, RuntimeError, TypeError):   # autograd.grad(), or a torch without this query
            return False

    def _on_accumulated(self, param: Tensor) -> None:
        rows, self._mask_after_accumulate = self._mask_after_accumulate, None
        grad = param.grad
        if grad is None:
            return
        if rows is not None and not grad.is_sparse:
            with torch.no_grad():
                self._masked_in_place(grad, rows)
        if self.args.dense_output and grad.is_sparse:
            param.grad = grad.to_dense()

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Mask the values gradient to the trainable rows and average those rows over ranks (in place).

        The optimizer pre-hook from attach() calls this; grad_sq_norm() calls it earlier when a clip needs
        the norm of the synced gradient. Idempotent; collective when distributed.
        """
        if not self.args.enabled:
            return
        param = self._values
        rows = self._require_selection().to(param.device)
        grad = param.grad
        group = self._group()
        world = comm.world_size(group)
        if world == 1:
            self.synced_bytes_last_step = 0
            self.synced_rows_last_step = 0
            if grad is not None:
                param.grad = self._masked_in_place(grad, rows)
            self._grad_synced = True
            return

        # One all_reduce: the t×d selected rows plus a flag saying whether this rank had a gradient at all,
        # so ranks without one (no memory use this step) still take part and every rank decides alike.
        num_rows = rows.numel()
        row_shape = tuple(param.shape[1:])
        buf = torch.empty(num_rows * math.prod(row_shape) + 1, dtype=param.dtype, device=param.device)
        rows_buf = buf[:-1].view(num_rows, *row_shape)
        if grad is None:
            rows_buf.zero_()
            buf[-1] = 0
        else:
            gather_rows_(rows_buf, grad, rows)
            buf[-1] = 1
        comm.all_reduce_sum_(buf, group)
        self.synced_bytes_last_step = buf.numel() * buf.element_size()
        self.synced_rows_last_step = num_rows
        self._grad_synced = True
        if buf[-1].item() == 0:  # no rank had a gradient: leave it None everywhere (optimizer skips it)
            param.grad = None
            return
        rows_buf.div_(world)
        dense = self.args.dense_output or (grad is not None and not grad.is_sparse)
        if dense and grad is not None and not grad.is_sparse and grad.dtype == param.dtype:
            grad.zero_()
            grad.index_copy_(0, rows, rows_buf)
        else:
            param.grad = rows_to_grad(rows_buf, rows, shape=param.shape, sparse=not dense)

    @torch.no_grad()
    def grad_sq_norm(self) -> float:
        """Squared L2 norm of the values gradient the next optimizer step applies: masked to the selected
        rows and averaged over ranks, hence the same on every rank (no further reduction), e.g. for a global
        gradient clip. Masks and syncs first unless that was done since the last backward (collective when
        distributed); the optimizer pre-hook then has nothing left to do."""
        if not self.args.enabled:
            return 0.0
        if not self._grad_synced:
            self.sync_gradients()
        return float(self.masked_grad_sq_norm())

    @torch.no_grad()
    def masked_grad_sq_norm(self) -> Tensor:
        """Squared L2 norm of the values gradient as it stands (a dense one summed over the selected rows, a
        sparse one over the rows it holds): a 0-dim float64 tensor on the table's device -- no host sync, no
        collective, no mask or sync of its own. Read once the mask and row sync ran (e.g. from an optimizer
        step pre-hook registered after attach()'s), it is the norm of the gradient the step applies, the same
        on every rank."""
        grad = self._values.grad
        if grad is None:
            return torch.zeros((), dtype=torch.float64, device=self._values.device)
        if grad.is_sparse:
            rows = grad.coalesce().values()
        elif self.args.enabled and self._trainable is not None:
            # masked: only the selected rows are nonzero, so sum over them, not over all N rows
            rows = grad.index_select(0, self._trainable.to(grad.device))
        else:
            rows = grad
        return torch.linalg.vector_norm(rows, dtype=torch.float64) ** 2

    def _masked_in_place(self, grad: Tensor, rows: Tensor) -> Tensor:
        if grad.is_sparse:
            return mask_rows(grad, rows, dense_output=self.args.dense_output)
        if 8 * rows.numel() > grad.shape[0]:
            # many rows kept (all_accessed): zero the others in place instead of copying the kept ones out
            # and back (the same values: kept rows untouched, +0.0 elsewhere)
            drop = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
            drop[rows] = False
            grad.index_fill_(0, drop.nonzero().flatten(), 0)
            return grad
        kept = grad.index_select(0, rows)
        grad.zero_()
        grad.index_copy_(0, rows, kept)
        return grad

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Register the mask + row-sync step pre-hook on `optimizer` (which must hold the values param).

        Returns the hook handle (handle.remove() detaches it). Attaching the same optimizer twice returns
        the existing handle. With enabled=False nothing is registered and an inert handle is returned.
        """
        if not self.args.enabled:
            return RemovableHandle(OrderedDict())  # inert: removes nothing
        held = any(p is self._values for group in optimizer.param_groups for p in group["params"])
        if not held:
            raise ValueError(
                "the optimizer does not hold the values parameter given to SparseMemoryFinetuner; pass the "
                "same nn.Parameter object (build the finetuner after the model is materialised/parallelised)"
            )
        for opt_ref, handle in self._optimizer_hooks:
            if opt_ref() is optimizer and handle.id in getattr(optimizer, "_optimizer_step_pre_hooks", {}):
                return handle
        if self.args.mode == "top_t":
            for group in optimizer.param_groups:
                if any(p is self._values for p in group["params"]) and (
                    group.get("momentum", 0) or group.get("weight_decay", 0)
                ):
                    warnings.warn(
                        "momentum or weight decay on the memory values moves rows outside the top-t "
                        "selection; the paper uses plain SGD (momentum=0, weight_decay=0)",
                        stacklevel=2,
                    )
        ref = weakref.ref(self)

        def _pre_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            finetuner = ref()
            if finetuner is not None:
                finetuner._before_step()

        handle = optimizer.register_step_pre_hook(_pre_step)
        self._optimizer_hooks.append((weakref.ref(optimizer), handle))
        return handle

    def _before_step(self) -> None:
        if not self._grad_synced:
            self.sync_gradients()
        self._grad_synced = False  # consumed by this step

    def detach(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove the step pre-hooks registered by attach() (all, or only those on `optimizer`)."""
        keep = []
        for opt_ref, handle in self._optimizer_hooks:
            if optimizer is None or opt_ref() is optimizer:
                handle.remove()
            else:
                keep.append((opt_ref, handle))
        self._optimizer_hooks = keep

    def remove(self) -> None:
        """Remove every hook (optimizer pre-hooks and the gradient hook); the finetuner becomes inert."""
        self.detach()
        for handle in (self._param_hook, self._post_hook):
            if handle is not None:
                handle.remove()
        self._param_hook = self._post_hook = None

    # ------------------------------------------------------------------ background statistics
    def save_background_indices(self, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> None:
        """Write the background statistics (safetensors). Collective when distributed: rank 0 writes,
        then all ranks wait, so a following load_background_indices() on any rank sees the file
        (the path must be on a filesystem every rank can read)."""
        tracker = self.background_tracker
        if tracker.num_batches == 0:
            raise RuntimeError(
                "no background batches collected: call background_tracker.start_collection() and "
                "add_batch_indices() for each background batch before save_background_indices()"
            )
        group = self._group()
        if comm.rank(group) == 0:
            meta = {"torch_version": torch.__version__, **dict(metadata or {})}
            save_background_file(
                path, document_frequency=tracker.document_frequency, num_batches=tracker.num_batches,
                access_counts=tracker.access_counts, metadata=meta,
            )
        comm.barrier(group)

    def load_background_indices(self, path: str | os.PathLike) -> dict[str, str]:
        """Load background statistics written by save_background_indices(); returns the file's metadata.

        Raises ValueError naming the file if it is not a valid background file or was made for another N.
        """
        df, num_batches, access, meta = load_background_statistics(path, num_slots=self._num_slots)
        tracker = self.background_tracker
        tracker.stop_collection()
        tracker.set_statistics(df, num_batches, access)      # moved to the tracker's device
        return meta

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on (loadable with torch.load(weights_only=True))."""
        tracker = self.background_tracker
        trainable = self._trainable
        return {
            "version": STATE_VERSION,
            "args": self.args.to_dict(),
            "num_slots": self._num_slots,
            "document_frequency": tracker.document_frequency.detach().cpu().clone(),
            "num_batches": tracker.num_batches,
            **({"access_counts": tracker.access_counts.detach().cpu().clone()}
               if tracker.access_counts is not None else {}),
            "collecting": tracker.is_collecting,
            "has_trainable_indices": trainable is not None,
            "trainable_indices": (
                trainable.detach().cpu().clone() if trainable is not None else torch.zeros(0, dtype=torch.long)
            ),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state from state_dict(); ValueError when it was made for another N or is malformed."""
        missing = {"version", "num_slots", "document_frequency", "num_batches", "trainable_indices"} - set(state)
        if missing:
            raise ValueError(f"sparse_update state dict lacks {sorted(missing)}; was it written by state_dict()?")
        if int(state["version"]) > STATE_VERSION:
            raise ValueError(
                f"sparse_update state version {state['version']} is newer than this code ({STATE_VERSION})"
            )
        if int(state["num_slots"]) != self._num_slots:
            raise ValueError(
                f"sparse_update checkpoint was made for N={state['num_slots']}, this model has N={self._num_slots}"
            )
        saved_args = state.get("args")
        if saved_args is not None:   # options added after the checkpoint was written count as unchanged
            saved_args = {**self.args.to_dict(), **saved_args}
        if saved_args is not None and saved_args != self.args.to_dict():
            changed = sorted(k for k in set(saved_args) | set(self.args.to_dict())
                             if saved_args.get(k) != self.args.to_dict().get(k))
            warnings.warn(f"sparse_update options differ from the checkpoint's ({changed}); using the current ones")
        device = self._device()
        tracker = self.background_tracker
        tracker.set_statistics(state["document_frequency"].to(device), int(state["num_batches"]),
                               state.get("access_counts"))
        if state.get("collecting", False):
            tracker.start_collection(reset=False)
        else:
            tracker.stop_collection()
        trainable = state["trainable_indices"].to(device=device, dtype=torch.long)
        self._trainable = trainable if state.get("has_trainable_indices", True) else None
        self._grad_synced = False
