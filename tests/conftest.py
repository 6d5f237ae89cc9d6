from __future__ import annotations

import pytest
import torch

from dsv3.testing import GEMM_KERNEL_VARIANTS, skipped_kernels


@pytest.fixture
def device() -> torch.device:
    """The device the op tests run on; tests/cuda/conftest.py overrides it to run the same tests on the GPU."""
    return torch.device("cpu")


def skip_if_smoke_failed(kernel: str) -> None:
    """Skips a test of a kernel that scripts/gpu_check.sh's smoke run found failing or hanging (DSV3_SKIP_KERNELS)."""
    if kernel in skipped_kernels():
        pytest.skip(f"DSV3_SKIP_KERNELS names {kernel}: its smoke run failed")


def _choose_kernel(choice: str, device: torch.device, monkeypatch: pytest.MonkeyPatch) -> str:
    if choice == "no_amx":
        if device.type != "cpu":
            pytest.skip("DSV3_CPU_NO_AMX only concerns the CPU kernels")
        monkeypatch.setenv("DSV3_CPU_NO_AMX", "1")
    elif choice in GEMM_KERNEL_VARIANTS:
        if device.type != "cuda":
            pytest.skip("DSV3_FP8_GEMM_KERNEL only concerns the CUDA kernels")
        skip_if_smoke_failed(choice)
        monkeypatch.setenv("DSV3_FP8_GEMM_KERNEL", choice)
    return choice


@pytest.fixture(params=["auto", "no_amx"])
def cpu_kernel(request, device, monkeypatch) -> str:
    """Runs a test with the kernels the CPU picks (AMX tiles where the CPU has them), then again with
    DSV3_CPU_NO_AMX=1 (AVX-512 only). Only the CPU kernels have the choice."""
    return _choose_kernel(request.param, device, monkeypatch)


@pytest.fixture(params=["auto", "no_amx", "overlap", "overlap_cluster", "decode"])
def gemm_kernel(request, device, monkeypatch) -> str:
    """The FP8 GEMM's kernel choices: what the device picks; on the CPU again with DSV3_CPU_NO_AMX=1, on a GPU again
    with DSV3_FP8_GEMM_KERNEL=overlap and =overlap_cluster (every shape on the hand-written sm_90a kernel, alone and
    in 1x2 clusters) and =decode (dense GEMMs of up to 64 rows and masked grouped ones expecting up to 64 rows a
    group on the hand-written decode kernel)."""
    return _choose_kernel(request.param, device, monkeypatch)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
