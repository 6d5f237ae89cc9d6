"""The serving runtime around dsv3.model: paged KV cache, scheduler, sampling, MTP speculative decoding, `LLM`."""

from dsv3.runtime.llm import LLM, RequestOutput
from dsv3.runtime.sampling_params import SamplingParams
from dsv3.runtime.streaming import StreamOutput
from dsv3.runtime.tokenizer import Tokenizer

__all__ = ["LLM", "RequestOutput", "SamplingParams", "StreamOutput", "Tokenizer"]
