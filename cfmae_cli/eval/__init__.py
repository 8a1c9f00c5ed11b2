"""Fine-tuning and evaluation: ``from cfmae_cli.eval import finetune``.

``finetune`` is imported when it is first asked for (the command line's help does not import torch)."""

from typing import Any

__all__ = ["finetune"]


def __getattr__(name: str) -> Any:
    if name == "finetune":
        from cfmae_cli.eval.finetune import finetune  # heavy: keeps cfmae --help fast (torch)

        return finetune
    raise AttributeError(f"module 'cfmae_cli.eval' has no attribute {name!r}")
