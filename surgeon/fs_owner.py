"""Which process owns a temp directory, and whether that process is gone.

The owner is written into the directory's *name* (`<host><boot>-<pid>-<start>`), not into a
file inside it: when `--force` swaps a new output in with RENAME_EXCHANGE, the previous output
lands at the temp dir's path, and the record has to stay with that path, not with the contents.

A process is identified by its pid and its start time (field 22 of /proc/PID/stat, clock ticks
since boot), so a pid reused by another process does not keep a dead run's directory alive; the
boot id tells a pid from before a reboot. Temp dirs written from another host (a shared
filesystem) are never judged: their owner may be alive there. Without /proc (non-Linux) only
the pid is checked.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket

_TOKEN = re.compile(r"(?P<host>[0-9a-f]{8})(?P<boot>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)")
TOKEN_PATTERN = _TOKEN.pattern


def _hash8(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=1)
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3… of /proc/PID/stat (after the parenthesised command name), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _start_time(pid: int) -> str:
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else "0"  # field 22: starttime


def token(pid: int | None = None) -> str:
    """The owner record of process `pid` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return f"{_hash8(socket.gethostname())}{_hash8(_boot_id())}-{pid}-{_start_time(pid)}"


def is_gone(owner: str) -> bool:
    """True only when sure the process recorded in `owner` no longer runs on this host."""
    match = _TOKEN.fullmatch(owner)
    if match is None or match["host"] != _hash8(socket.gethostname()):
        return False
    if match["boot"] != _hash8(_boot_id()):
        return True  # recorded before this machine last booted
    pid = int(match["pid"])
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by another user
    fields = _stat_fields(pid)
    if fields is None:
        return False  # no /proc: the pid exists, which is all we can tell
    if fields[0] == "Z":
        return True  # killed, not yet reaped by its parent
    return match["start"] != "0" and fields[19] != match["start"]  # the pid now names another process
