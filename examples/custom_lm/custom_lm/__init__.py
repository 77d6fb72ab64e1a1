"""A language model written as a user would write it, to show hptransfer on a model it did not build."""

from custom_lm.model import CustomLM

__all__ = ["CustomLM"]
