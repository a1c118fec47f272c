"""Counting host-device synchronisations of a stretch of code.

On CUDA, `torch.cuda.set_sync_debug_mode("warn")` reports every implicit
synchronisation (`.item()`, `float(t)`, `.cpu()`, blocking host-to-device
copies); `count_host_syncs` counts those warnings. On any other device
(the CPU, or the `meta` device that tests use to stand in for a GPU) it
counts the operations that WOULD synchronise on a GPU: reading a device
tensor's value on the host (`_local_scalar_dense`, behind `.item()`,
`float()`, `int()`, `bool()`), copies between the host and a non-CPU
device, and `torch.tensor`/`torch.as_tensor` of host data onto a non-CPU
device.

`HostSyncCounter.start()` begins the count, so a caller can leave set-up
work (moving inputs to the device once) out of it: `gate_net` wraps a
denoiser so the count starts at its first call, i.e. it covers the step
loop of an inversion or edit.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten


def _non_cpu(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counter: "HostSyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        if c.active:
            if func is _aten._local_scalar_dense.default and _non_cpu(args[0]):
                c.record(f"host read of a {args[0].device.type} tensor")
                if args[0].device.type == "meta":  # no value to read: stand in a zero and go on counting
                    return 0
            elif func is _aten._to_copy.default and isinstance(args[0], torch.Tensor):
                dst = kwargs.get("device")
                if dst is not None and (args[0].device.type == "cpu") != (torch.device(dst).type == "cpu"):
                    c.record(f"copy {args[0].device.type} -> {torch.device(dst).type}")
            elif func is _aten.copy_.default and (args[0].device.type == "cpu") != (args[1].device.type == "cpu"):
                c.record(f"copy {args[1].device.type} -> {args[0].device.type}")
        return func(*args, **kwargs)


class HostSyncCounter:
    def __init__(self):
        self.active = False
        self.events: list[str] = []
        self._caught: list | None = None  # CUDA: the warnings caught so far
        self._first_warning = 0

    @property
    def count(self) -> int:
        return len(self.events)

    def start(self) -> None:
        if not self.active and self._caught is not None:
            self._first_warning = len(self._caught)
        self.active = True

    def record(self, what: str) -> None:
        self.events.append(what)


@contextmanager
def count_host_syncs(device: torch.device | str, *, started: bool = True):
    """Context manager yielding a `HostSyncCounter` (see the module doc)."""
    device = torch.device(device)
    counter = HostSyncCounter()
    counter.active = started
    if device.type == "cuda":
        before = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            counter._caught = caught
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counter
            finally:
                torch.cuda.set_sync_debug_mode(before)
        # warnings raised before start() are not the loop's: the count keeps
        # only those after the counter became active (recorded in order)
        if counter.active:
            counter.events.extend(str(w.message) for w in caught[counter._first_warning:] if "synchroniz" in str(w.message))
        return
    real_tensor, real_as_tensor = torch.tensor, torch.as_tensor

    def tensor(data, *args, device=None, **kwargs):
        if counter.active and device is not None and torch.device(device).type != "cpu" and not isinstance(data, torch.Tensor):
            counter.record(f"torch.tensor(host data, device={device})")
        return real_tensor(data, *args, device=device, **kwargs)

    def as_tensor(data, *args, device=None, **kwargs):
        if counter.active and device is not None and torch.device(device).type != "cpu" and not isinstance(data, torch.Tensor):
            counter.record(f"torch.as_tensor(host data, device={device})")
        return real_as_tensor(data, *args, device=device, **kwargs)

    torch.tensor, torch.as_tensor = tensor, as_tensor
    try:
        with _DispatchCounter(counter):
            yield counter
    finally:
        torch.tensor, torch.as_tensor = real_tensor, real_as_tensor


class gate_net:
    """Wraps a denoiser so `counter.start()` runs at its first call."""

    def __init__(self, net, counter: HostSyncCounter):
        self.net, self.counter = net, counter
        self.dtype = getattr(net, "dtype", None)

    def __call__(self, x, t, emb, **kwargs):
        self.counter.start()
        return self.net(x, t, emb, **kwargs)
