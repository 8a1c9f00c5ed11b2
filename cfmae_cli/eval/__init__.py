"""Fine-tuning and evaluation: ``from cfmae_cli.eval import finetune``."""

from cfmae_cli.eval.finetune import finetune

__all__ = ["finetune"]
