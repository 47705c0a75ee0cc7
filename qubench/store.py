"""The on-disk cache (QUBENCH_HOME) and atomic writes.

Every stage output lives in a folder named by a hash of everything that
determines it, so identical work is done once and reused across runs. A
folder is built under a temporary name and renamed into place in one step:
a half-written artifact is never visible under its final name, so an
interrupted run can never be read back as complete.

Parallel workers (`qubench grid --workers N`, Ray) that need the same
artifact serialise on a per-artifact OS file lock: one builds it, the others
wait and reuse it. The kernel releases such a lock when its holder dies, even
by SIGKILL, so a killed build never blocks the next one. Temporary folders
carry the builder's host and PID, so leftovers of a dead builder are
recognised and removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from platformdirs import user_cache_dir


def home() -> Path:
    """QUBENCH_HOME, default under the user's cache directory."""
    path = Path(os.environ.get("QUBENCH_HOME") or user_cache_dir("qubench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(obj: Any, length: int = 16) -> str:
    """A hash of a JSON-able object that does not depend on key order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


#: Where the lock files of a folder's artifacts live (hidden, so listings of artifacts skip it).
LOCK_DIR = ".locks"
_TEMP_TAG = re.compile(r"\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.")


def _temp_tag() -> str:
    """Marks a temporary build with its owner, so leftovers of a dead process can be recognised."""
    return f"tmp-{stable_hash(socket.gethostname(), 8)}-{os.getpid()}"


def is_stale_temporary(path: Path) -> bool:
    """A temporary build or write of a process of this host that is no longer running."""
    match = _TEMP_TAG.search(path.name)
    if not path.name.startswith(".") or match is None or match["host"] != stable_hash(socket.gethostname(), 8):
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


@contextmanager
def locked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold the lock of artifact `path`; yields False (without the lock) if not `blocking` and it is taken."""
    from filelock import FileLock, Timeout

    lock_dir = path.parent / LOCK_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_dir / f"{path.name}.lock", blocking=blocking)
    try:
        lock.acquire()
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def remove_stale_temporaries(parent: Path, name: str | None = None) -> list[Path]:
    """Delete what dead builders left in `parent` (only temporaries of `name`, if given)."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.glob(f".{name}.*" if name else ".*"):
        if is_stale_temporary(p):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def cached_dir(path: Path, build: Callable[[Path], Any]) -> Path:
    """Return `path`, building it with `build(tmp_dir)` first if it does not exist yet."""
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        if path.is_dir():  # another process built it while this one waited
            return path
        remove_stale_temporaries(path.parent, path.name)  # a killed earlier build of the same artifact
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_temp_tag()}.", dir=path.parent))
        try:
            build(tmp)
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.is_dir():  # anything but "another process finished first"
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def cached_file(path: Path, build: Callable[[Path], Any]) -> Path:
    """Return the file `path`, writing it with `build(tmp_file)` first if it does not exist yet: `build`
    writes a temporary file beside it, which is renamed into place only once complete."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        if path.is_file():  # another process wrote it while this one waited
            return path
        remove_stale_temporaries(path.parent, path.name)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_temp_tag()}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        try:
            build(Path(tmp))
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide a shared cache from its other users
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


def remove_cached(path: Path, blocking: bool = True) -> bool:
    """Delete a cached artifact (folder or file) so that it is never seen half-deleted: it is first
    renamed to a temporary name under its lock, then removed. False if not `blocking` and in use."""
    with locked(path, blocking=blocking) as got:
        if not got:
            return False
        if not path.exists():
            return True
        doomed = path.parent / f".{path.name}.{_temp_tag()}.deleting"
        os.rename(path, doomed)
    shutil.rmtree(doomed) if doomed.is_dir() else doomed.unlink()
    return True


def _umask() -> int:
    try:  # Linux: read it without changing it (setting it, even briefly, races with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def dump_json(fh, obj: Any) -> None:
    """qubench's JSON file format (indented, key order kept, non-JSON values as strings)."""
    json.dump(obj, fh, indent=2, sort_keys=False, default=str)
    fh.write("\n")


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_temp_tag()}.", dir=path.parent)
    try:
        # mkstemp creates the file 0600; results are meant to be shared (a team's results folder,
        # a leaderboard served by another user), so give it the permissions open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            dump_json(fh, obj)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
