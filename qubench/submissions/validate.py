"""`qubench validate submissions/<name>`: every problem of a submission folder, all at once.

Checks: the schema of submission.yaml; that the package installs (into a scratch folder) and its
entry point loads the declared method with the declared parameters (in a fresh interpreter); that
the grid is the preset's grid for this method; that every result file is a valid result whose
run_id is the hash of its spec, whose values lie in their metrics' ranges and whose spec is a cell
of the grid; that every cell has an ok result; that the files still match the digests recorded at
submit time; that nothing in the folder is a symlink; and that the folder makes no verification
claim (only the maintainers' `qubench verify` writes verification records, outside the folder).

It never falls over on a bad file: every file is read bounded (`qubench.untrusted`), and a check that
fails unexpectedly is itself listed as a problem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from qubench.errors import ConfigError
from qubench import untrusted
from qubench.submissions import integrity, schema
from qubench.submissions.install import install_into
from qubench.submissions.schema import Submission


def validate(folder: Path, install: bool = True) -> list[str]:
    folder = Path(folder)
    if not (folder / schema.SUBMISSION_FILE).is_file():
        return [f"{folder}: no {schema.SUBMISSION_FILE}"]
    try:
        sub = schema.load_submission(folder)
    except ValueError as exc:
        return str(exc).splitlines()  # without a valid schema nothing else can be checked
    problems = []
    if sub.name != folder.name:
        problems.append(f"{schema.SUBMISSION_FILE}: name {sub.name!r} differs from the folder name {folder.name!r}")
    problems += _guarded("the plugin", check_plugin, folder, sub, install)
    grid, grid_problems = None, []
    try:
        grid, grid_problems = check_grid(sub)
    except Exception as exc:  # noqa: BLE001 - validate lists problems, it does not crash
        grid_problems = [f"the grid could not be checked: {type(exc).__name__}: {exc}"]
    problems += grid_problems
    if grid is not None:
        problems += _guarded("the results", check_results, folder, grid)
    problems += _guarded("the digests", check_digests, folder, sub)
    problems += _guarded("symlinks", check_symlinks, folder)
    problems += _guarded("verification claims", check_no_verification_claims, folder)
    return problems


def _guarded(what: str, check, *args) -> list[str]:
    try:
        return check(*args)
    except Exception as exc:  # noqa: BLE001 - untrusted input: one broken check is one problem line
        return [f"{what} could not be checked: {type(exc).__name__}: {exc}"]


def check_plugin(folder: Path, sub: Submission, install: bool) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="qubench-validate-") as scratch:
        env = dict(os.environ)
        if install:
            try:
                install_into(folder, sub, Path(scratch))
            except ConfigError as exc:
                return [str(exc)]
            env["PYTHONPATH"] = os.pathsep.join(p for p in (scratch, env.get("PYTHONPATH")) if p)
        try:
            done = subprocess.run([sys.executable, "-m", "qubench.submissions.probe", sub.method.name,
                                   json.dumps(sub.method.params)], capture_output=True, text=True, env=env,
                                  timeout=300)
            found = json.loads(done.stdout.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
            return [f"the plugin could not be probed: {type(exc).__name__}: {exc}"]
    where = "after installing it" if install else "in this environment"
    if not found["found"]:
        return [f"no `qubench.methods` entry point named {sub.method.name!r} {where}"]
    problems = []
    if found.get("package") != sub.package.name or found.get("version") != sub.package.version:
        problems.append(f"method {sub.method.name!r} comes from {found.get('package')} {found.get('version')} "
                        f"{where}, not from the declared {sub.package.name} {sub.package.version}")
    if found.get("entry_point") != sub.method.entry_point:
        problems.append(f"entry point {sub.method.name!r} points at {found.get('entry_point')!r}, "
                        f"not the declared {sub.method.entry_point!r}")
    if not found["loaded"]:
        problems.append(f"the method does not load with the declared parameters: {found.get('error')}")
    return problems


def check_grid(sub: Submission):
    """The submission's grid, parsed, and how it departs from its preset."""
    from qubench.grid.spec import PRESETS, Entry, parse_spec
    from qubench.submissions.submit import standard_grid

    try:
        grid = parse_spec(sub.preset.grid, f"{schema.SUBMISSION_FILE} preset.grid")
    except ConfigError as exc:
        return None, str(exc).splitlines()
    problems = []
    if grid.methods != [Entry(name=sub.method.name, params=sub.method.params)]:
        problems.append(f"preset.grid: its methods must be exactly the submitted method {sub.method.name!r} with "
                        f"the submitted parameters, found {[m.model_dump() for m in grid.methods]}")
    if sub.preset.name in PRESETS:
        try:
            expected = standard_grid(sub.preset.name, sub.method.name, sub.method.params, sub.preset.overrides)
        except ConfigError as exc:
            problems.append(f"preset {sub.preset.name!r} with overrides {sub.preset.overrides}: {exc}")
        else:
            a, b = expected.model_dump(mode="json"), grid.model_dump(mode="json")
            differ = [k for k in a if k != "notes" and a[k] != b.get(k)]
            if differ:
                problems.append(f"preset.grid differs from preset {sub.preset.name!r} (as built here) in: "
                                f"{', '.join(differ)}; e.g. {differ[0]}: here {a[differ[0]]}, "
                                f"submitted {b.get(differ[0])}")
    elif sub.preset.name != "custom":
        problems.append(f"preset.name {sub.preset.name!r} is neither a built-in preset ({', '.join(PRESETS)}) "
                        "nor 'custom'")
    return grid, problems


