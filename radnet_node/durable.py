"""Making written files survive a power loss: fsync a folder (so a new or renamed entry in it is
on disk), and create folders whose own entries are on disk. Used by the spool and the result
folders."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_folder", "make_folder_durably"]


def fsync_folder(folder: Path) -> None:
    """fsync ``folder`` itself: the entries created, renamed or removed in it reach the disk.

    Raises
    ------
    OSError
        The folder cannot be opened or synced.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folder_durably(folder: Path) -> None:
    """Create ``folder`` and its missing parents, fsyncing the parent of each one created, so a
    power loss cannot take the folder (and the files later put in it) away.

    Raises
    ------
    OSError
        A folder cannot be created or synced.
    """
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_folder(created.parent)
