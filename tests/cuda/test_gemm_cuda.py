"""The FP8 GEMM tests of tests/test_gemm.py, run on the GPU (tests/cuda/conftest.py sets `device`), plus every
DeepSeek-V3 shape at its real size and CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.reference import gemm as ref
from dsv3.testing import GEMM_KERNEL_VARIANTS, assert_bitwise_equal, assert_same_nonfinite, calc_diff, skipped_kernels
from tests.conftest import skip_if_smoke_failed
from tests.test_gemm import *  # noqa: F403  (the same tests, collected again with device=cuda)
from tests.test_gemm import DSV3_SHAPES


@pytest.fixture
def exact_fp32_matmul():
    """The reference's fp32 matmul in full fp32 (no TF32) while these tests run."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.usefixtures("exact_fp32_matmul", "gemm_kernel")
@pytest.mark.parametrize("n,k", DSV3_SHAPES, ids=lambda v: str(v))
def test_real_shapes_match_reference(n, k):
    w = torch.randn(n, k, device="cuda") * 0.02
    b = dsv3.per_block_quant_fp8(w)  # bit-exact with dsv3.reference.quant (tests/test_quant.py)
    for m in (1, 16, 64, 128, 512, 4096):
        a = dsv3.per_token_group_quant_fp8(torch.randn(m, k, device="cuda"))
        out = dsv3.fp8_gemm_nt(a, b)
        expected = ref.fp8_gemm_nt(a, b)
        assert out.shape == (m, n) and out.dtype == torch.bfloat16
        assert_same_nonfinite(out, expected, f"M={m} N={n} K={k}")
        diff = calc_diff(out, expected)
        assert diff <= 1e-5, f"M={m} N={n} K={k}: calc_diff {diff:.3e}"


@pytest.mark.usefixtures("exact_fp32_matmul", "gemm_kernel")
def test_captured_in_cuda_graph():
    m, n, k = 64, 576, 7168
    a_q, a_s = dsv3.per_token_group_quant_fp8(torch.randn(m, k, device="cuda"))
    b = dsv3.per_block_quant_fp8(torch.randn(n, k, device="cuda"))
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dsv3.fp8_gemm_nt((a_q, a_s), b, out=out)  # warm-up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            dsv3.fp8_gemm_nt((a_q, a_s), b, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    a_s.mul_(2)  # the graph reads the scales in place: replay must see the new values
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert calc_diff(out, ref.fp8_gemm_nt((a_q, a_s), b)) <= 1e-5  # with the old scales: calc_diff ~0.1


@pytest.mark.usefixtures("gemm_kernel")
def test_fp8_linear_replays_in_a_cuda_graph_with_new_activations():
    """Quantization and GEMM captured together (on the decode kernel the GEMM's launch overlaps the quantization's, a
    programmatic edge in the graph): a replay on new activations equals the two ops run one after the other."""
    m, n, k = 16, 576, 7168
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    w = dsv3.per_block_quant_fp8(torch.randn(n, k, device="cuda") * 0.05)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dsv3.fp8_linear(x, w)  # warm-up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = dsv3.fp8_linear(x, w)  # the graph's output buffer, rewritten by each replay
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(torch.randn(m, k, dtype=torch.bfloat16, device="cuda") * 4)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert_bitwise_equal(out, dsv3.fp8_gemm_nt(dsv3.per_token_group_quant_fp8(x, 128), w), name="out")


def test_rejects_operands_on_mixed_devices():
    a = dsv3.per_token_group_quant_fp8(torch.randn(4, 256, device="cuda"))
    qb, sb = dsv3.per_block_quant_fp8(torch.randn(256, 256, device="cuda"))
    with pytest.raises(ValueError, match="b scales: expected a tensor on cuda"):
        dsv3.fp8_gemm_nt(a, (qb, sb.cpu()))
    with pytest.raises(ValueError, match="out: expected a tensor on cuda"):
        dsv3.fp8_gemm_nt(a, (qb, sb), out=torch.empty(4, 256, dtype=torch.bfloat16))


@pytest.mark.usefixtures("exact_fp32_matmul")
@pytest.mark.parametrize("m,n,k", [(1, 576, 7168), (64, 7168, 2048), (300, 1536, 7168)], ids=str)
def test_every_forced_schedule_computes_the_same_product(m, n, k):
    """benchmarks/sweep_gemm_schedule.py times the schedules the heuristic did not pick: each must be correct."""
    from dsv3.ops.extension import _C, num_sms

    sms = num_sms(torch.cuda.current_device())
    a = dsv3.per_token_group_quant_fp8(torch.randn(m, k, device="cuda"))
    b = dsv3.per_block_quant_fp8(torch.randn(n, k, device="cuda") * 0.02)
    expected = ref.fp8_gemm_nt(a, b)
    stream = torch.cuda.current_stream().cuda_stream
    variants = (0, 1, 3) if m <= 64 else (0, 3)
    schedules = [(v, d, 1) for v in variants for d in (0, 2)] + [(v, 1, s) for v in variants for s in (2, 5, 16)]
    skipped = {GEMM_KERNEL_VARIANTS[name] for name in skipped_kernels() & GEMM_KERNEL_VARIANTS.keys()}
    hand_written = [(v, 0, 1) for v in GEMM_KERNEL_VARIANTS.values() if v not in skipped]
    if GEMM_KERNEL_VARIANTS["decode"] not in skipped:  # K split over clusters of 2, 5 and 8 CTAs
        hand_written += [(GEMM_KERNEL_VARIANTS["decode"], 1, s) for s in (2, 5, 8)]
    for forced in [*schedules, (2, 0, 1), *hand_written]:  # and ping-pong, data-parallel
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        workspace = torch.empty(max(_C.cuda.fp8_gemm_workspace_bytes(m, n, k, sms, forced), 1), dtype=torch.uint8,
                                device="cuda")  # fmt: skip
        _C.cuda.fp8_gemm_nt(a[0].data_ptr(), a[1].data_ptr(), b[0].data_ptr(), b[1].data_ptr(), out.data_ptr(), m, n,
                            k, workspace.data_ptr(), sms, stream, forced)  # fmt: skip
        assert calc_diff(out, expected) <= 1e-5, f"schedule {forced}"
    for bad, message in [
        ((7, 0, 1), "variant"),
        ((0, 3, 1), "decomposition"),
        ((0, 0, 2), "splits"),
        ((2, 1, 2), "data-parallel only"),
        ((4, 2, 1), "data-parallel only"),
        ((5, 1, 2), "data-parallel only"),
        ((6, 2, 1), "decode variant data-parallel or split-K"),
        ((6, 1, 9), "at most 8 CTAs"),
    ]:
        with pytest.raises(ValueError, match=message):
            _C.cuda.fp8_gemm_workspace_bytes(m, n, k, sms, bad)


