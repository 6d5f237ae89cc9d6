"""`dsv3 convert --to-bf16`: dequantize every FP8 weight of a checkpoint, keeping its layout otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from dsv3.model.checkpoint_writer import write_index, write_shard
from dsv3.model.weights import load_checkpoint
from dsv3.reference.quant import FP8_DTYPE, dequant_fp8_block

# Files that describe the model rather than hold weights, copied unchanged (config.json is rewritten).
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def convert_to_bf16(source: str | Path, target: str | Path, progress: bool = False) -> Path:
    """Write `target`: the checkpoint `source` with each FP8 weight as bf16 (q * scale_inv in fp32, rounded once),
    without scales, and config.json without quantization_config.

    Shards keep their names and contents, so memory use is bounded by one converted shard.
    """
    source, target = Path(source), Path(target)
    checkpoint = load_checkpoint(source, progress=progress)
    quantization = checkpoint.config.quantization
    if quantization is None:
        raise ValueError(f"{source}: already unquantized (config.json has no quantization_config)")
    block = quantization.weight_block_size[0]  # the config parser accepts only square blocks
    target.mkdir(parents=True, exist_ok=True)
    weight_map, total_size = {}, 0
    for file_name in tqdm(sorted(set(checkpoint.weight_map.values())), desc="converting", disable=not progress):
        shard = {}
        for name, tensor_file in checkpoint.weight_map.items():
            if tensor_file != file_name or name.endswith("_scale_inv"):
                continue
            tensor = checkpoint.tensors[name]
            if tensor.dtype == FP8_DTYPE:
                tensor = dequant_fp8_block(tensor, checkpoint.tensors[f"{name}_scale_inv"], block, torch.bfloat16)
            shard[name] = tensor
            total_size += tensor.numel() * tensor.element_size()
        write_shard(shard, target / file_name)
        weight_map.update(dict.fromkeys(shard, file_name))
    write_index(target, weight_map, total_size)
    raw_config = json.loads((source / "config.json").read_text())
    del raw_config["quantization_config"]
    (target / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    for side_file in _SIDE_FILES:
        if (source / side_file).exists():
            shutil.copy2(source / side_file, target / side_file)
    return target
