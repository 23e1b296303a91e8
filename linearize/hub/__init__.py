"""Shipping converted models: remote code generated from the package, the model card, and the push."""

from .card import model_card
from .code import bundle
from .push import push, stage, upload_operations

__all__ = ["bundle", "model_card", "push", "stage", "upload_operations"]
