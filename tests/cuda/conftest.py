from __future__ import annotations

import pytest
import torch


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
