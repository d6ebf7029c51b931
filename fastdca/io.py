"""Atomic file writes: a reader sees the old file or the new one, never a half-written one. Files get
the mode a plain open() would give them under the process umask (0644 under umask 022), not mkstemp's
private 0600."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, then move it over `path` in one step.
    On any error the temporary file is removed and `path` is left as it was. Returns `path`."""
    return atomic_write_all({path: write})[0]


def atomic_write_all(writers: dict) -> list:
    """Write several files that belong together ({path: write(tmp)}): every file goes to a temporary
    path first, and only when all are written are they moved into place. A write that fails (a full
    disk, a permission) removes the temporary files and leaves every path as it was. Returns the paths."""
    temps = []
    try:
        for path, write in writers.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps.append((tmp, path))
            write(tmp)
            os.chmod(tmp, 0o666 & ~process_umask())
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    return [path for _, path in temps]


def atomic_write_text(path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


def process_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
