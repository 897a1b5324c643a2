"""What the kernel caches of a mount, kept in step: names of multiply-linked files, every path
handed out, and the suspension gate that keeps the kernel from caching anything new.

libfuse's high-level API gives every *path* its own kernel inode, so a change made through
one name of a file must invalidate what the kernel caches under its other names
(``Aliases``), and a suspension must invalidate every path the kernel may cache
(``SeenPaths``) after the ``Gate`` has shut. Invalidation itself is the FUSE session's
(``Invalidate``, given by the binding): nothing here imports the FUSE binding.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import queue
import threading
import time
from collections.abc import Callable, Iterator

Invalidate = Callable[[str], int]
"""Drop the kernel's attributes and pages of a mount path: 0, or -errno (-ENOENT when the
kernel does not know the path). ``binding.LibfuseSession.invalidate`` is the real one."""


def moved(path: str, old: str, new: str, exchange: bool = False) -> str:
    """Where mount path ``path`` is after ``old`` was renamed to ``new`` (or, with
    ``exchange``, after the two were swapped)."""
    for src, dst in ((old, new), (new, old)) if exchange else ((old, new),):
        if path == src or path.startswith(src + "/"):
            return dst + path[len(src) :]
    return path


class Aliases:
    """Mount paths of multiply-linked files (anything but directories), so that a change
    made through one name can invalidate what the kernel caches under the others.

    libfuse's high-level API gives every *path* its own kernel inode: after a write through
    ``a`` the kernel would go on serving ``b``'s old size, times and pages. Every name the
    kernel can cache passed through ``stat`` or ``readdir`` (which ``note`` it). Invalidation
    runs in one worker thread: invalidating an inode whose write is in flight waits for that
    write's page locks, so a caller waits at most ``WAIT`` seconds and never deadlocks.

    Locks: ``_lock`` guards the map and is never held while calling into libfuse.
    """

    WAIT = 1.0
    MAX_INODES = 1 << 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[tuple[int, int], set[str]] = {}
        self._work: queue.SimpleQueue[tuple[list[str], threading.Event] | None] = (
            queue.SimpleQueue()
        )
        self._worker: threading.Thread | None = None

    def start(self, invalidate: Invalidate) -> None:
        """Begin invalidating through ``invalidate`` (the mount's session), in a worker."""
        if self._worker is not None:
            return
        self._worker = threading.Thread(
            target=self._run, args=(invalidate,), name="encfs-aliases", daemon=True
        )
        self._worker.start()

    def stop(self) -> None:
        if self._worker is not None:
            self._work.put(None)
            self._worker = None

    def note(self, key: tuple[int, int], path: str) -> None:
        with self._lock:
            paths = self._paths.get(key)
            if paths is None:
                if len(self._paths) >= self.MAX_INODES:
                    self._paths.clear()  # only costs invalidations of names seen before
                paths = self._paths[key] = set()
            paths.add(path)

    def __bool__(self) -> bool:
        return bool(self._paths)

    def forget(self, path: str) -> tuple[int, int] | None:
        """Drop ``path``; returns the inode it named, if it was tracked."""
        with self._lock:
            for key, paths in self._paths.items():
                if path in paths:
                    paths.discard(path)
                    if not paths:
                        del self._paths[key]
                    return key
        return None

    def renamed(self, old: str, new: str, exchange: bool = False) -> None:
        with self._lock:
            for key, paths in self._paths.items():
                self._paths[key] = {moved(p, old, new, exchange) for p in paths}

    def changed(self, key: tuple[int, int] | None, but_not: str | None = None) -> None:
        """Invalidate the kernel's attributes and pages of every other name of ``key``."""
        if key is None or self._worker is None:
            return
        with self._lock:
            paths = [p for p in self._paths.get(key, ()) if p != but_not]
        if paths:
            done = threading.Event()
            self._work.put((paths, done))
            done.wait(self.WAIT)

    def _run(self, invalidate: Invalidate) -> None:
        while (item := self._work.get()) is not None:
            paths, done = item
            for path in paths:
                if invalidate(path) == -errno.ENOENT:
                    self.forget(path)
            done.set()


class Gate:
    """Admission of FUSE operations: closed while the volume is suspended, paused for a
    moment while a rekey renames a directory's entries.

    ``enter`` admits an operation (False when closed by a suspension; while paused it
    waits); ``close`` shuts the gate and waits until the operations already inside have
    left, so that nothing started before the suspension can still put plaintext into the
    kernel's cache afterwards; ``pause`` holds new operations back and waits the same way,
    so that the caller works alone until ``unpause``.

    Lock-free on the request path (a lock here convoys the FUSE threads behind the GIL):
    an operation first registers itself (``deque.append``, atomic), *then* looks at
    ``open``; ``close`` and ``pause`` first clear ``open``, *then* wait for the register
    to empty. An operation therefore either sees the gate shut and withdraws, or is
    counted before they start waiting. ``_cond`` guards the slow path's flags.
    """

    def __init__(self) -> None:
        self._inside: collections.deque[None] = collections.deque()
        self.open = True
        """Operations are admitted without waiting (neither suspended nor paused)."""
        self.suspended = False
        self._paused = 0
        self._cond = threading.Condition(threading.Lock())

    def enter(self) -> bool:
        while True:
            self._inside.append(None)
            if self.open:
                return True
            self._inside.pop()
            with self._cond:
                while self._paused and not self.suspended:
                    self._cond.wait()
                if self.suspended:
                    return False

    def leave(self) -> None:
        self._inside.pop()

    def close(self, timeout: float) -> bool:
        """Shut; True once no operation is inside (False if some still are at ``timeout``)."""
        with self._cond:
            self.suspended = True
            self.open = False
            self._cond.notify_all()
        return self._drained(timeout)

    def reopen(self) -> None:
        with self._cond:
            self.suspended = False
            self.open = not self._paused
            self._cond.notify_all()

    def pause(self, timeout: float) -> bool:
        """Hold new operations back (they wait) and wait until none is inside; True then,
        False at ``timeout`` (still paused: call ``unpause`` either way)."""
        with self._cond:
            self._paused += 1
            self.open = False
        return self._drained(timeout)

    def unpause(self) -> None:
        with self._cond:
            self._paused -= 1
            self.open = not self._paused and not self.suspended
            self._cond.notify_all()

    @contextlib.contextmanager
    def paused(self, timeout: float) -> Iterator[None]:
        """``pause`` for the ``with`` block, ``unpause`` after it. Raises ``TimeoutError``
        (nothing held then) if operations still run after ``timeout``."""
        drained = self.pause(timeout)
        try:
            if not drained:
                raise TimeoutError(f"FUSE operations still running after {timeout:.0f} s")
            yield
        finally:
            self.unpause()

    def _drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._inside:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True


class SeenPaths:
    """Every mount path the kernel may cache attributes or pages under: each passed through
    ``stat`` (lookups, getattr) or ``readdir`` (readdirplus hands out attributes). Suspension
    invalidates them all, so nothing cached before it stays readable. Renames keep the set
    in step; removed names linger harmlessly (invalidating them answers ENOENT).

    Locks: ``_lock`` guards the set; never held while calling into libfuse.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[str] = {"/"}

    def note(self, path: str) -> None:
        self._paths.add(path)  # a single set.add is atomic under the GIL

    def renamed(self, old: str, new: str, exchange: bool, is_dir: bool) -> None:
        with self._lock:
            if is_dir or exchange:
                self._paths = {moved(p, old, new, exchange) for p in self._paths}
            else:
                self._paths.discard(old)
                self._paths.add(new)

    def __len__(self) -> int:
        return len(self._paths)

    def invalidate_all(self, invalidate: Invalidate | None) -> int:
        """Drop the kernel's attributes and pages (also those mapped by ``mmap``) of every
        seen path; returns how many the kernel still knew (0 without a session). Never
        call from a request."""
        if invalidate is None:
            return 0
        with self._lock:
            paths = sorted(self._paths, key=len, reverse=True)  # leaves first
        known = 0
        gone: list[str] = []
        for path in paths:
            if invalidate(path) == -errno.ENOENT:
                gone.append(path)
            else:
                known += 1
        with self._lock:
            self._paths.difference_update(gone)
        return known
