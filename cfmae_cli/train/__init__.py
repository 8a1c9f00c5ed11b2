"""The training engine: ``from cfmae_cli.train import pretrain``."""

from cfmae_cli.train.engine import pretrain

__all__ = ["pretrain"]
