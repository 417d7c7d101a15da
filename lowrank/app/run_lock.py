"""One writer per run directory, and the directory a run opened is the one it writes
(docs/training.md#checkpoints).

``hold(out)`` opens ``out`` once (``O_DIRECTORY``) and takes an advisory lock on the file
``.lowrank.lock`` inside it (``flock``, no waiting): a second run aimed at the same directory
refuses at once with one line. While the lock is held every save goes through the open
descriptor (``/proc/self/fd/<n>`` on Linux: the kernel resolves it to the directory that was
opened, whatever the path names now), so a run directory deleted and replaced by a symlink to
the base during training can never redirect a save into the base; and before each save
``check_unchanged`` compares the path's identity (``st_dev``, ``st_ino``) with the open
directory's, so such a swap stops the run with one line instead of writing into a directory
nobody can see. The lock is released (and its file removed) when the run ends; a killed run's
lock goes with its process.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .run_dir import remove_if_unsaved

LOCK_FILE = ".lowrank.lock"
_HELD: dict[str, "RunDirectory"] = {}   # the path saves use -> its guard


class RunDirectory:
    """An opened, locked run directory: ``path`` is where this run writes."""

    def __init__(self, out):
        self.out = Path(out)
        try:
            self.fd = os.open(self.out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as exc:
            raise ValueError(f"--out {self.out}: cannot open the directory "
                             f"({exc.strerror or exc})") from None
        info = os.fstat(self.fd)
        self.identity = (info.st_dev, info.st_ino)
        self.lock_fd = None
        try:
            self._lock()
        except BaseException:
            os.close(self.fd)
            raise
        proc = Path(f"/proc/self/fd/{self.fd}")
        self.path = proc if _same(proc, self.identity) else self.out

    def _lock(self) -> None:
        import fcntl   # POSIX only; lowrank's writers run on Linux and macOS
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            self.lock_fd = os.open(LOCK_FILE, flags, 0o644, dir_fd=self.fd)
        except OSError as exc:
            raise ValueError(f"--out {self.out}: cannot create its lock file {LOCK_FILE} "
                             f"({exc.strerror or exc})") from None
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the holder before us may have removed the file after we opened it
            held = os.fstat(self.lock_fd)
            now = os.stat(LOCK_FILE, dir_fd=self.fd, follow_symlinks=False)
            if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            os.close(self.lock_fd)
            self.lock_fd = None
            raise ValueError(f"--out {self.out} is in use by another lowrank run (its lock "
                             f"{LOCK_FILE} is held); wait for that run to end or choose "
                             "another --out") from None

    def check_unchanged(self) -> None:
        """Raise ValueError if ``out`` no longer names the directory this run opened."""
        if not _same(self.out, self.identity):
            raise ValueError(f"--out {self.out} was removed or replaced while this run was "
                             "writing there (it is no longer the directory the run opened); "
                             "stopping without writing anything more")

    def release(self) -> None:
        _HELD.pop(str(self.path), None)
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(LOCK_FILE, dir_fd=self.fd)
            os.close(self.lock_fd)
            self.lock_fd = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _same(path, identity) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == identity


@contextlib.contextmanager
def hold(out):
    """Lock ``out`` (a directory that exists) for this run; yields the ``RunDirectory``."""
    guard = RunDirectory(out)
    _HELD[str(guard.path)] = guard
    try:
        yield guard
    finally:
        guard.release()


def check_unchanged(path) -> None:
    """Before a save into ``path``: refuse if the run directory it stands for was swapped
    (a path no run holds is left alone: library use without a lock, other ranks)."""
    guard = _HELD.get(str(path))
    if guard is not None:
        guard.check_unchanged()


def shown(text: str, guard: RunDirectory) -> str:
    """``text`` with the descriptor path put back as the directory the user named."""
    return text.replace(str(guard.path), str(guard.out)) if guard.path != guard.out else text


@contextlib.contextmanager
def hold_if(out, writer: bool):
    """``hold(out)`` for the process that writes (yields the path saves use); others get
    ``out`` as it is. Errors raised inside name ``out``, never the descriptor path."""
    if not writer:
        yield Path(out)
        return
    with hold(out) as guard:
        try:
            yield guard.path
        except OSError as exc:   # a full disk, a size limit: its file named as the user knows it
            if exc.filename is not None:
                exc.filename = shown(str(exc.filename), guard)
            raise
        except ValueError as exc:
            text = shown(str(exc), guard)
            if text == str(exc):
                raise
            try:
                renamed = type(exc)(text)
            except Exception:   # noqa: BLE001 - a subclass with another signature
                raise exc from None
            raise renamed from None


def run_locked(out, writer: bool, body, made_first: str = "tokenizer.json"):
    """``body(where)`` (a workflow writing into ``out``) with ``out`` held (``hold_if``); after
    a failure, ``made_first`` is removed if this run created it and nothing was saved. The
    result's ``out`` is the directory the user named."""
    with hold_if(out, writer) as where:
        existed = (where / made_first).exists()
        try:
            result = body(where)
        except BaseException:
            if writer:   # a failed first run leaves no tokenizer without a model
                remove_if_unsaved(where, made_first, existed)
            raise
    result.out = out
    return result
