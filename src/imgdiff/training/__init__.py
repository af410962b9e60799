"""Training: noise-level sampling, EMA, atomic safetensors checkpoints and a small training loop."""

from imgdiff.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from imgdiff.training.ema import ema_model
from imgdiff.training.noise import sample_gamma, sample_timesteps
from imgdiff.training.trainer import Trainer, TrainingBatch, TrainingConfig

__all__ = [
    "CheckpointError",
    "Trainer",
    "TrainingBatch",
    "TrainingConfig",
    "ema_model",
    "load_checkpoint",
    "sample_gamma",
    "sample_timesteps",
    "save_checkpoint",
]