def check_results(folder: Path, grid) -> list[str]:
    from qubench.grid.plan import all_cells, cells_dir, expand

    results_dir = folder / schema.RESULTS_DIR
    cells = {cell.spec.run_id(): cell for cell in all_cells(expand(grid))}
    problems, ok = [], {}
    for path in integrity.result_files(results_dir):
        rel = f"{schema.RESULTS_DIR}/{path.relative_to(results_dir).as_posix()}"
        result, _, reason = integrity.read_result(path, results_dir)
        if reason is not None:
            problems.append(f"{rel}: {reason}")
            continue
        cell = cells.get(result.run_id)
        if cell is None:
            problems.append(f"{rel}: its spec is not a cell of the submission's grid")
            continue
        if path != cell.result_file(results_dir):
            problems.append(f"{rel}: should be {cell.result_file(results_dir).relative_to(folder)} "
                            f"(results live under {cells_dir(Path(schema.RESULTS_DIR))}/, named by their spec)")
        if result.status != "ok":
            err = result.error
            problems.append(f"{rel}: the run failed" + (f" in stage {err.stage}: {err.type}: {err.message}" if err else ""))
            continue
        ok[result.run_id] = rel
    missing = [cell.id for run_id, cell in cells.items() if run_id not in ok]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        problems.append(f"grid incomplete: {len(missing)} of {len(cells)} cells have no ok result: {shown}")
    return problems


def check_digests(folder: Path, sub: Submission) -> list[str]:
    current = integrity.folder_digests(folder / schema.RESULTS_DIR)
    recorded = sub.results_sha256
    problems = []
    for rel in sorted(set(current) | set(recorded)):
        where = f"{schema.RESULTS_DIR}/{rel}"
        if rel not in recorded:
            problems.append(f"{where}: not in results_sha256 of {schema.SUBMISSION_FILE} (added after submitting?)")
        elif rel not in current:
            problems.append(f"{where}: listed in results_sha256 but missing")
        elif current[rel] != recorded[rel]:
            problems.append(f"{where}: content differs from the sha256 recorded at submit time (edited after "
                            "submitting?)")
    return problems


def check_symlinks(folder: Path) -> list[str]:
    return [f"{p.relative_to(folder).as_posix()}: symlink refused (a submission holds plain files only)"
            for p in integrity.symlinks(folder)]


#: Names a verification claim could take; none belongs in a submission folder.
_CLAIM_SUFFIXES = (".yaml", ".yml", ".json")


def check_no_verification_claims(folder: Path) -> list[str]:
    """A submission cannot verify itself: verification records are written by the maintainers'
    `qubench verify` into leaderboard/verifications/, so any verification file here is refused."""
    files, _ = untrusted.walk(folder)
    claims = [p for p in files if p.name.lower().startswith(("verification", "verified"))
              and p.suffix.lower() in _CLAIM_SUFFIXES]
    return [f"{p.relative_to(folder).as_posix()}: a submission folder cannot carry verification claims; "
            f"verification records are written by the maintainers' `qubench verify` into "
            f"{schema.VERIFICATIONS_DIR}/ — delete this file" for p in claims]
