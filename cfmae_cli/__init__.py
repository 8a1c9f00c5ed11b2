"""cfmae: coarse-to-fine masked-autoencoder pre-training (CFMAE) of Vision Transformers."""

__version__ = "0.1.0"
