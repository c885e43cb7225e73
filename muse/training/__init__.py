"""Training: data preparation, the training loop, fine-tuning (full + LoRA) and scale-out."""
