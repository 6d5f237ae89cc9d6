"""Inspecting the GPU code compiled into dsv3._C with cuobjdump (PyPI: nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from dsv3.ops.extension import _C


def _nvidia_bin_dirs() -> list[str]:
    try:
        import nvidia
    except ImportError:
        return []
    return [str(path) for root in nvidia.__path__ for path in Path(root).glob("cu*/bin")]


def cuobjdump() -> str | None:
    """cuobjdump from the PATH or the nvidia-cuda-cuobjdump package; None if neither exists."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_nvidia_bin_dirs()])
    return shutil.which("cuobjdump", path=search)


def run(*args: str) -> str:
    """cuobjdump's output for the extension (nvdisasm, which -sass needs, is looked up next to cuobjdump)."""
    tool = cuobjdump()
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(tool).parent), os.environ.get("PATH", "")]))
    return subprocess.run([tool, *args, _C.__file__], capture_output=True, text=True, check=True, env=env).stdout


def sass_by_function() -> dict[str, str]:
    """Mangled kernel name -> its SASS listing."""
    listing = run("-sass")
    parts = re.split(r"^\s*Function : (\S+)\s*$", listing, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def resource_usage() -> dict[str, dict[str, int]]:
    """Mangled kernel name -> {'REG': .., 'STACK': .., 'LOCAL': .., 'SHARED': ..}."""
    usage = {}
    name = None
    for line in run("-res-usage").splitlines():
        header = re.match(r"\s*Function (\S+):?\s*$", line)
        if header:
            name = header.group(1).rstrip(":")
        elif name and "REG:" in line:
            usage[name] = {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", line)}
            name = None
    return usage
