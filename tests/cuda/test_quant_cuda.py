"""The quantization op tests of tests/test_quant.py, run on the GPU (tests/cuda/conftest.py sets `device`)."""

from __future__ import annotations

import torch

import dsv3
from dsv3.reference import quant as ref
from dsv3.testing import assert_bitwise_equal
from tests.test_quant import *  # noqa: F403  (the same tests, collected again with device=cuda)


def test_token_quant_real_shapes_bitwise():
    # DeepSeek-V3 hidden size 7168 and the MoE intermediate 2048, at prefill-sized M
    for m, k in ((4096, 7168), (16384, 2048), (1, 7168)):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda") * 3
        q, s = dsv3.per_token_group_quant_fp8(x)
        rq, rs = ref.per_token_group_quant_fp8(x.cpu())
        assert_bitwise_equal(s.cpu(), rs, f"scales {m}x{k}")
        assert_bitwise_equal(q.cpu(), rq, f"q {m}x{k}")


def test_reference_gives_the_same_bits_on_the_gpu():
    # tests run the reference on whichever device holds their tensors; a scale divided by a Python number on a GPU
    # (a multiply by its reciprocal there) once moved codes and failed a GEMM test by 3% of an output
    x = torch.randn(512, 1024, dtype=torch.bfloat16, device="cuda") * 3
    for name, gpu, cpu in [
        ("token", ref.per_token_group_quant_fp8(x), ref.per_token_group_quant_fp8(x.cpu())),
        ("block", ref.per_block_quant_fp8(x), ref.per_block_quant_fp8(x.cpu())),
    ]:
        assert_bitwise_equal(gpu[1].cpu(), cpu[1], f"{name} scales")
        assert_bitwise_equal(gpu[0].cpu(), cpu[0], f"{name} q")


def test_runs_on_current_stream_and_in_cuda_graphs():
    x = torch.randn(64, 7168, dtype=torch.bfloat16, device="cuda")
    expected = dsv3.per_token_group_quant_fp8(x)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        q, s = dsv3.per_token_group_quant_fp8(x)  # warm-up outside capture
        with torch.cuda.graph(graph, stream=stream):
            q, s = dsv3.per_token_group_quant_fp8(x)
    x.mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    doubled = dsv3.per_token_group_quant_fp8(x)
    assert torch.equal(q.view(torch.uint8), doubled[0].view(torch.uint8)) and torch.equal(s, doubled[1])
    assert torch.equal(s, expected[1] * 2)


def test_rejects_tensors_on_mixed_devices():
    q, s = dsv3.per_block_quant_fp8(torch.randn(128, 128, device="cuda"))
    try:
        dsv3.dequant_fp8_block(q, s.cpu())
    except ValueError as error:
        assert "scale_inv: expected a tensor on cuda" in str(error)
    else:
        raise AssertionError("a CPU scale_inv with a CUDA q was accepted")


def test_silu_and_mul_quant_real_shapes_bitwise():
    # the masked MoE layout's gate/up output (32 experts x 64 rows, 2I = 4096) and a prefill-sized one
    for shape in ((32, 64, 4096), (4096, 4096)):
        h = torch.randn(*shape, dtype=torch.bfloat16, device="cuda") * 4
        q, s = dsv3.silu_and_mul_quant_fp8(h)
        rq, rs = ref.silu_and_mul_quant_fp8(h)  # on the GPU: torch's own SiLU kernel
        assert_bitwise_equal(s, rs, f"scales {shape}")
        assert_bitwise_equal(q, rq, f"q {shape}")
