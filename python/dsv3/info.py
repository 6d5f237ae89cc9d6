"""What the installed extension was built with and what this machine offers it."""

from __future__ import annotations

import platform

import torch


def build_info() -> dict:
    """Compiled backends, CUDA architectures, CUTLASS/CUDA versions, OpenMP, and whether a GPU is usable now."""
    from dsv3.ops.extension import _C, cuda_compiled

    info = dict(_C.build_info())
    gpu_count = _C.cuda.device_count() if cuda_compiled() else 0
    info.update(
        gpu_count=gpu_count,
        gpu_visible=gpu_count > 0,
        gpu_name=torch.cuda.get_device_name(0) if gpu_count and torch.cuda.is_available() else None,
        torch_version=torch.__version__,
        torch_cuda=torch.cuda.is_available(),
        extension=_C.__file__,
        machine=f"{platform.machine()} {platform.processor() or platform.system()}",
    )
    return info


def format_build_info(info: dict) -> str:
    width = max(len(key) for key in info)
    lines = []
    for key, value in info.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)
