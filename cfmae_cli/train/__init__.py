"""The training engine and the tasks it runs: ``from cfmae_cli.train import pretrain``.

``pretrain`` is imported when it is first asked for, so that importing a light module of this package (for
the command line's help) does not import torch."""

from typing import Any

__all__ = ["pretrain"]


def __getattr__(name: str) -> Any:
    if name == "pretrain":
        from cfmae_cli.train.pretraining import pretrain  # heavy: keeps cfmae --help fast (torch)

        return pretrain
    raise AttributeError(f"module 'cfmae_cli.train' has no attribute {name!r}")
