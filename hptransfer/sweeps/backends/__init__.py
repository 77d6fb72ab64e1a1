"""Where runs execute: one module per backend behind the interface of `base.Backend`.

A backend's module is imported when a launcher block or a job record names it, so `hpt status` on a
local sweep never imports submitit.
"""

import importlib

from hptransfer.errors import HptError
from hptransfer.sweeps.backends.base import Backend

BACKENDS = {"local": "hptransfer.sweeps.backends.local:Local", "slurm": "hptransfer.sweeps.backends.slurm:Slurm"}


def backend(name: str) -> Backend:
    """The backend called `name` (`launcher.name`, or a job record's `executor`)."""
    if name not in BACKENDS:
        raise HptError(f"config key 'launcher.name': '{name}' is not one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)()

