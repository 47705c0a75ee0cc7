"""Reading files that anyone may have written: bounded before parsing, symlinks refused.

Result files, grid aggregates, submission and verification records reach qubench from other people
(pull requests, shared folders, downloads). A file must never be able to take down whoever reads it:
a 200 KB JSON of nested brackets exhausts Python's recursion limit inside `json.loads`, a YAML alias
bomb expands exponentially, a symlink makes a folder list a file that lives elsewhere. So every such
file is read here: its size is bounded, its nesting depth is measured on the raw text before any
parser builds a tree, and a symlink (the file itself, or a folder between the root and the file) is
refused. Every refusal is an `UntrustedFileError` (a ValueError) whose message is the reason, for
the caller to list next to the file; nothing here raises anything else for a bad file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

#: Deeper than any file qubench writes (a result nests about 8 levels), far below Python's recursion limit.
MAX_DEPTH = 64
#: YAML aliases qubench never writes many of; a file with more is an expansion bomb or not ours.
MAX_YAML_ALIASES = 50

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(rb"[\[\]{}]")


class UntrustedFileError(ValueError):
    """A file refused before or while parsing; str() is the reason, without the path."""


def _symlink_between(root: Path | None, path: Path) -> Path | None:
    """The first symlink among `path` and the folders between `root` (exclusive) and it."""
    if os.path.islink(path):
        return path
    if root is None:
        return None
    try:
        rel = path.relative_to(root)
    except ValueError:
        return None
    current = root
    for part in rel.parts[:-1]:
        current = current / part
        if os.path.islink(current):
            return current
    return None


def read_bytes(path: Path, max_bytes: int, root: Path | None = None) -> bytes:
    """The file's bytes, if it is a regular file (not a symlink, nor under a symlinked folder below
    `root`) of at most `max_bytes`."""
    path = Path(path)
    link = _symlink_between(Path(root) if root is not None else None, path)
    if link is not None:
        where = "the file" if link == path else f"its folder {link.name}"
        raise UntrustedFileError(f"symlink refused ({where} is a symbolic link; results must be plain files "
                                 "inside the folder)")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise UntrustedFileError(f"unreadable: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFileError("not a regular file")
        if st.st_size > max_bytes:
            raise UntrustedFileError(f"file is {st.st_size} bytes, more than the {max_bytes} allowed")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise UntrustedFileError(f"unreadable: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # grew while being read
        raise UntrustedFileError(f"file is more than the {max_bytes} bytes allowed")
    return data


def json_depth(data: bytes, limit: int = MAX_DEPTH) -> int:
    """The bracket nesting depth of JSON text, measured without parsing it (strings are skipped);
    stops counting once past `limit`."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub(b'""', data)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                break
        else:
            depth -= 1
    return deepest


def decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UntrustedFileError(f"unreadable: not UTF-8 text (byte {exc.start})") from None


def parse_json(data: bytes, max_depth: int = MAX_DEPTH) -> tuple[Any, str]:
    """(value, text) of JSON bytes whose nesting stays within `max_depth`."""
    depth = json_depth(data, max_depth)
    if depth > max_depth:
        raise UntrustedFileError(f"nested more than {max_depth} levels deep (qubench files nest a few levels): "
                                 "refused before parsing")
    text = decode(data)
    try:
        return json.loads(text), text
    except (ValueError, RecursionError) as exc:
        raise UntrustedFileError(f"not JSON: {exc}") from None


def read_json(path: Path, max_bytes: int, root: Path | None = None, max_depth: int = MAX_DEPTH) -> tuple[Any, str]:
    """(value, text) of a JSON file, bounded (see `read_bytes`, `parse_json`)."""
    return parse_json(read_bytes(path, max_bytes, root), max_depth)


def parse_yaml(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """YAML through the safe loader, after its events were walked once to bound depth and aliases."""
    import yaml

    depth, aliases = 0, 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > max_depth:
                    raise UntrustedFileError(f"nested more than {max_depth} levels deep: refused before parsing")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            elif isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > MAX_YAML_ALIASES:
                    raise UntrustedFileError(f"more than {MAX_YAML_ALIASES} YAML aliases: refused")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UntrustedFileError(f"not YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:  # pragma: no cover - the depth bound above comes first
        raise UntrustedFileError("nested too deeply") from None


def read_yaml(path: Path, max_bytes: int, root: Path | None = None, max_depth: int = MAX_DEPTH) -> Any:
    return parse_yaml(decode(read_bytes(path, max_bytes, root)), max_depth)


def walk(folder: Path) -> tuple[list[Path], list[Path]]:
    """(regular files, symlinks) under `folder`, sorted, never following a symlink; hidden names
    (locks, temporaries of an interrupted write) are left out."""
    files, links = [], []
    folder = Path(folder)
    for top, dirs, names in os.walk(folder, followlinks=False):
        top_path = Path(top)
        for d in list(dirs):
            if d.startswith("."):
                dirs.remove(d)
            elif os.path.islink(top_path / d):
                links.append(top_path / d)
        for name in names:
            if name.startswith("."):
                continue
            p = top_path / name
            (links if os.path.islink(p) else files).append(p)
    return sorted(files), sorted(links)
