from __future__ import annotations

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    """The device the op tests run on; tests/cuda/conftest.py overrides it to run the same tests on the GPU."""
    return torch.device("cpu")


@pytest.fixture(params=["auto", "no_amx"])
def cpu_kernel(request, device, monkeypatch) -> str:
    """Runs a test with the kernels the CPU picks (AMX tiles where the CPU has them), then again with
    DSV3_CPU_NO_AMX=1 (AVX-512 only). Only the CPU kernels have the choice."""
    if request.param == "no_amx":
        if device.type != "cpu":
            pytest.skip("DSV3_CPU_NO_AMX only concerns the CPU kernels")
        monkeypatch.setenv("DSV3_CPU_NO_AMX", "1")
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
