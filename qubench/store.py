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

Nothing read back is trusted: every artifact carries a manifest of what its
build wrote (`qubench.manifest`), checked whenever it is reused. A damaged
artifact is rebuilt with a warning, or, with `--no-rebuild`
($QUBENCH_NO_REBUILD), stops the run with the file named. Inside `rebuilding()`
(`qubench run --force`) every artifact asked for is built anew, once, and
replaces the cached one atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from platformdirs import user_cache_dir

from qubench.errors import CacheError

#: Set (to 1) by `--no-rebuild`: a damaged cached artifact stops the run instead of being rebuilt.
NO_REBUILD_ENV = "QUBENCH_NO_REBUILD"
log = logging.getLogger("qubench.cache")
#: Inside `rebuilding()`: the artifacts already rebuilt in it (each is rebuilt once).
_rebuilt: ContextVar[set[Path] | None] = ContextVar("qubench_rebuilt", default=None)


def home_path() -> Path:
    """QUBENCH_HOME (default under the user's cache directory), without creating it."""
    return Path(os.environ.get("QUBENCH_HOME") or user_cache_dir("qubench"))


def home() -> Path:
    """QUBENCH_HOME, created if needed."""
    path = home_path()
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


@contextmanager
def rebuilding() -> Iterator[None]:
    """Every artifact asked for inside is built anew (once) and replaces the cached one: `--force`."""
    token = _rebuilt.set(set())
    try:
        yield
    finally:
        _rebuilt.reset(token)


def no_rebuild() -> bool:
    return os.environ.get(NO_REBUILD_ENV, "").strip().lower() in ("1", "true", "yes")


def _forced(path: Path) -> bool:
    done = _rebuilt.get()
    return done is not None and path not in done


def _exists(path: Path, is_file: bool) -> bool:
    return path.is_file() if is_file else path.is_dir()


def reusable(path: Path, is_file: bool) -> bool:
    """Cheap check without the lock: there, not to be forced, and intact as recorded."""
    from qubench import manifest

    return _exists(path, is_file) and not _forced(path) and manifest.has_manifest(path) \
        and manifest.check(path) is None


def _damage(path: Path) -> str | None:
    """Under the lock: what is wrong with an existing artifact (None: reuse it). An artifact without a
    manifest (built before manifests existed) gets one now if its files are readable."""
    from qubench import manifest

    problem = manifest.check(path)
    if problem is None and not manifest.has_manifest(path):
        manifest.write(manifest.record(path), manifest.manifest_path(path))
    return problem


def _cached(path: Path, build: Callable[[Path], Any], is_file: bool) -> Path:
    if reusable(path, is_file):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        if _exists(path, is_file):  # perhaps another process built it while this one waited
            if not _forced(path):
                problem = _damage(path)
                if problem is None:
                    return path
                if no_rebuild():
                    raise CacheError(f"cached artifact {path} is damaged: {problem}. Run again without --no-rebuild "
                                     f"to rebuild it, or delete it (rm -r {path})")
                log.warning("cached artifact %s is damaged (%s): rebuilding it", path, problem)
        remove_stale_temporaries(path.parent, path.name)  # a killed earlier build of the same artifact
        (_build_file if is_file else _build_dir)(path, build)
        done = _rebuilt.get()
        if done is not None:
            done.add(path)
    return path


def _build_dir(path: Path, build: Callable[[Path], Any]) -> None:
    from qubench import manifest

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_temp_tag()}.", dir=path.parent))
    try:
        build(tmp)
        record = manifest.record(tmp)
        manifest.write(record, tmp / manifest.MANIFEST_FILE)
        _replace(tmp, path)
        _remember(path, record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_file(path: Path, build: Callable[[Path], Any]) -> None:
    from qubench import manifest

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_temp_tag()}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        build(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide a shared cache from its other users
        record = manifest.record(Path(tmp), path.name)
        manifest.write(record, manifest.sidecar(path))  # before the file: a reader never sees it unrecorded
        os.replace(tmp, path)
        _remember(path, record)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _replace(tmp: Path, path: Path) -> None:
    """Rename the built folder into place; an existing (damaged or forced) one is moved aside first and
    removed after, so the name never points at a half-built folder."""
    doomed = None
    if path.is_dir():
        doomed = path.parent / f".{path.name}.{_temp_tag()}.replaced"
        os.rename(path, doomed)
    try:
        os.rename(tmp, path)
    finally:
        if doomed is not None:
            shutil.rmtree(doomed, ignore_errors=True)


def _remember(path: Path, record: dict) -> None:
    """Seed the digest memo with what the build just hashed, so the first check reads nothing again."""
    from qubench import fingerprint, manifest

    files = manifest.artifact_files(path)
    for rel, entry in record["files"].items():
        if rel in files:
            fingerprint.remember(files[rel], entry["sha256"])


def cached_dir(path: Path, build: Callable[[Path], Any]) -> Path:
    """Return `path`, building it with `build(tmp_dir)` first if it is not there yet (or is damaged)."""
    return _cached(path, build, is_file=False)


def cached_file(path: Path, build: Callable[[Path], Any]) -> Path:
    """Return the file `path`, writing it with `build(tmp_file)` first if it is not there yet (or is
    damaged): `build` writes a temporary file beside it, which is renamed into place only once complete."""
    return _cached(path, build, is_file=True)


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
        if doomed.is_file():
            from qubench import manifest

            manifest.sidecar(path).unlink(missing_ok=True)
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


def read_json(path: Path, *fields: str) -> Any:
    """A cached JSON artifact, or the value at `fields` inside it; a CacheError naming the file (and the
    field) when it cannot be read, never a bare JSONDecodeError or KeyError."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheError(f"cannot read {path}: {type(exc).__name__}: {exc}; delete it, or run with --force to "
                         "rebuild it") from None
    for i, field in enumerate(fields):
        if not isinstance(value, dict) or field not in value:
            raise CacheError(f"{path} has no field {'.'.join(fields[:i + 1])!r}; delete it, or run with --force to "
                             "rebuild it")
        value = value[field]
    return value


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
