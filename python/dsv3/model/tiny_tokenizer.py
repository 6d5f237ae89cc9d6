"""A small byte-level BPE tokenizer with DeepSeek-V3's special tokens and chat template, trained on a fixed text."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT]  # ids 0..3, so bos_token_id 0 and eos_token_id 1 as in DeepSeek-V3

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}" + EOS + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

TRAINING_TEXT = """\
DeepSeek-V3 is a mixture-of-experts language model with 671 billion parameters, of which 37 billion are active for
each token. It uses multi-head latent attention, which compresses keys and values into a small latent vector, and an
auxiliary-loss-free strategy to balance the load of its experts. A multi-token prediction module predicts the token
after next, which can be used to speculate during decoding. The weights are stored in eight-bit floating point with a
scale for every block of 128 by 128 values.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, thank you.
Once upon a time there was a small model that wanted to speak. It read every book it could find, and it learned the
numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, the days Monday Tuesday Wednesday Thursday Friday Saturday Sunday, and the
colours red green blue yellow black white.
"""


def train_tiny_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE with at most `vocab_size` tokens; every byte is in the alphabet, so any text encodes."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return tokenizer


def write_tiny_tokenizer(directory: str | Path, vocab_size: int, max_length: int) -> int:
    """Write tokenizer.json and tokenizer_config.json (with the chat template); returns the tokenizer's size."""
    directory = Path(directory)
    tokenizer = train_tiny_tokenizer(vocab_size)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return tokenizer.get_vocab_size()
