"""hptransfer: find a large model's hyperparameters by tuning small ones."""

__version__ = "0.1.0"
