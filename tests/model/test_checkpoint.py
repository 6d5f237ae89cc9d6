"""make-tiny's layout, the BF16 conversion, and the loader's errors on corrupted checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3.model.config import ConfigError
from dsv3.model.safetensors_file import CheckpointError
from dsv3.model.tensors import checkpoint_tensors
from dsv3.model.weights import INDEX_FILE, load_checkpoint
from dsv3.reference.quant import FP8_DTYPE, dequant_fp8_block


def test_tiny_checkpoint_has_the_official_layout(tiny_fp8):
    raw = json.loads((tiny_fp8 / "config.json").read_text())
    assert raw["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    weight_map = json.loads((tiny_fp8 / INDEX_FILE).read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 2
    checkpoint = load_checkpoint(tiny_fp8)
    c = checkpoint.config
    assert checkpoint.has_mtp and c.first_k_dense_replace >= 1 and c.num_hidden_layers > c.first_k_dense_replace
    assert c.n_group > c.topk_group > 1 and c.n_shared_experts == 1 and c.rope_scaling.factor > 1
    assert set(checkpoint.tensors) == set(checkpoint_tensors(c))
    kv_a = checkpoint.tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert kv_a.dtype == FP8_DTYPE and kv_a.shape == (576, c.hidden_size)  # a partial 64-row edge block
    scale = checkpoint.tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
    assert scale.shape == (5, 2) and torch.equal(scale, torch.exp2(torch.log2(scale).round()))
    assert checkpoint.tensors["lm_head.weight"].dtype == torch.bfloat16
    assert checkpoint.tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_tiny_tokenizer_and_chat_template(tiny_fp8):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_fp8)
    ids = tokenizer("Hello, world!").input_ids
    assert ids[0] == 0 and tokenizer.decode(ids, skip_special_tokens=True) == "Hello, world!"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>"


def test_bf16_conversion_is_exact_and_drops_the_scales(tiny_fp8, tiny_bf16):
    fp8, bf16 = load_checkpoint(tiny_fp8), load_checkpoint(tiny_bf16)
    assert bf16.config.quantization is None and bf16.has_mtp
    assert set(bf16.tensors) == {name for name in fp8.tensors if not name.endswith("_scale_inv")}
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    exact = dequant_fp8_block(fp8.tensors[name], fp8.tensors[f"{name}_scale_inv"], dtype=torch.float32)
    assert bf16.tensors[name].dtype == torch.bfloat16 and torch.equal(bf16.tensors[name].float(), exact)


def test_single_file_checkpoint_loads(tiny_bf16, tmp_path):
    tensors = {}
    for shard in sorted(tiny_bf16.glob("*.safetensors")):
        tensors.update(load_file(shard))
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(tiny_bf16 / "config.json", tmp_path)
    assert set(load_checkpoint(tmp_path).tensors) == set(tensors)


@pytest.fixture
def broken(tiny_fp8, tmp_path):
    """A writable copy of the tiny checkpoint, and the shard holding a given tensor."""
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_fp8, target)
    weight_map = json.loads((target / INDEX_FILE).read_text())["weight_map"]
    return target, weight_map


NAME = "model.layers.1.self_attn.kv_b_proj.weight"


def _rewrite_shard(directory, file_name, edit):
    tensors = load_file(directory / file_name)
    edit(tensors)
    save_file(tensors, directory / file_name)


def test_missing_tensor_is_named_with_its_file(broken):
    directory, weight_map = broken
    _rewrite_shard(directory, weight_map[NAME], lambda t: t.pop(NAME))
    with pytest.raises(CheckpointError, match=rf"{weight_map[NAME]}: missing tensor '{NAME}'"):
        load_checkpoint(directory)


def test_tensor_missing_from_index_and_files_is_named(broken):
    directory, weight_map = broken
    _rewrite_shard(directory, weight_map[NAME], lambda t: t.pop(NAME))
    del weight_map[NAME]
    (directory / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"missing tensor '{NAME}'"):
        load_checkpoint(directory)


def test_wrong_shape_is_named_with_expected_and_actual(broken):
    directory, weight_map = broken
    _rewrite_shard(directory, weight_map[NAME], lambda t: t.update({NAME: t[NAME][:-1].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"{weight_map[NAME]}: tensor '{NAME}' is .*\[255, 512\], expected"):
        load_checkpoint(directory)


def test_unexpected_tensor_is_named(broken):
    directory, weight_map = broken
    extra = "model.layers.1.self_attn.extra.weight"
    _rewrite_shard(directory, weight_map[NAME], lambda t: t.update({extra: torch.zeros(2)}))
    weight_map[extra] = weight_map[NAME]
    (directory / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"{weight_map[NAME]}: unexpected tensor '{extra}'"):
        load_checkpoint(directory)


def test_truncated_shard_is_named(broken):
    directory, weight_map = broken
    shard = directory / weight_map[NAME]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=rf"{weight_map[NAME]}: truncated, tensor '.*' ends at byte"):
        load_checkpoint(directory)


def test_missing_shard_is_named(broken):
    directory, weight_map = broken
    (directory / weight_map[NAME]).unlink()
    with pytest.raises(CheckpointError, match=rf"{weight_map[NAME]}: missing shard"):
        load_checkpoint(directory)


def test_bad_config_is_reported(broken):
    directory, _ = broken
    raw = json.loads((directory / "config.json").read_text())
    raw["n_group"] = 3
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config\.json: n_routed_experts=16 is not divisible by n_group=3"):
        load_checkpoint(directory)


def test_checkpoint_without_mtp_loads_without_it(broken):
    directory, weight_map = broken
    mtp = {name for name in weight_map if name.startswith("model.layers.3.")}
    for file_name in set(weight_map.values()):
        _rewrite_shard(directory, file_name, lambda t: [t.pop(name) for name in mtp if name in t])
    (directory / INDEX_FILE).write_text(
        json.dumps({"weight_map": {k: v for k, v in weight_map.items() if k not in mtp}})
    )
    checkpoint = load_checkpoint(directory)
    assert not checkpoint.has_mtp and not any(name.startswith("model.layers.3.") for name in checkpoint.tensors)
