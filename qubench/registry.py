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


def get(family: str, name: str) -> type[Plugin]:
    """The plugin class registered as `name`, or an error that suggests the nearest names."""
    if family == "methods" and "+" in name:  # "base+modifier+...": built on demand, not registered
        from qubench.methods.compose import compose

        return compose(name)
    eps = _entry_points(family)
    if name not in eps:
        known = sorted(eps)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"unknown {family[:-1]} {name!r}.{hint} Available {family}: {', '.join(known) or '(none)'}"
        )
    return _load(eps[name], family)


def source(family: str, name: str) -> str | None:
    """'distribution version' of the package that registers `name` (for a composition, its base's:
    the modifiers are qubench's own), or None for a name nothing registers."""
    if family == "methods" and "+" in name:
        name = name.split("+")[0].strip()
    ep = _entry_points(family).get(name)
    if ep is None:
        return None
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
