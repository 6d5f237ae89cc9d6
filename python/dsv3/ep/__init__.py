"""Expert parallelism: a DeepEP-style ``Buffer`` over torch.distributed (gloo on CPU, NCCL on GPU).

See ``dsv3.ep.buffer`` for the call shapes and what differs from DeepEP.
"""

from dsv3.ep.buffer import Buffer, DispatchHandle, EPInputError
from dsv3.ep.event import EventOverlap
from dsv3.ep.layout import dispatch_layout
from dsv3.ep.low_latency import LowLatencyHandle

__all__ = ["Buffer", "DispatchHandle", "EPInputError", "EventOverlap", "LowLatencyHandle", "dispatch_layout"]
