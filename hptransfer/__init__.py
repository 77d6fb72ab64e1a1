"""hptransfer: find a large model's hyperparameters by tuning small ones.

As a library for any torch.nn.Module: `parameterize`, `describe`, `coord_check` and `Parameterization`
(docs/science.md#your-own-model). They load on first use, so `import hptransfer` and the `hpt`
command do not import torch.
"""

__version__ = "0.1.0"
__all__ = ["Parameterization", "__version__", "coord_check", "describe", "parameterize"]


def __getattr__(name: str) -> object:
    """PEP 562: the library's names, imported when first asked for."""
    if name in ("parameterize", "describe", "Parameterization"):
        from hptransfer.train import parameterization  # lazy: it imports torch, which `hpt` must not

        return getattr(parameterization, name)
    if name == "coord_check":
        from hptransfer.train.coord import check_model  # lazy: it imports torch, which `hpt` must not

        return check_model
    raise AttributeError(f"module 'hptransfer' has no attribute {name!r}")
