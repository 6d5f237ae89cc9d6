from __future__ import annotations

import pytest
import torch

from dsv3.testing import skipped_kernels


def _gpu_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    from dsv3.ops.extension import cuda_compiled

    if not cuda_compiled():
        return False, "dsv3 was built without its CUDA kernels"
    return True, ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ready, why = _gpu_ready()
    if ready:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "tests/cuda/" in str(item.path).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda")


@pytest.fixture(params=["auto", "overlap", "overlap_cluster"])
def cuda_gemm_kernel(request, monkeypatch) -> str:
    """The FP8 GEMMs (dense and grouped) on the kernels the library picks, then on the hand-written kernel
    (DSV3_FP8_GEMM_KERNEL), alone and in 1x2 clusters."""
    if request.param != "auto":
        if request.param in skipped_kernels():
            pytest.skip(f"DSV3_SKIP_KERNELS names {request.param}: its smoke run failed")
        monkeypatch.setenv("DSV3_FP8_GEMM_KERNEL", request.param)
    return request.param
