"""Bad arguments give errors that name the argument and what was expected."""

from __future__ import annotations

import pytest

from dsv3.runtime import LLM, SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens": -1}, "max_tokens: expected an int >= 1"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, r"top_p: expected a number in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float16"}, "dtype: expected one of float32, bfloat16"),
        ({"kv_cache_dtype": "int4"}, "kv_cache_dtype: expected one of auto, bf16, fp8"),
        ({"speculative": "eagle"}, "speculative: expected 'mtp' or None"),
        ({"backend": "triton"}, "backend: expected one of reference, kernels"),
        ({"device": "tpu"}, "device: expected one of cpu, cuda"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_model_len": 10**6}, "max_model_len"),
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization: expected a number in \(0, 1\], got 1.5"),
        ({"kv_cache_bytes": 0}, "kv_cache_bytes: expected a positive int or None, got 0"),
    ],
)
def test_bad_llm_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(tiny, **kwargs)


def test_bad_prompts(llm):
    with pytest.raises(ValueError, match="prompts: expected at least one prompt"):
        llm.generate([])
    with pytest.raises(ValueError, match=r"prompts\[0\]: empty prompt"):
        llm.generate([[]])
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected token ids in \[0, 1024\)"):
        llm.generate([[0, 1], [0, 5000]])
    with pytest.raises(ValueError, match="exceed the"):
        llm.generate([[0] * 100], SamplingParams(max_tokens=10**4))
    with pytest.raises(ValueError, match="sampling_params: expected one per prompt"):
        llm.generate(["a", "b"], [SamplingParams()])
