"""DeepSeek-V3 model: config, checkpoint loading, and the transformer over a paged latent cache."""

from dsv3.model.batch import AttentionBatch
from dsv3.model.config import ConfigError, ModelConfig
from dsv3.model.safetensors_file import CheckpointError
from dsv3.model.transformer import DeepseekV3
from dsv3.model.weights import Checkpoint, load_checkpoint

__all__ = [
    "AttentionBatch",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "DeepseekV3",
    "ModelConfig",
    "load_checkpoint",
]
