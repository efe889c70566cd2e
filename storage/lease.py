"""Exclusive leases on a store: the store's writer lock and each scene's write claim.

A lease is one small JSON object created only if it does not exist yet (locally: a complete
temporary file hard-linked into place, which fails when the name exists; on object storage the
same is a conditional PUT, ``If-None-Match: *``). It names its owner: a random token, host, pid,
the pid's start time, when it was taken and a heartbeat that a daemon thread refreshes.

A lease is *stale* when its owner is gone: on this host, the pid is not running (or runs with
another start time, i.e. the pid was reused, or is a zombie); on another host, the heartbeat is
older than ``stale_after`` seconds. Only a stale lease is broken, under a short-lived exclusive
``<name>.break`` object, so two processes never both break it and both take it over.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from storage.errors import InputError
from storage.objects import AnyPath, ObjectPath, as_path

HEARTBEAT_S = 10.0  # how often an owner refreshes its heartbeat
STALE_AFTER_S = 120.0  # a lease of another host whose heartbeat is older than this is stale
BREAK_STALE_S = 30.0  # a ``.break`` object older than this was left by a crashed breaker


class LeaseHeldError(InputError):
    """The lease is held by a live owner (``owner``); the message names the path and the owner."""

    def __init__(self, message: str, owner: Owner | None) -> None:
        super().__init__(message)
        self.owner = owner


class LeaseLostError(RuntimeError):
    """Our lease was broken or replaced by another process (our heartbeat stalled too long)."""


@dataclass(frozen=True)
class Owner:
    """Who holds a lease."""

    token: str
    host: str
    pid: int
    pid_start: int | None  # process start time in clock ticks since boot (Linux), None elsewhere
    purpose: str
    started: float  # unix time the lease was taken
    heartbeat: float  # unix time of the last refresh

    def describe(self) -> str:
        age = max(0.0, time.time() - self.heartbeat)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host} ({self.purpose}) since {since}, heartbeat {age:.0f} s ago"


def _synced_temp(path: Path, data: bytes) -> Path:
    """``data`` written and fsynced to a temporary file beside ``path`` (removed if writing fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def put_bytes(path: AnyPath, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step (a whole-object PUT; locally temp file + replace)."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)
        return
    tmp = _synced_temp(path, data)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def create_exclusive(path: AnyPath, data: bytes) -> bool:
    """Create ``path`` holding ``data`` if no such object exists; -> False when it exists.

    The object appears complete or not at all (a temporary file linked into place; in a bucket a
    conditional PUT).
    """
    if isinstance(path, ObjectPath):
        return path.create(data)
    tmp = _synced_temp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _pid_start(pid: int) -> tuple[int | None, str | None]:
    """(start time in ticks, state letter) of ``pid`` from /proc, (None, None) without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None, None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[19]), fields[0]


def this_process(purpose: str) -> Owner:
    now = time.time()
    return Owner(token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                 pid_start=_pid_start(os.getpid())[0], purpose=purpose, started=now, heartbeat=now)


def owner_alive(owner: Owner, stale_after: float = STALE_AFTER_S) -> bool:
    """Whether ``owner`` may still be working (see the module docstring for the rule)."""
    if owner.host != socket.gethostname():
        return time.time() - owner.heartbeat <= stale_after
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    start, state = _pid_start(owner.pid)
    if state == "Z":
        return False
    return not (owner.pid_start is not None and start is not None and start != owner.pid_start)


def read_owner(path: AnyPath) -> Owner | None:
    """The owner recorded in a lease object; None when there is none. Unreadable -> ValueError."""
    try:
        data = json.loads(as_path(path).read_bytes())
        return Owner(**{k: data[k] for k in Owner.__dataclass_fields__})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: unreadable lease ({error})") from error


def _encode(owner: Owner) -> bytes:
    return json.dumps(asdict(owner), sort_keys=True).encode()


class Lease:
    """An exclusive lease at ``path``; use ``acquire`` / ``release`` or a ``with`` block.

    While held, a daemon thread refreshes the heartbeat every ``heartbeat_s`` seconds; if it finds
    the lease gone or owned by another token, ``lost`` becomes True and ``check`` raises.
    """

    def __init__(self, path: AnyPath, purpose: str, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after: float = STALE_AFTER_S) -> None:
        self.path = as_path(path)
        self.purpose = purpose
        self.heartbeat_s = heartbeat_s
        self.stale_after = stale_after
        self.owner: Owner | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def try_acquire(self) -> Owner | None:
        """Take the lease if free or stale; -> None when taken, else the live owner holding it."""
        for _ in range(100):  # each pass either takes the lease, meets a live owner or breaks one
            mine = this_process(self.purpose)
            if create_exclusive(self.path, _encode(mine)):
                self.owner, self.lost = mine, False
                self._start_heartbeat()
                return None
            try:
                other = read_owner(self.path)
            except ValueError:
                other = None  # written by something else; judged by its age below
                if time.time() - self._mtime(self.path) <= self.stale_after:
                    return Owner("?", "?", -1, None, "unreadable lease", self._mtime(self.path),
                                 self._mtime(self.path))
            if other is not None and owner_alive(other, self.stale_after):
                return other
            self._break(other)
        raise RuntimeError(f"{self.path}: could not take the lease (it keeps changing hands)")

    def acquire(self, wait_s: float = 0.0, poll_s: float = 0.5, what: str | None = None) -> Lease:
        """Take the lease, waiting up to ``wait_s`` seconds for a live owner to release it.

        Raises ``LeaseHeldError`` naming ``what`` (default: the lease path) and the owner.
        """
        deadline = time.monotonic() + wait_s
        while True:
            other = self.try_acquire()
            if other is None:
                return self
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait_s:.0f} s" if wait_s > 0 else ""
                raise LeaseHeldError(f"{what or self.path} is held by {other.describe()}{waited}", other)
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    def check(self) -> None:
        """Raise ``LeaseLostError`` unless the lease object still names us."""
        try:
            current = read_owner(self.path)
        except ValueError:
            current = None
        if self.owner is None or current is None or current.token != self.owner.token:
            self.lost = True
        if self.lost:
            holder = current.describe() if current else "nobody"
            raise LeaseLostError(f"{self.path}: lease lost (now held by {holder})")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease object if it still names us."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.owner is None:
            return
        try:
            current = read_owner(self.path)
        except ValueError:
            current = None
        if current is not None and current.token == self.owner.token:
            self.path.unlink(missing_ok=True)
        self.owner = None

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _mtime(path: AnyPath) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    def _break(self, seen: Owner | None) -> None:
        """Delete the stale lease ``seen`` unless it changed meanwhile (under ``<name>.break``)."""
        guard = self.path.with_name(self.path.name + ".break")
        if not create_exclusive(guard, _encode(this_process(f"break {self.path.name}"))):
            try:
                breaker = read_owner(guard)
            except ValueError:
                breaker = None
            if breaker is None or time.time() - breaker.started > BREAK_STALE_S \
                    or not owner_alive(breaker, BREAK_STALE_S):
                guard.unlink(missing_ok=True)  # left by a breaker that died
            else:
                time.sleep(0.05)
            return
        try:
            try:
                current = read_owner(self.path)
            except ValueError:
                current = None
            if (current is None and seen is None) or (current is not None and seen is not None
                                                      and current.token == seen.token):
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.path.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            owner = self.owner
            if owner is None:
                return
            try:
                current = read_owner(self.path)
            except ValueError:
                current = None
            if current is None or current.token != owner.token:
                self.lost = True
                return
            fresh = Owner(**{**asdict(owner), "heartbeat": time.time()})
            put_bytes(self.path, _encode(fresh))
            self.owner = fresh
