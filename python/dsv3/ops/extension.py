"""Loading of the compiled extension and the conventions of its raw-pointer interface."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

try:
    from dsv3 import _C
except ImportError as error:  # pragma: no cover - only on a broken install
    raise ImportError(
        "dsv3's compiled extension dsv3._C is missing or failed to load; reinstall with `pip install .` "
        f"from the repository root ({error})"
    ) from error

# torch dtype -> the DType code of csrc/include/dsv3/dtype.h
DTYPE_CODES = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.float8_e4m3fn: 3,
}

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cuda_compiled() -> bool:
    return hasattr(_C, "cuda")


def cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def num_sms(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (what persistent kernels size their grids by)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def run_kernel(name: str, device: torch.device, *args: Any) -> Any:
    """Run kernel `name` of the backend for `device`; CUDA kernels go on the device's current torch stream."""
    if device.type == "cpu":
        return getattr(_C.cpu, name)(*args)
    if device.type == "cuda":
        if not cuda_compiled():
            raise RuntimeError(
                "dsv3 was built without its CUDA kernels (no nvcc at build time, or DSV3_CUDA=OFF); "
                "rebuild with nvcc on the PATH to run on CUDA tensors"
            )
        index = cuda_index(device)
        # The extension has its own (static) CUDA runtime, whose current device is independent of torch's.
        _C.cuda.set_device(index)
        return getattr(_C.cuda, name)(*args, torch.cuda.current_stream(index).cuda_stream)
    raise ValueError(f"no dsv3 kernels for device {device}")


def custom_op(
    name: str, fake: Callable[..., Any], mutates_args: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated implementation as torch.ops.dsv3.<name> (with `fake` for shape propagation; ops that
    write into an argument name it in `mutates_args`).

    The returned callable runs the implementation directly in eager mode, where the dispatcher would add ~20 us to a
    call, and goes through torch.ops.dsv3.<name> while torch.compile traces, so compiled graphs and CUDA graphs see
    one opaque op.
    """

    def register(implementation: Callable[..., Any]) -> Callable[..., Any]:
        op = torch.library.custom_op(f"dsv3::{name}", implementation, mutates_args=mutates_args)
        op.register_fake(fake)

        def call(*args: Any) -> Any:
            if torch.compiler.is_compiling():
                return getattr(torch.ops.dsv3, name)(*args)
            return implementation(*args)

        call.__name__ = call.__qualname__ = name
        return call

    return register
