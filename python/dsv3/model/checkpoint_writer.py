"""Write tensors as a sharded safetensors checkpoint with its index, in the layout of the official release."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv3.model.weights import INDEX_FILE


def write_sharded(tensors: dict[str, torch.Tensor], directory: str | Path, num_shards: int) -> list[Path]:
    """Split `tensors` (in their order) into `num_shards` files of about equal size, plus the index json.

    Files are named model-0000i-of-0000n.safetensors, as in the official checkpoint. Returns the shard paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    written = 0
    for name, tensor in tensors.items():
        shard = min(written * num_shards // max(total, 1), num_shards - 1)
        shards[shard][name] = tensor
        written += tensor.numel() * tensor.element_size()
    weight_map, paths = {}, []
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        paths.append(write_shard(shard, directory / file_name))
        weight_map.update(dict.fromkeys(shard, file_name))
    write_index(directory, weight_map, total)
    return paths


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({name: t.contiguous() for name, t in tensors.items()}, path, metadata={"format": "pt"})
    return path


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: the shard of every tensor, and the bytes of all tensors together."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
