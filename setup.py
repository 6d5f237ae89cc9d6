"""Builds dsv3._C with CMake + ninja in a persistent build/ folder, so reinstalls and editable installs rebuild only
what changed.

Environment:
  DSV3_CUDA=AUTO|ON|OFF    CUDA kernels (AUTO: when nvcc is found)
  DSV3_CUDA_ARCHS=90a      semicolon-separated CUDA architectures
  CUTLASS_DIR=...          CUTLASS tree; otherwise the headers of an installed nvidia-cutlass package are used
  MAX_JOBS=N               parallel compile jobs (default: cores, bounded by memory at ~4 GB a CUTLASS unit)
  DSV3_BUILD_TYPE=Release  CMake build type
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# the one place the version is written: python/dsv3/__init__.py (CMakeLists.txt reads it from there too)
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "python/dsv3/__init__.py").read_text(), re.M).group(1)
GIB_PER_COMPILE_JOB = 4


def default_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return cores
    return max(1, min(cores, int(mem_gib // GIB_PER_COMPILE_JOB)))


def find_cutlass_include() -> str | None:
    """CUTLASS_DIR, else the nvidia-cutlass package importable here or installed in the target environment.

    pip builds in an isolated environment that hides the target's site-packages from sys.path, but sysconfig still
    names them, so a `pip install --no-deps nvidia-cutlass` done beforehand is found either way.
    """
    if os.environ.get("CUTLASS_DIR"):
        return os.environ["CUTLASS_DIR"]
    candidates = []
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    paths = sysconfig.get_paths()
    candidates += [Path(paths[key]) / "cutlass_library" for key in ("purelib", "platlib")]
    for package_dir in candidates:
        include = package_dir / "source" / "include"
        if (include / "cutlass" / "version.h").is_file():
            return str(include)
    return None


def cmake_executable() -> str:
    try:
        import cmake  # the PyPI package, present in the isolated build environment

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        return "cmake"


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = os.environ.get("DSV3_BUILD_TYPE", "Release")
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{build_type.lower()}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = cmake_executable()
        args = [
            "-GNinja",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DDSV3_CUDA={os.environ.get('DSV3_CUDA', 'AUTO')}",
            f"-DDSV3_CUDA_ARCHS={os.environ.get('DSV3_CUDA_ARCHS', '90a')}",
        ]
        cutlass = find_cutlass_include()
        if cutlass:
            args.append(f"-DCUTLASS_DIR={cutlass}")
        try:
            import ninja  # the PyPI package; its path changes with every isolated build, so name it each time

            args.append(f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}")
        except ImportError:
            pass
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("MAX_JOBS") or str(default_jobs())
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    version=VERSION,
    ext_modules=[Extension("dsv3._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
