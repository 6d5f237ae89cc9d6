"""The kernels backend: which ops it takes from dsv3.ops, and one MLA decode schedule per forward step."""

from __future__ import annotations

import torch

import dsv3.ops
from dsv3.model.backend import Backend, kernel_available
from dsv3.model.batch import AttentionBatch
from dsv3.model.transformer import DeepseekV3
from tests.model.helpers import page_table


def test_capabilities_follow_device_and_dtype():
    cpu = torch.device("cpu")
    assert kernel_available("mla_decode_with_kvcache", cpu, torch.bfloat16)
    assert not kernel_available("mla_decode_with_kvcache", cpu, torch.float32)  # the kernel takes bf16/FP8 caches
    assert kernel_available("grouped_topk", cpu, torch.float32)  # the router runs in fp32 in either model
    assert not kernel_available("fused_experts", cpu, torch.float32)  # a float32 model dequantizes its experts
    layer_ops = {"rms_norm", "fused_add_rms_norm", "apply_rope"}  # the elementwise kernels take either dtype
    assert set(Backend("kernels", cpu, torch.float32).kernel_ops) == {"grouped_topk", *layer_ops}
    bf16_ops = Backend("kernels", cpu, torch.bfloat16).kernel_ops
    assert {"mla_decode_with_kvcache", "fp8_linear", "swiglu_fp8", "fused_experts", "grouped_topk", *layer_ops} <= set(
        bf16_ops
    )
    assert Backend("reference", cpu, torch.bfloat16).kernel_ops == []


def test_mla_schedule_is_computed_once_per_step(tiny_fp8, monkeypatch):
    model = DeepseekV3.from_pretrained(tiny_fp8, dtype="bfloat16", backend="kernels")
    calls = []
    real = dsv3.ops.get_mla_metadata
    monkeypatch.setattr(dsv3.ops, "get_mla_metadata", lambda *args: calls.append(args) or real(*args))
    caches = model.allocate_kv_cache(2)
    table = page_table([[0], [1]])
    model.forward(torch.arange(4, 10), AttentionBatch.build(table, [0, 0], [3, 3]), caches)
    assert calls == []  # prefill runs unabsorbed
    model.forward(torch.tensor([11, 12]), AttentionBatch.build(table, [3, 3], [1, 1]), caches)
    assert len(calls) == 1 and model.config.num_hidden_layers > 1
