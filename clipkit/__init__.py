"""clipkit: CLIP-style contrastive pretraining, from a laptop to many GPUs."""

__version__ = "0.1.0"
