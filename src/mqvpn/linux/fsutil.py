"""Small file-system helpers shared by the journal and the DNS override (crash-safe writes)."""

from __future__ import annotations

import os


def fsync_dir(directory: str) -> None:
    """Make a rename or unlink in ``directory`` durable (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
