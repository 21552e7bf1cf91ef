"""Durable file-system steps shared by everything that writes files."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Make a rename or a new file in ``path`` survive a power loss."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: temporary files named after their
    writer's pid are only swept once that writer is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
