"""The qubench leaderboard (Streamlit). Start it with `qubench leaderboard [--results DIR]`, or:

    streamlit run leaderboard/app.py -- --results DIR [--results DIR2] [--submissions DIR]

Without arguments it shows the reference grid shipped in leaderboard/reference/ and every folder
in submissions/. It reads result files only: no submission code is imported or run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qubench.leaderboard.page import main

REPO = Path(__file__).resolve().parents[1]
# Set by tests (streamlit's AppTest cannot pass script arguments); flags win over them.
RESULTS_ENV, SUBMISSIONS_ENV = "QUBENCH_LEADERBOARD_RESULTS", "QUBENCH_LEADERBOARD_SUBMISSIONS"
VERIFICATIONS_ENV = "QUBENCH_LEADERBOARD_VERIFICATIONS"


def _arguments() -> tuple[list[Path], Path | None, Path | None]:
    parser = argparse.ArgumentParser(prog="leaderboard/app.py", add_help=False)
    parser.add_argument("--results", action="append", type=Path)
    parser.add_argument("--submissions", type=Path)
    parser.add_argument("--verifications", type=Path)
    parser.add_argument("--no-submissions", action="store_true")
    args, _ = parser.parse_known_args(sys.argv[1:])
    results = args.results or [Path(p) for p in os.environ.get(RESULTS_ENV, "").split(os.pathsep) if p] \
        or [REPO / "leaderboard" / "reference"]
    submissions = None if args.no_submissions else (
        args.submissions or Path(os.environ.get(SUBMISSIONS_ENV) or REPO / "submissions"))
    # The maintainers' verification records: the only place a verified badge can come from.
    verifications = args.verifications or Path(os.environ.get(VERIFICATIONS_ENV) or REPO / "leaderboard" / "verifications")
    return results, submissions, verifications


main(*_arguments())
