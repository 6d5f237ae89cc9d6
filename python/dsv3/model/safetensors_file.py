"""Read a .safetensors file as memory-mapped tensors, with errors that name the file and the tensor.

Format: an 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}
(plus an optional "__metadata__" entry), then the data; offsets count from the first byte after the header.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint whose files or tensors do not match what its config describes."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int


class SafetensorsFile:
    """One .safetensors file: its header is parsed on open, tensors are views of a private (copy-on-write) mapping."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{self.path}: truncated ({size} bytes), not a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if 8 + header_len > size:
                raise CheckpointError(f"{self.path}: truncated, its header needs {8 + header_len} bytes of {size}")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise CheckpointError(f"{self.path}: unreadable safetensors header ({error})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries = {name: self._entry(name, info) for name, info in header.items()}
        for name, entry in self.entries.items():
            if self.data_start + entry.end > size:
                raise CheckpointError(
                    f"{self.path}: truncated, tensor {name!r} ends at byte {self.data_start + entry.end} "
                    f"but the file has {size}"
                )
        self._map: mmap.mmap | None = None

    def _entry(self, name: str, info: dict) -> TensorEntry:
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        nbytes = dtype.itemsize
        for dim in shape:
            nbytes *= dim
        if end - begin != nbytes:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} {shape} needs {nbytes} bytes, header says {end - begin}"
            )
        return TensorEntry(dtype, shape, begin, end)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name`, backed by the file's pages (read lazily by the OS); writes never reach the file."""
        entry = self.entries[name]
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if entry.end == entry.begin:
            return torch.empty(entry.shape, dtype=entry.dtype)
        raw = torch.frombuffer(
            self._map, dtype=torch.uint8, count=entry.end - entry.begin, offset=self.data_start + entry.begin
        )
        if (self.data_start + entry.begin) % entry.dtype.itemsize:
            raw = raw.clone()  # a misaligned tensor cannot be viewed in place
        return raw.view(entry.dtype).view(entry.shape)
