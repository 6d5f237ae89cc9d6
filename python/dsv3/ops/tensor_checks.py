"""The one place where dsv3.ops checks tensors before they reach a kernel.

Every kernel receives raw addresses, so whatever it relies on (dtype, device, shape, contiguity, 16-byte alignment of
CUDA tensors) is checked here, with an exception naming the argument and what was expected. check_tensor looks at
metadata only, so the public wrappers can call it while torch.compile traces them; check_aligned needs real addresses
and is called by the custom ops' implementations, right before the kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ALIGNMENT_BYTES = 16


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    t: object,
    name: str,
    *,
    dtypes: Sequence[torch.dtype],
    ndim: int | None = None,
    min_ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Validate one kernel operand and return it (contiguous=False for ops that make their own contiguous copy).

    shape entries of None match any size. Raises TypeError for a non-tensor or a wrong dtype, ValueError otherwise.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {str(t.dtype).removeprefix('torch.')}")
    # Plain comparisons and loops: this runs several times per op call, on the decode path.
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and not _shape_matches(t.shape, shape):
        expected = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name}: expected shape [{expected}], got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if not (t.is_cpu or t.is_cuda):
        raise ValueError(f"{name}: expected a CPU or CUDA tensor, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (strides {t.stride()} for shape {tuple(t.shape)})")
    return t


def _shape_matches(actual: torch.Size, expected: Sequence[int | None]) -> bool:
    if len(actual) != len(expected):
        return False
    # A loop, not all() over a generator (twice the cost); lengths are compared above.
    for want, got in zip(expected, actual):  # noqa: B905, SIM110
        if want is not None and want != got:
            return False
    return True


def check_aligned(**tensors: torch.Tensor) -> None:
    """Every non-empty CUDA tensor starts on a 16-byte boundary (TMA and 16-byte vector loads need it).

    The CPU kernels use unaligned loads, so CPU tensors may start anywhere: memory-mapped checkpoint tensors, for
    example, are only 8-byte aligned within their safetensors file.
    """
    for name, t in tensors.items():
        if t.is_cuda and t.numel() and t.data_ptr() % ALIGNMENT_BYTES:
            raise ValueError(f"{name}: expected a {ALIGNMENT_BYTES}-byte aligned data pointer, got {t.data_ptr():#x}")


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value
