"""The built extension: what it reports, what it contains, and that it loads without a GPU driver."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

import dsv3
from dsv3.ops.extension import cuda_compiled
from tests import cuda_binary


def test_build_info_reports_what_was_compiled():
    info = dsv3.build_info()
    assert info["backends"][0] == "cpu"
    assert info["version"] == dsv3.__version__
    assert isinstance(info["openmp"], bool) and isinstance(info["gpu_visible"], bool)
    if cuda_compiled():
        assert info["backends"] == ["cpu", "cuda"]
        assert "sm_90a" in info["cuda_archs"]
        assert re.fullmatch(r"\d+\.\d+\.\d+", info["cutlass_version"])
        assert info["cuda_runtime_version"] >= 12000
    else:
        assert info["cuda_archs"] == [] and info["cutlass_version"] is None


@pytest.mark.skipif(
    shutil.which("nvcc") is None or os.environ.get("DSV3_CUDA") == "OFF", reason="no nvcc: CPU-only build expected"
)
def test_cuda_kernels_are_built_where_nvcc_exists():
    assert cuda_compiled(), "nvcc is on the PATH but dsv3._C has no CUDA kernels"


@pytest.mark.skipif(not cuda_compiled(), reason="built without CUDA kernels")
def test_extension_embeds_sm90a_cubins():
    if cuda_binary.cuobjdump() is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    listing = cuda_binary.run("--list-elf")
    cubins = re.findall(r"\.(sm_\w+)\.cubin", listing)
    assert cubins and set(cubins) == {"sm_90a"}, listing


def test_imports_and_reports_without_a_gpu_driver():
    """A fresh interpreter imports dsv3 and queries the GPU count; on machines without a driver that must be 0."""
    code = "import dsv3; info = dsv3.build_info(); print(info['gpu_count'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 0


def _dsv3(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsv3", *args], capture_output=True, text=True, timeout=300, env=os.environ
    )


def test_cli_info():
    result = _dsv3("info")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^backends\s+cpu", result.stdout, re.M)


def test_cli_check_and_demo_pass_on_cpu():
    check = _dsv3("check", "--device", "cpu")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "all kernels match the reference" in check.stdout
    demo = _dsv3("demo", "--device", "cpu")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "per_token_group_quant_fp8" in demo.stdout and "demo finished" in demo.stdout


def test_cli_bench_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    result = _dsv3("bench", "quant", "--device", "cpu", "--quick", "--reps", "2", "--json", str(path))
    assert result.returncode == 0, result.stderr
    import json

    document = json.loads(path.read_text())
    rows = document["reports"][0]["rows"]
    assert {row["op"] for row in rows} == {
        "per_token_group_quant_fp8",
        "silu_and_mul_quant_fp8",
        "per_block_quant_fp8",
        "dequant_fp8_block",
    }
    assert all(row["us"] > 0 and row["baseline_us"] > 0 and row["gb_per_s"] > 0 for row in rows)
    assert document["build"]["backends"][0] == "cpu"
