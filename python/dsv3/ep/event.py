"""Completion of an asynchronous Buffer call: DeepEP's EventOverlap, over a torch.distributed Work.

An asynchronous call starts its collective and returns at once with its output tensors allocated but not yet
filled; the event's wait() (or current_stream_wait(), DeepEP's name) waits for the collective and then runs the
call's unpacking into those tensors. Until then the outputs must not be read, and the inputs must not be written.
On NCCL, wait() orders the current CUDA stream after the collective and the unpacking kernels follow it there.
"""

from __future__ import annotations

from collections.abc import Callable


class EventOverlap:
    def __init__(self, work=None, finish: Callable[[], None] | None = None):
        self._work, self._finish, self._done = work, finish, False

    def wait(self) -> None:
        """Wait for the communication and fill the outputs (once; later calls return at once). Errors that the
        exchange revealed (bad input on some rank) are raised here, on every rank."""
        if self._done:
            return
        self._done = True
        if self._work is not None:
            self._work.wait()
        if self._finish is not None:
            self._finish()

    current_stream_wait = wait

    def is_done(self) -> bool:
        """Whether wait() has run (the outputs are filled)."""
        return self._done

    def __call__(self) -> None:  # the receive hook of the low-latency calls
        self.wait()


def wait_previous(previous_event: object) -> None:
    """Calls take DeepEP's previous_event: the outputs of that earlier call must be complete before this one reads."""
    if previous_event is None:
        return
    if not isinstance(previous_event, EventOverlap):
        raise TypeError(f"previous_event: expected an EventOverlap from an earlier call, got {type(previous_event)}")
    previous_event.wait()
