"""One writer per output folder: an exclusive, non-blocking lock file that names its holder's pid.

`fastdca train` and `fastdca sweep` hold it while they write a folder, so that a second run into the
same folder stops at once instead of mixing its checkpoints and results with the first's. The lock is
the operating system's (flock): a killed holder releases it, and no stale lock is left to clean up.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def only_writer(folder, lock_name: str, what: str):
    """Hold `folder/lock_name` exclusively while the block runs; RuntimeError naming the holder's pid
    if another process holds it. `what` names the writer in the message ("fastdca train")."""
    try:
        import fcntl
    except ImportError:     # not POSIX: no lock to take
        yield
        return
    folder = Path(folder)
    with open(folder / lock_name, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RuntimeError(f"another {what} (pid {holder}) is writing to {folder}; wait for it to finish or "
                               "give this one another --output") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
