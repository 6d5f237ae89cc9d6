"""A quick end-to-end check of the installed kernels against dsv3.reference, for `dsv3 demo` and `dsv3 check`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import dsv3.ops as ops
from dsv3.reference import fused_experts as ref_fused_experts
from dsv3.reference import gemm as ref_gemm
from dsv3.reference import layers as ref_layers
from dsv3.reference import mla as ref_mla
from dsv3.reference import moe as ref_moe
from dsv3.reference import quant as ref
from dsv3.testing import assert_bitwise_equal, assert_close, assert_same_nonfinite, calc_diff


@dataclass
class CheckResult:
    name: str
    device: str
    passed: bool
    detail: str = ""


def _adversarial(rows: int, cols: int) -> torch.Tensor:
    x = torch.randn(rows, cols) * torch.logspace(-4, 4, cols)
    x[0, :] = 0.0
    x[-1, 1] = 1e6
    x[-1, 2] = 1e-40
    return x


def _checks() -> list[tuple[str, Callable[[torch.device], None]]]:
    def token_quant(device: torch.device) -> None:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for ue8m0 in (False, True):
                x = _adversarial(33, 1024).to(dtype)
                q, s = ops.per_token_group_quant_fp8(x.to(device), ue8m0=ue8m0)
                rq, rs = ref.per_token_group_quant_fp8(x, ue8m0=ue8m0)
                assert_bitwise_equal(s.cpu(), rs, f"scales ({dtype}, ue8m0={ue8m0})")
                assert_bitwise_equal(q.cpu(), rq, f"q ({dtype}, ue8m0={ue8m0})")

    def silu_quant(device: torch.device) -> None:
        h = _adversarial(33, 1024).to(torch.bfloat16).to(device)
        q, s = ops.silu_and_mul_quant_fp8(h)
        rq, rs = ref.silu_and_mul_quant_fp8(h)  # torch's SiLU on the same device
        if device.type == "cuda":  # the same formula and expf as torch's kernel
            assert_bitwise_equal(s.cpu(), rs.cpu(), "scales")
            assert_bitwise_equal(q.cpu(), rq.cpu(), "q")
        else:  # the CPU's vector exp may differ from torch's in the last bit
            diff = calc_diff(ref.dequant_per_token_group(q, s), ref.dequant_per_token_group(rq, rs))
            assert diff <= 1e-5, f"dequantized values: calc_diff {diff:.3e} > 1e-5"

    def block_quant(device: torch.device) -> None:
        w = _adversarial(576, 300).to(torch.bfloat16)
        q, s = ops.per_block_quant_fp8(w.to(device))
        rq, rs = ref.per_block_quant_fp8(w)
        assert_bitwise_equal(s.cpu(), rs, "scale_inv")
        assert_bitwise_equal(q.cpu(), rq, "q")

    def dequant(device: torch.device) -> None:
        rq, rs = ref.per_block_quant_fp8(_adversarial(300, 576))
        out = ops.dequant_fp8_block(rq.to(device), rs.to(device))
        assert_bitwise_equal(out.cpu(), ref.dequant_fp8_block(rq, rs), "out")

    def gemm(device: torch.device) -> None:
        # 576 rows: a partial weight tile; NaN codes in one row of a and one row of b spread over a row and a column.
        a = ref.per_token_group_quant_fp8(_adversarial(33, 640))
        b = ref.per_block_quant_fp8(_adversarial(576, 640))
        a[0].view(torch.uint8)[5, 17] = 0x7F
        b[0].view(torch.uint8)[300, 600] = 0xFF
        out = ops.fp8_gemm_nt((a[0].to(device), a[1].to(device)), (b[0].to(device), b[1].to(device))).cpu()
        expected = ref_gemm.fp8_gemm_nt(a, b)
        assert_same_nonfinite(out, expected, "out")
        diff = calc_diff(out, expected)
        assert diff <= 1e-5, f"out: calc_diff {diff:.3e} > 1e-5"

    def linear(device: torch.device) -> None:
        x = _adversarial(17, 512).to(torch.bfloat16)
        w = ref.per_block_quant_fp8(torch.randn(576, 512) * 0.05)
        out = ops.fp8_linear(x.to(device), tuple(t.to(device) for t in w)).cpu()
        expected = ref_gemm.fp8_gemm_nt(ref.per_token_group_quant_fp8(x), w)
        assert_same_nonfinite(out, expected, "out")
        diff = calc_diff(out, expected)
        assert diff <= 1e-5, f"out: calc_diff {diff:.3e} > 1e-5"

    def layers(device: torch.device) -> None:
        x = (torch.randn(9, 7168) * 3).to(torch.bfloat16)
        residual = torch.randn(9, 7168).to(torch.bfloat16)
        weight = torch.rand(7168).to(torch.bfloat16)
        out, new_residual = ops.fused_add_rms_norm(x.to(device), residual.to(device), weight.to(device))
        expected, expected_residual = ref_layers.fused_add_rms_norm(x, residual, weight)
        assert_bitwise_equal(new_residual.cpu(), expected_residual, "residual")
        assert_close(out.cpu().float(), expected.float(), atol=0, rtol=2**-7, name="rms_norm")  # one rounding
        cos_sin = ref_layers.yarn_cos_sin_cache(4096, 64, 10000.0, 40.0, 4096)
        q = torch.randn(9, 16, 192).to(torch.bfloat16)[..., 128:]
        positions = torch.randint(0, 4096, (9,))
        rotated = ops.apply_rope(q.to(device), positions.to(device), cos_sin.to(device))
        assert_bitwise_equal(rotated.cpu(), ref_layers.apply_rope(q, positions, cos_sin), "rope")

    def mla(device: torch.device) -> None:
        # 16 heads, one query token, sequences of 0 / 1 / 65 / 300 tokens over shuffled pages, NaN in unused pages and
        # in the unused tails of last pages
        seqlens = torch.tensor([0, 1, 65, 300], dtype=torch.int32)
        pages = torch.randperm(28)[:20].view(4, 5).int()
        cache = (torch.randn(28, 64, 1, 576) * 0.5).to(torch.bfloat16)
        used = {int(p) for i, n in enumerate(seqlens.tolist()) for p in pages[i, : -(-n // 64)].tolist()}
        cache[[p for p in range(28) if p not in used]] = float("nan")
        for i, n in enumerate(seqlens.tolist()):
            if n % 64:
                cache[pages[i, n // 64], n % 64 :] = float("nan")  # the unused tail of the last page
        q = torch.randn(4, 1, 16, 576).to(torch.bfloat16)
        metadata = ops.get_mla_metadata(seqlens.to(device), 16, 1)
        out, lse = ops.mla_decode_with_kvcache(
            q.to(device), cache.to(device), pages.to(device), seqlens.to(device), 512, *metadata, causal=True
        )
        expected, expected_lse = ref_mla.mla_decode_with_kvcache(q, cache, pages, seqlens, 512, causal=True)
        assert_close(out.cpu().float(), expected.float(), atol=8e-3, rtol=8e-3, name="out")
        assert_close(lse.cpu(), expected_lse, atol=1e-5, rtol=1e-5, name="lse")

    def moe_routing(device: torch.device) -> None:
        logits = (torch.randn(300, 256) * 2).to(torch.bfloat16)
        logits[:3] = 0.0  # ties everywhere
        bias = torch.randn(256) * 0.1
        weights, idx = ops.grouped_topk(logits.to(device), bias.to(device), 8, 8, 4, 2.5)
        expected_weights, expected_idx = ref_moe.grouped_topk(logits, bias, 8, 8, 4, 2.5)
        assert torch.equal(idx.cpu(), expected_idx), "topk_idx: experts differ"
        assert_close(weights.cpu(), expected_weights, atol=1e-6, name="topk_weights")

    def moe_layouts(device: torch.device) -> None:
        topk_idx = torch.randint(-1, 256, (300, 8), dtype=torch.int32)
        topk_idx[:, 0] = 7  # one busy expert
        x = torch.randn(300, 512).to(torch.bfloat16)
        weights = torch.rand(300, 8)
        layout = ops.moe_contiguous_layout(topk_idx.to(device), 256)
        layout.check()
        expected = ref_moe.moe_contiguous_layout(topk_idx, 256)
        rows = expected.num_rows
        assert_bitwise_equal(layout.m_indices.cpu()[:rows], expected.m_indices, "m_indices")
        assert_bitwise_equal(layout.row_of.cpu(), expected.row_of, "row_of")
        permuted = ops.permute_tokens(x.to(device), layout).cpu()[:rows]
        assert_bitwise_equal(permuted, ref_moe.permute_tokens(x, expected), "permuted")
        q, scales = ops.permute_tokens(x.to(device), layout, quantize=True)
        rq, rs = ref.per_token_group_quant_fp8(permuted)
        assert_bitwise_equal(q.cpu()[:rows], rq, "permuted q")
        assert_bitwise_equal(scales.cpu()[:rows], rs, "permuted scales")
        y = torch.randn(layout.m_indices.shape[0], 512).to(torch.bfloat16)
        out = ops.unpermute_tokens(y.to(device), layout, weights.to(device))
        assert_bitwise_equal(out.cpu(), ref_moe.unpermute_tokens(y[:rows], expected, weights), "unpermuted")
        masked = ops.moe_masked_layout(topk_idx.to(device), 256, 320)
        masked.check()
        expected_masked = ref_moe.moe_masked_layout(topk_idx, 256, 320)
        assert_bitwise_equal(masked.src_token.cpu(), expected_masked.src_token, "masked src_token")
        assert_bitwise_equal(masked.row_of.cpu(), expected_masked.row_of, "masked row_of")

    def experts(device: torch.device) -> None:
        # 8 experts, H=256, I=128: both grouped GEMMs, the fused permute+quant and the weighted combine
        quantized = [ref.per_block_quant_fp8(torch.randn(n, k) * 0.05) for n, k in [(256, 256), (256, 128)] * 8]
        w13 = tuple(torch.stack([pair[i] for pair in quantized[0::2]]) for i in (0, 1))
        w2 = tuple(torch.stack([pair[i] for pair in quantized[1::2]]) for i in (0, 1))
        weights, idx = ref_moe.grouped_topk(torch.randn(40, 8), torch.zeros(8), 2, 4, 2, 2.5)
        x = torch.randn(40, 256).to(torch.bfloat16)
        on_device = [tuple(t.to(device) for t in w) for w in (w13, w2)]
        shared = [tuple(t[0] for t in w) for w in (w13, w2)]  # expert 0's weights as the shared expert
        expected = ref_fused_experts(x, weights, idx, w13, w2, *shared)
        for layout in ("contiguous", "masked", "auto"):
            out = ops.fused_experts(
                x.to(device), weights.to(device), idx.to(device), *on_device,
                *[tuple(t.to(device) for t in w) for w in shared], layout=layout,
            ).cpu()  # fmt: skip
            diff = calc_diff(out, expected)
            assert diff <= 1e-5, f"out ({layout} layout): calc_diff {diff:.3e} > 1e-5"

    return [
        ("per_token_group_quant_fp8", token_quant),
        ("silu_and_mul_quant_fp8", silu_quant),
        ("per_block_quant_fp8", block_quant),
        ("dequant_fp8_block", dequant),
        ("fp8_gemm_nt", gemm),
        ("fp8_linear", linear),
        ("rms_norm + rope", layers),
        ("mla decode", mla),
        ("grouped_topk", moe_routing),
        ("moe layouts + (un)permute", moe_layouts),
        ("fused_experts", experts),
    ]


def run_self_check(device: torch.device) -> list[CheckResult]:
    """Run every op on `device` and compare with the reference (bit for bit, or within calc_diff 1e-5 for the GEMM);
    failures are reported, not raised."""
    torch.manual_seed(0)
    results = []
    for name, check in _checks():
        try:
            check(device)
            results.append(CheckResult(name, device.type, True))
        except AssertionError as error:
            results.append(CheckResult(name, device.type, False, str(error)))
    return results
