"""Training: data preparation, the training loop, fine-tuning (full + LoRA) and scale-out.

    from muse.training import TrainConfig, TokenBatches, train, pretrain
"""

from muse.training.batches import BatchSource, TokenBatches
from muse.training.loop import TrainConfig, TrainResult, lr_at, pretrain, train

__all__ = ["BatchSource", "TokenBatches", "TrainConfig", "TrainResult", "lr_at", "pretrain", "train"]
