"""One build per output prefix, across processes, PID namespaces and nodes sharing a file system.

A build holds `.BASE.lock` beside its outputs for its whole run: created with O_CREAT|O_EXCL
(atomic on local file systems and on NFSv3+), holding JSON that says who owns it: host name, boot
id, PID namespace, pid, the process's start time and a random nonce. A second build of the same
prefix is refused, naming the owner. A lock is *stale* (and is broken, with a warning) only when

  - its owner is on this host, in this PID namespace and boot (same host tag), and that pid is
    gone or is now another process (a different start time): a PID seen from another namespace or
    node says nothing, so `kill(pid, 0)` is never trusted across them; or
  - it has not been refreshed for `LOCK_STALE_S` seconds: the owner touches the file every
    `HEARTBEAT_S` seconds from a daemon thread, so only a dead (or frozen) build stops doing so.

Breaking a stale lock renames it to a unique name first, so of two builds that find it stale at
once only one wins; the loser retries and finds the winner's lock. Before publishing, a build
checks that the lock file is still its own (`verify`): one frozen past the stale age has lost it
and must not publish over the build that took over.

Temporaries carry the owner's host tag and pid in their names (`indexed.AtomicOutputs`), so the
same rule decides whether a leftover temporary's owner is dead.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, Optional

LOCK_STALE_S = 900.0
"""A lock (or temporary) not refreshed for this long is treated as left by a dead build."""
HEARTBEAT_S = 30.0
"""How often the owner refreshes its lock file's mtime."""


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> Optional[str]:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot); None if gone."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def host_tag() -> str:
    """8 hex digits naming this host, boot and PID namespace: equal tags mean pids compare."""
    try:
        pid_ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pid_ns = "?"
    what = f"{socket.gethostname()}|{_read('/proc/sys/kernel/random/boot_id')}|{pid_ns}"
    return hashlib.sha256(what.encode()).hexdigest()[:8]


def pid_dead_here(tag: str, pid: int, start: Optional[str] = None) -> bool:
    """True only when `pid` under host tag `tag` is known to be gone: same host, boot and PID
    namespace, and no such process (or one that started at another time: a reused pid)."""
    if tag != host_tag():
        return False
    now = _start_time(pid)
    if now is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False  # alive, but /proc unreadable: not known dead
    return start is not None and now != start


class LockHeldError(OSError):
    """Another live build holds the prefix."""


class PrefixLock:
    """The lock on an output prefix (module docstring). Use as a context manager."""

    def __init__(self, prefix: str, stale_s: float = LOCK_STALE_S, heartbeat_s: float = HEARTBEAT_S):
        directory, base = os.path.split(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f".{base}.lock")
        self.prefix = prefix
        self.stale_s = stale_s
        self.heartbeat_s = heartbeat_s
        self.info: Dict[str, Any] = {
            "host": socket.gethostname(), "host_tag": host_tag(), "pid": os.getpid(),
            "start": _start_time(os.getpid()), "nonce": uuid.uuid4().hex, "since": time.time()}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _owner(self) -> Optional[Dict[str, Any]]:
        try:
            return json.loads(_read(self.path) or "null")
        except ValueError:
            return {}  # being written, or garbage: judged by age alone

    def _stale(self, owner: Optional[Dict[str, Any]]) -> bool:
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return True
        if age > self.stale_s:
            return True
        return bool(owner) and pid_dead_here(owner.get("host_tag", ""), int(owner.get("pid", -1)),
                                             owner.get("start"))

    def acquire(self) -> Optional[Dict[str, Any]]:
        """Take the lock; returns the stale owner it replaced (None if the lock was free).
        Raises `LockHeldError` naming the live owner."""
        broken = None
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if not self._stale(owner):
                    who = owner or {}
                    raise LockHeldError(
                        f"output.prefix={self.prefix!r}: another build holds {self.path} (host "
                        f"{who.get('host', '?')}, pid {who.get('pid', '?')}, since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(who.get('since', 0)))});"
                        f" wait for it, or delete the lock file if that build is dead") from None
                grave = f"{self.path}.stale-{self.info['nonce']}"
                try:
                    os.rename(self.path, grave)  # only one of several breakers gets it
                except FileNotFoundError:
                    continue
                try:
                    with open(grave, encoding="utf-8") as f:
                        moved = json.loads(f.read() or "null")
                except ValueError:
                    moved = {}
                if moved != owner:  # re-taken between our read and the rename: give it back
                    try:
                        os.link(grave, self.path)
                    except FileExistsError:
                        pass
                else:
                    broken = owner
                os.remove(grave)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.info, f)
            self._thread = threading.Thread(target=self._beat, daemon=True, name="prefix-lock")
            self._thread.start()
            return broken
        raise LockHeldError(f"output.prefix={self.prefix!r}: could not take {self.path}")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def verify(self) -> None:
        """Raise unless the lock file is still this build's (checked right before publishing)."""
        owner = self._owner() or {}
        if owner.get("nonce") != self.info["nonce"]:
            raise LockHeldError(
                f"output.prefix={self.prefix!r}: this build lost its lock {self.path} (it was "
                f"not refreshed for {self.stale_s:.0f} s and another build took it); not publishing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (self._owner() or {}).get("nonce") == self.info["nonce"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "PrefixLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
