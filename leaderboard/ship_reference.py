"""Copy a finished grid's results into leaderboard/reference/ and write its MANIFEST.yaml, so that a
fresh clone's `qubench leaderboard` shows the project's own numbers.

    python leaderboard/ship_reference.py /path/to/grid-results \
        --command "qubench grid --preset default --seeds 1 --results /path/to/grid-results"

Copies grid.json, aggregate.json and every cells/*.json (failed cells too: the page lists them),
after checking each is a valid qubench result. The manifest records the command, the qubench
version and git commit that produced the results (read from the results themselves), the grid
spec, the cell counts and a sha256 of every copied file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import yaml

from qubench.submissions import integrity

REFERENCE = Path(__file__).resolve().parent / "reference"


def ship(source: Path, command: str, dest: Path = REFERENCE, allow_incomplete: bool = False) -> dict:
    source = Path(source)
    grid_file = source / "grid.json"
    if not grid_file.is_file():
        raise SystemExit(f"{source} has no grid.json: not the results folder of `qubench grid`")
    grid = json.loads(grid_file.read_text())
    files = integrity.result_files(source / "cells")
    results, bad = [], []
    for path in files:
        result, _, reason = integrity.read_result(path)
        (bad.append(f"{path.name}: {reason}") if reason else results.append(result))
    if bad:
        raise SystemExit("invalid result files, nothing copied:\n  " + "\n  ".join(bad))
    status = Counter(r.status for r in results)
    expected = len(grid.get("cells", []))
    if (status["ok"] < expected) and not allow_incomplete:
        raise SystemExit(f"only {status['ok']} of {expected} cells are ok ({status['failed']} failed, "
                         f"{expected - len(results)} missing); finish the grid or pass --allow-incomplete")
    producers = Counter((r.environment.get("libraries", {}).get("qubench"),
                         (r.environment.get("git") or {}).get("commit"),
                         (r.environment.get("git") or {}).get("dirty")) for r in results)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "cells").mkdir(parents=True)
    shutil.copy2(grid_file, dest / "grid.json")
    if (source / "aggregate.json").is_file():
        shutil.copy2(source / "aggregate.json", dest / "aggregate.json")
    for path in files:
        shutil.copy2(path, dest / "cells" / path.name)
    manifest = {
        "what": "the project's reference results of `qubench grid`, shown by `qubench leaderboard` by default",
        "command": command,
        "produced_by": [{"qubench_version": v, "git_commit": c, "git_dirty": d, "cells": n}
                        for (v, c, d), n in producers.most_common()],
        "cells": {"expected": expected, "ok": status["ok"], "failed": status["failed"],
                  "missing": expected - len(results)},
        "grid": grid.get("spec"),
        "shipped": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sha256": integrity.folder_digests(dest),
    }
    (dest / "MANIFEST.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="the --results folder of `qubench grid`")
    parser.add_argument("--command", required=True, help="the exact `qubench grid ...` command that produced it")
    parser.add_argument("--dest", type=Path, default=REFERENCE)
    parser.add_argument("--allow-incomplete", action="store_true", help="ship even if some cells are not ok")
    args = parser.parse_args(argv)
    manifest = ship(args.results, args.command, args.dest, args.allow_incomplete)
    cells = manifest["cells"]
    print(f"shipped {cells['ok']} ok + {cells['failed']} failed of {cells['expected']} cells to {args.dest}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
