"""One run per folder: an exclusive lock on the run folder for the whole run.

The main process of a run holds an ``fcntl.flock`` on ``<run>/.lock`` from before its first
look at the folder's checkpoints until it exits (the kernel drops the lock if the process dies,
so a killed run never leaves a stale lock). A second run into the same folder is refused with
the holder's process id. The lock file stays: deleting it would let a third run lock a fresh
inode while a second still holds the old one.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

__all__ = ["RunFolderLock", "RunFolderBusy", "remove_stale_temp_files", "LOCK_NAME"]

LOCK_NAME = ".lock"
# Temporary files of checkpoint.save_atomic and friends: ".<name>.tmp<pid>".
_TEMP = re.compile(r"^\..+\.tmp\d+$")


class RunFolderBusy(OSError):
    """Another run holds the run folder."""


class RunFolderLock:
    """An exclusive, non-blocking lock on ``folder`` (created if missing) for this process.

    ``release(remove_if_unused=True)`` also removes the folder if this lock created it and nothing
    but the lock file was written into it (a run that failed before its first write leaves nothing).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> RunFolderLock:
        """Take the lock; raise :class:`RunFolderBusy` naming the holder if another process has it."""
        self._created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise NotADirectoryError(f"run folder {str(self.folder)!r} exists and is not a folder") from None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise RunFolderBusy(f"run folder {str(self.folder)!r} is in use by another run ({holder}); wait for it "
                                    f"to finish or choose another --output")
            # The file we locked must still be the one at the path (not replaced between open and lock).
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self, remove_if_unused: bool = False) -> None:
        """Drop the lock (and, if asked, the folder this lock created when nothing else was written into it)."""
        if self._fd is None:
            return
        if remove_if_unused and self._created and [p.name for p in self.folder.iterdir()] == [LOCK_NAME]:
            self.path.unlink()  # still locked: nobody else can hold this inode
            os.close(self._fd)
            self._fd = None
            try:
                self.folder.rmdir()
            except OSError:  # another process created something in the meantime: keep it
                pass
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_stale_temp_files(folder: Path) -> list[tuple[str, int]]:
    """Delete the half-written temporary files a killed run left in ``folder``; returns (name, bytes) of each.

    Call only while holding the folder's lock: then no live writer owns them.
    """
    removed = []
    for path in folder.iterdir():
        if _TEMP.match(path.name) and path.is_file():
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            removed.append((path.name, size))
    return removed


def _try_lock(fd: int) -> bool:
    """Lock ``fd`` exclusively without waiting; False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: lock the first byte instead
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_holder(fd: int, wait_s: float = 2.0) -> str:
    """What the holder wrote into the lock file: "pid N on HOST". A holder writes it right after taking the lock, so
    an empty file is waited on for up to ``wait_s`` seconds (a busy machine may pause the holder in between)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        except (OSError, AttributeError):  # (no pread on Windows)
            return "another process"
        if text or time.monotonic() >= deadline:
            return text or "a process that has not yet written its id"
        time.sleep(0.02)
