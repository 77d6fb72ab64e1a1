"""Which code ran: hptransfer's git commit and whether its working tree was dirty (no torch, no Hydra)."""

import subprocess
from functools import cache
from pathlib import Path

import hptransfer


@cache
def git_state(folder: str | None = None) -> dict[str, str | bool | None]:
    """{"git_commit", "git_dirty"} of the checkout hptransfer is imported from (or of `folder`: a user's
    project); None outside a git checkout (an installed copy)."""
    pkg = Path(folder) if folder else Path(hptransfer.__file__).resolve().parent.parent
    state: dict[str, str | bool | None] = {"git_commit": None, "git_dirty": None}
    try:
        def git(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True, timeout=5)

        head = git("rev-parse", "HEAD")
        if head.returncode == 0:
            state["git_commit"] = head.stdout.strip()
            state["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return state
