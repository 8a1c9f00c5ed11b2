"""The training engine and the tasks it runs: ``from cfmae_cli.train import pretrain``."""

from cfmae_cli.train.pretraining import pretrain

__all__ = ["pretrain"]
