"""Training GLM models: the blank-infilling objective, GLM-130B's stability measures, FP16
loss scaling, resumable checkpoints (see docs/training.md)."""