@pytest.mark.usefixtures("exact_fp32_matmul")
@pytest.mark.parametrize("name", ["overlap", "overlap_cluster"])
@pytest.mark.parametrize("sms", [1, 2, 5])
def test_overlap_kernel_on_few_sms_walks_many_tiles_per_cta(name, sms):
    """A grid of 1-5 SMs: each CTA (or cluster) takes many tiles in turn, so the ring's phases wrap many times and
    the producer runs tiles ahead of the consumers."""
    from dsv3.ops.extension import _C

    skip_if_smoke_failed(name)
    m, n, k = 300, 1408, 640  # 3 x 11 tiles (odd: a phantom tile in clusters), 5 K blocks
    a = dsv3.per_token_group_quant_fp8(torch.randn(m, k, device="cuda"))
    b = dsv3.per_block_quant_fp8(torch.randn(n, k, device="cuda") * 0.02)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    forced = (GEMM_KERNEL_VARIANTS[name], 0, 1)
    stream = torch.cuda.current_stream().cuda_stream
    _C.cuda.fp8_gemm_nt(a[0].data_ptr(), a[1].data_ptr(), b[0].data_ptr(), b[1].data_ptr(), out.data_ptr(), m, n, k,
                        0, sms, stream, forced)  # fmt: skip
    assert calc_diff(out, ref.fp8_gemm_nt(a, b)) <= 1e-5


@pytest.mark.usefixtures("exact_fp32_matmul")
@pytest.mark.parametrize("m", [1, 63, 65, 130])
def test_decode_kernel_splits_k_over_clusters_of_one_to_eight(m):
    """The decode kernel (variant 6) with K split over clusters of 1-8 CTAs, uneven splits of 9 K blocks (the last
    one partial), a partial last tile of weight rows (N = 584) and 1-3 tiles of tokens (the last partial): equal to
    the reference, every output written, and the same bits on a second run (the splits are summed in rank order)."""
    from dsv3.ops.extension import _C

    skip_if_smoke_failed("decode")
    n, k = 584, 1040
    a = dsv3.per_token_group_quant_fp8(torch.randn(m, k, device="cuda"))
    b = dsv3.per_block_quant_fp8(torch.randn(n, k, device="cuda") * 0.02)
    expected = ref.fp8_gemm_nt(a, b)
    stream = torch.cuda.current_stream().cuda_stream
    for splits in range(1, 9):
        forced = (GEMM_KERNEL_VARIANTS["decode"], 0 if splits == 1 else 1, splits)
        runs = []
        for _ in range(2):
            out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
            _C.cuda.fp8_gemm_nt(a[0].data_ptr(), a[1].data_ptr(), b[0].data_ptr(), b[1].data_ptr(), out.data_ptr(),
                                m, n, k, 0, 132, stream, forced)  # fmt: skip
            runs.append(out)
        assert not runs[0].isnan().any(), f"{splits} splits: outputs left unwritten"
        assert calc_diff(runs[0], expected) <= 1e-5, f"{splits} splits"
        assert torch.equal(runs[0], runs[1]), f"{splits} splits: two runs differ"


@pytest.mark.usefixtures("exact_fp32_matmul")
@pytest.mark.parametrize("m,n,k", [(64, 7168, 16384), (1, 576, 7168)], ids=str)
def test_decode_kernel_in_fp8_linear_reads_the_quantization_it_overlaps(monkeypatch, m, n, k):
    """fp8_linear on the decode kernel starts the GEMM while the quantization runs (programmatic dependent launch):
    its CTAs ask for weights before the codes exist, and must read the codes only once they are written. Each of
    many calls on new activations equals the two ops run one after the other, bit for bit."""
    skip_if_smoke_failed("decode")
    monkeypatch.setenv("DSV3_FP8_GEMM_KERNEL", "decode")
    w = dsv3.per_block_quant_fp8(torch.randn(n, k, device="cuda") * 0.05)
    xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") * (i + 1) for i in range(20)]
    ys = [dsv3.fp8_linear(x, w) for x in xs]  # back to back on the stream
    for x, y in zip(xs, ys, strict=True):
        assert_bitwise_equal(y, dsv3.fp8_gemm_nt(dsv3.per_token_group_quant_fp8(x, 128), w), name="y")
