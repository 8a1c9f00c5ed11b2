"""CFMAE model: ``from cfmae_cli.model import CFMAE``."""

from cfmae_cli.model.cfmae import CFMAE

__all__ = ["CFMAE"]
