from __future__ import annotations

import pytest

from dsv3.model.convert import convert_to_bf16
from dsv3.model.tiny import make_tiny_checkpoint
from dsv3.model.transformer import DeepseekV3


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory):
    """The tiny checkpoint as make-tiny writes it: FP8 weights with block scales, 3 shards, MTP layer, tokenizer."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-fp8"))


@pytest.fixture(scope="session")
def tiny_bf16(tiny_fp8, tmp_path_factory):
    return convert_to_bf16(tiny_fp8, tmp_path_factory.mktemp("tiny-bf16"))


@pytest.fixture(scope="session")
def model_fp32(tiny_fp8):
    return DeepseekV3.from_pretrained(tiny_fp8, dtype="float32")


@pytest.fixture(scope="session")
def hf_model(tiny_bf16):
    """transformers' DeepseekV3ForCausalLM on the BF16 conversion, in float32 (it cannot run FP8 weights on a CPU)."""
    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_bf16, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()
