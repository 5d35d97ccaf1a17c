"""What a proposer costs a GPU, measured on any machine: kernels, host syncs, FLOPs, host CPU time.

A GPU's throughput on this workload is capped three ways: by the device's arithmetic (FLOPs), by
the host's time to launch kernels (each non-view aten op is at least one launch, ~5-10 us of host
time each), and by the points where the host waits for the device (a sync drains the launch queue).
None of these needs a GPU to be counted: :class:`OpCounter` counts, per region, the aten ops a
computation dispatches, the sync-type ones among them, and (with ``torch.utils.flop_counter``) its
FLOPs. Device-to-host copies do not dispatch an op when the tensor is already on the CPU, so the
counter also counts calls of ``Tensor.cpu`` / ``Tensor.tolist`` / ``Tensor.numpy`` that a GPU run
would make (each one copy, and a sync, on a GPU). :func:`host_stage` accumulates the thread CPU time
of the host-only stages (RLE characters, encoders) while a profile is active.

Code that branches on the device asks :func:`segdist.device.gpu_path`; the profile forces it, so
the counts describe the GPU path even on the CPU.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose result the host must wait for (the output size or value is data-dependent);
# torchvision's ``nms`` is one: its CUDA kernel copies the suppression mask to the host
SYNC_OPS = frozenset({"_local_scalar_dense", "item", "nonzero", "nonzero_numpy", "unique",
                      "_unique", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
                      "nonzero_static", "nms"})

_STAGES: list[Counter | None] = [None]  # the active profile's host-stage CPU seconds


@contextlib.contextmanager
def host_stage(name: str) -> Iterator[None]:
    """Add this block's thread CPU time to stage ``name`` of the active profile (free otherwise)."""
    stages = _STAGES[0]
    if stages is None:
        yield
        return
    t0 = time.thread_time()
    try:
        yield
    finally:
        stages[name] += time.thread_time() - t0


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active.

    ``ops``: non-view ops (each at least one kernel launch on a GPU). ``syncs``: sync-type ops
    (:data:`SYNC_OPS`, ``repeat_interleave`` without ``output_size``, a copy from a non-CPU device
    to the CPU, and the host reads counted by :func:`counting_host_reads`). ``by_region``: ops per
    region name (:meth:`region`), for splitting a total by who dispatched it.
    """

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.by_op: Counter = Counter()
        self.by_region: Counter = Counter()
        self.syncs_by_region: Counter = Counter()
        self._region = ["ours"]

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        """Attribute the ops dispatched inside this block to ``name``."""
        self._region.append(name)
        try:
            yield
        finally:
            self._region.pop()

    def add_sync(self, n: int = 1) -> None:
        self.syncs += n
        self.syncs_by_region[self._region[-1]] += n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Ops are counted as they enter the dispatcher (a composite such as conv2d or batch_norm
        # once: one kernel on a GPU), so this mode must be the innermost one: a mode pushed after
        # it that decomposes ops (flop_counter does) would feed it the Python decompositions.
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        # an op that returned its input unchanged (dropout in eval) launched nothing; an aliasing
        # op (reshape, contiguous) that had to copy did
        identity = out is (args[0] if args else None) and not func._schema.is_mutable
        if identity and name == "to" and _names_device(args, kwargs):
            identity = False  # .to(device) of a host tensor: a host-to-device copy on a GPU
        if (not func.is_view and not identity) or (func.is_view and _copied(out, args)):
            self.ops += 1
            self.by_op[name] += 1
            self.by_region[self._region[-1]] += 1
        if name in SYNC_OPS or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                and not (args and isinstance(args[0], int))) \
                or (name == "where" and len(args) == 1 and not kwargs):  # where(cond) = nonzero
            self.add_sync()
        elif name in ("_to_copy", "to", "copy_") and args and isinstance(args[0], torch.Tensor):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else getattr(out, "device", None)
            if src.device.type != "cpu" and dst is not None and dst.type == "cpu":
                self.add_sync()
        return out


def _names_device(args, kwargs) -> bool:
    return any(isinstance(a, (torch.device, str)) for a in (*args[1:], *kwargs.values()))


def _copied(out, args) -> bool:
    """Whether an aliasing op (reshape, contiguous, ...) returned new storage (it copied)."""
    if not (isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor)):
        return False
    return out.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr()


_FETCHED = "_segdist_host_copy"


@contextlib.contextmanager
def counting_host_reads(counter: OpCounter) -> Iterator[None]:
    """Count ``Tensor.cpu()``, ``Tensor.tolist()`` and ``Tensor.numpy()`` calls as syncs (each a
    device-to-host copy on a GPU; on the CPU they dispatch nothing). ``.numpy()`` right after
    ``.cpu()`` is one read: a tensor that ``.cpu()`` returned carries a mark and is not counted
    again (a mark on the tensor itself, not its ``id``: ids are reused once a tensor is freed)."""
    orig = {name: getattr(torch.Tensor, name) for name in ("cpu", "tolist", "numpy")}

    # A tensor on a GPU is counted by the dispatcher (its copy to the host); these hooks stand in
    # for the copies a GPU run would make of tensors that are on the CPU here.
    def cpu(self, *a, **k):
        out = orig["cpu"](self, *a, **k)
        if self.device.type == "cpu" and not getattr(self, _FETCHED, False):
            counter.add_sync()
        if out is self:  # a CPU tensor's .cpu() is itself: mark an alias, not the tensor in use
            out = out.view_as(out)
        setattr(out, _FETCHED, True)
        return out

    def read(name):
        def f(self, *a, **k):
            if self.device.type == "cpu" and not getattr(self, _FETCHED, False):
                counter.add_sync()
            return orig[name](self, *a, **k)
        return f

    torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy = cpu, read("tolist"), read("numpy")
    try:
        yield
    finally:
        for name, fn in orig.items():
            setattr(torch.Tensor, name, fn)


@contextlib.contextmanager
def profiling(counter: OpCounter, stages: Counter) -> Iterator[None]:
    """Count ops and syncs in ``counter`` and host-stage CPU seconds in ``stages`` while active."""
    before = _STAGES[0]
    _STAGES[0] = stages
    try:
        with counter, counting_host_reads(counter):
            yield
    finally:
        _STAGES[0] = before
