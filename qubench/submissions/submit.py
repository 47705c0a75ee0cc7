"""`qubench submit`: run the standard grid for a third-party method and write `submissions/<name>/`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from qubench import registry
from qubench.env import git_state, library_versions
from qubench.errors import ConfigError
from qubench.submissions import integrity, schema

Log = Callable[[str], None]
#: Grid options a submission may set on top of its preset (build_spec keyword arguments).
OVERRIDES = ("seeds", "task_params", "quant_params", "eval_limit")


def method_entry_point(name: str) -> EntryPoint:
    """The `qubench.methods` entry point registered as `name` (first registration wins, as in the registry)."""
    if "+" in name:
        raise ConfigError(f"{name!r} is a composition of built-in parts; submit a method its own package registers")
    found = [ep for ep in entry_points(group=registry.FAMILIES["methods"]) if ep.name == name]
    if not found:
        registry.get("methods", name)  # raises with the nearest names
        raise ConfigError(f"method {name!r} is not registered through an entry point")
    return found[0]


def distribution_of(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        raise ConfigError(f"cannot tell which installed package registers method {ep.name!r}")
    return dist.metadata["Name"], dist.version


def standard_grid(preset: str, method: str, params: dict[str, Any], overrides: dict[str, Any] | None = None,
                  spec_file: Path | None = None):
    """The grid a submission runs: the preset's (or the spec file's) tasks, quantizers and seeds,
    with the submitted method as the only method."""
    from qubench.grid.spec import build_spec

    unknown = set(overrides or {}) - set(OVERRIDES)
    if unknown:
        raise ConfigError(f"unknown grid overrides {sorted(unknown)}; allowed: {', '.join(OVERRIDES)}")
    return build_spec(spec_file, None if spec_file is not None else preset, methods=(method,),
                      method_params=params or None, **(overrides or {}))


@dataclass
class Submitted:
    folder: Path
    submission: schema.Submission
    cells: int
    failed: list[str]


def submit(method: str, params: dict[str, Any], out_root: Path, *, name: str | None = None,
           preset: str = "default", spec_file: Path | None = None, overrides: dict[str, Any] | None = None,
           authors: list[str] | None = None, license_: str | None = None, source: str | None = None,
           workers: int = 1, device: str = "auto", log: Log = lambda msg: None) -> Submitted:
    from qubench.grid import runner

    ep = method_entry_point(method)
    package, version = distribution_of(ep)
    if package.lower() == "qubench":
        raise ConfigError(f"{method!r} is built into qubench and is in the reference grid already; "
                          "a submission is a method from another package")
    registry.create("methods", method, params)  # invalid parameters fail before any work
    overrides = {k: v for k, v in (overrides or {}).items() if v not in (None, {}, ())}
    grid = standard_grid(preset, method, params, overrides, spec_file)
    meta = ep.dist.metadata
    name = name or package.lower().replace("_", "-")
    folder = Path(out_root) / name
    existing = folder / schema.SUBMISSION_FILE
    if existing.exists():
        try:
            previous = schema.load_submission(folder)
        except ValueError:
            previous = None
        if previous is None or previous.package.name != package or previous.method.name != method:
            raise ConfigError(f"{existing} exists and belongs to another submission; choose another --name")
    authors = list(authors or []) or [a for a in (meta.get("Author"), meta.get("Author-email")) if a]
    license_ = license_ or meta.get("License") or meta.get("License-Expression")
    if not authors:
        raise ConfigError("give --author (the package metadata names no author)")
    if not license_:
        raise ConfigError("give --license (the package metadata names no licence)")

    results_dir = folder / schema.RESULTS_DIR
    log(f"running {len(grid.tasks) * len(grid.quantizers) * len(grid.seeds)} cells for {method} "
        f"({package} {version}) into {results_dir}")
    report = runner.run_grid(grid, runner.GridOptions(results_dir, workers=workers, verbose=False, device=device),
                             log)
    git = git_state()
    sub = schema.Submission(
        name=name, description=meta.get("Summary") or "", authors=authors, license=license_,
        package=schema.Package(name=package, version=version, source=source or f"{package}=={version}"),
        method=schema.Method(name=method, entry_point=ep.value, params=params),
        preset=schema.Preset(name="custom" if spec_file is not None else preset, overrides=overrides,
                             grid=grid.model_dump(mode="json")),
        produced_by=schema.Producer(qubench_version=library_versions().get("qubench"),
                                    git_commit=git.get("commit"), git_dirty=git.get("dirty")),
        results_sha256=integrity.folder_digests(results_dir),
    )
    schema.dump_yaml(sub, folder / schema.SUBMISSION_FILE)
    return Submitted(folder, sub, report.cells, [o.cell_id for o in report.failed])
