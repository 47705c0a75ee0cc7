"""A lazy, validated plugin registry over Python entry points.

Built-ins are declared in qubench's own pyproject under the same groups a third
party uses, so there is exactly one way in. Entry points are listed cheaply;
a plugin's module is imported only when that plugin is asked for (or when
`qubench list` describes everything). A plugin that fails to import is
reported as a warning naming its distribution and never takes the others down.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from qubench.errors import ConfigError, PluginLoadError
from qubench.plugin import Plugin

FAMILIES = {
    "methods": "qubench.methods",
    "quantizers": "qubench.quantizers",
    "tasks": "qubench.tasks",
    "engines": "qubench.engines",
}
#: Entry points named after a family, each a function name -> plugin class (or None when the name is
#: not of its form), for names that are built on demand rather than registered, e.g. the method
#: compositions "base+modifier" (qubench.methods.compose:resolve).
RESOLVER_GROUP = "qubench.resolvers"


class PluginImportWarning(UserWarning):
    """A third-party plugin could not be imported; the rest keep working."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    family: str
    package: str
    version: str
    description: str
    error: str | None = None


def _entry_points(family: str) -> dict[str, EntryPoint]:
    if family not in FAMILIES:
        raise ConfigError(f"unknown plugin family {family!r}; choose from {', '.join(FAMILIES)}")
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=FAMILIES[family]):
        # First registration wins: a duplicate name from another package would
        # otherwise silently shadow a built-in depending on install order.
        found.setdefault(ep.name, ep)
    return found


def names(family: str) -> list[str]:
    return sorted(_entry_points(family))


def _dist(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ("?", "?")
    return (dist.metadata["Name"], dist.version)


def _load(ep: EntryPoint, family: str) -> type[Plugin]:
    try:
        obj = ep.load()
    except Exception as exc:  # any import-time failure of third-party code
        package, version = _dist(ep)
        raise PluginLoadError(
            f"{family[:-1]} plugin {ep.name!r} from package {package} {version} failed to import "
            f"({ep.value}): {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, Plugin)):
        package, _ = _dist(ep)
        raise PluginLoadError(
            f"{family[:-1]} plugin {ep.name!r} from package {package} points at {ep.value}, "
            "which is not a qubench Plugin subclass"
        )
    return obj


def _resolve(family: str, name: str) -> type[Plugin] | None:
    for ep in entry_points(group=RESOLVER_GROUP, name=family):
        try:
            resolver = ep.load()
        except Exception as exc:  # a broken third-party resolver must not hide the registered plugins
            package, version = _dist(ep)
            warnings.warn(f"{family[:-1]} name resolver {ep.value} from package {package} {version} failed to "
                          f"import: {type(exc).__name__}: {exc}", PluginImportWarning, stacklevel=3)
            continue
        cls = resolver(name)
        if cls is not None:
            return cls
    return None


def get(family: str, name: str) -> type[Plugin]:
    """The plugin class registered as `name` (or built for it by a family's resolver), or an error that
    suggests the nearest names."""
    eps = _entry_points(family)
    if name not in eps and (built := _resolve(family, name)) is not None:
        return built
    if name not in eps:
        known = sorted(eps)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"unknown {family[:-1]} {name!r}.{hint} Available {family}: {', '.join(known) or '(none)'}"
        )
    return _load(eps[name], family)


def source(family: str, name: str) -> str | None:
    """'distribution version' of the package that registers `name` (for a plugin built by a resolver,
    that of the registered plugin it names as `provided_by`, e.g. a composition's base), or None for a
    name nothing registers."""
    ep = _entry_points(family).get(name)
    if ep is None:
        try:
            built = _resolve(family, name)
        except ConfigError:
            return None
        base = getattr(built, "provided_by", None)
        return source(family, base) if base and base != name else None
    package, version = _dist(ep)
    return f"{package} {version}"


def create(family: str, name: str, params: dict[str, Any] | None = None) -> Plugin:
    """Instantiate a plugin with validated parameters."""
    return get(family, name).from_params(params)


def describe(family: str) -> list[PluginInfo]:
    """Every registered plugin with its package and version; broken ones are
    listed with their error and raise a warning, never an exception."""
    infos = []
    for name, ep in sorted(_entry_points(family).items()):
        package, version = _dist(ep)
        try:
            cls = _load(ep, family)
        except PluginLoadError as exc:
            warnings.warn(str(exc), PluginImportWarning, stacklevel=2)
            infos.append(PluginInfo(name, family, package, version, "(failed to import)", str(exc)))
            continue
        infos.append(PluginInfo(name, family, package, version, cls.description))
    return infos
