"""Load a DeepSeek-V3 checkpoint directory: every tensor checked against the layout its config implies.

A checkpoint is `config.json` plus either one `model.safetensors` or shards listed by `model.safetensors.index.json`
(`{"weight_map": {tensor name: file name}}`). Tensors come back memory-mapped and in their stored dtype: FP8 weights
stay e4m3 next to their float32 `weight_scale_inv`. The MTP module is loaded when the checkpoint has it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dsv3.model.config import ModelConfig
from dsv3.model.safetensors_file import CheckpointError, SafetensorsFile
from dsv3.model.tensors import checkpoint_tensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_index(directory: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index, or from the single file's header."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({error})") from None
        return dict(weight_map)
    single = directory / SINGLE_FILE
    if single.exists():
        return dict.fromkeys(SafetensorsFile(single).entries, SINGLE_FILE)
    raise CheckpointError(f"{directory}: no {INDEX_FILE} or {SINGLE_FILE}")


def _open_shards(directory: Path, weight_map: dict[str, str]) -> dict[str, SafetensorsFile]:
    shards = {}
    for file_name in sorted(set(weight_map.values())):
        path = directory / file_name
        if not path.exists():
            holds = next(name for name, file in weight_map.items() if file == file_name)
            raise CheckpointError(f"{path}: missing shard (the index puts {holds!r} and others there)")
        shards[file_name] = SafetensorsFile(path)
    for file_name, shard in shards.items():
        for name in shard.entries:
            if weight_map.get(name) not in (None, file_name):
                raise CheckpointError(f"{shard.path}: holds {name!r}, which the index places in {weight_map[name]}")
            if name not in weight_map:
                raise CheckpointError(f"{shard.path}: unexpected tensor {name!r} (not in {INDEX_FILE})")
    return shards


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # memory-mapped, in their stored dtype
    weight_map: dict[str, str]  # tensor name -> shard file name

    @property
    def has_mtp(self) -> bool:
        return any(
            name.startswith(f"model.layers.{layer}.") for layer in self.config.mtp_layers for name in self.tensors
        )


def load_checkpoint(
    path: str | Path,
    config: ModelConfig | None = None,
    progress: bool = False,
    keep: Callable[[str], bool] | None = None,
) -> Checkpoint:
    """Read config.json (unless given) and every tensor of the checkpoint in directory `path` (with `keep`, only the
    tensors it accepts: every name and shape is still checked, the others are never mapped, e.g. the routed experts
    of other expert-parallel ranks).

    Raises CheckpointError naming the tensor and file for a missing, unexpected, mis-shaped or mis-typed tensor, or a
    truncated shard (and ConfigError for a bad config.json).
    """
    directory = Path(path)
    config = config or ModelConfig.from_file(directory / "config.json")
    weight_map = _read_index(directory)
    mtp_prefixes = tuple(f"model.layers.{layer}." for layer in config.mtp_layers)
    has_mtp = any(name.startswith(mtp_prefixes) for name in weight_map) if mtp_prefixes else False
    expected = checkpoint_tensors(config, include_mtp=has_mtp)

    for name in weight_map:
        if name not in expected:
            raise CheckpointError(f"{directory / weight_map[name]}: unexpected tensor {name!r} for this config")
    for name in expected:
        if name not in weight_map:
            raise CheckpointError(f"{directory}: missing tensor {name!r} (in no shard of the checkpoint)")
    shards = _open_shards(directory, weight_map)

    tensors = {}
    for name in tqdm(expected, desc="loading weights", unit="tensor", disable=not progress):
        shard = shards[weight_map[name]]
        entry = shard.entries.get(name)
        if entry is None:
            raise CheckpointError(f"{shard.path}: missing tensor {name!r}, which the index places in this file")
        spec = expected[name]
        if entry.shape != spec.shape or entry.dtype != spec.dtype:
            raise CheckpointError(
                f"{shard.path}: tensor {name!r} is {entry.dtype} {list(entry.shape)}, "
                f"expected {spec.dtype} {list(spec.shape)}"
            )
        if keep is None or keep(name):
            tensors[name] = shard.tensor(name)
    return Checkpoint(config, tensors, weight_map)
