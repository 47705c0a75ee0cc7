"""How `qubench leaderboard` starts the page: `streamlit run leaderboard/app.py` of the checkout."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from qubench.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "leaderboard" / "app.py"


def streamlit_command(results: list[Path], submissions: Path | None, no_submissions: bool = False,
                      port: int = 8501, address: str = "127.0.0.1", verifications: Path | None = None) -> list[str]:
    if importlib.util.find_spec("streamlit") is None:
        raise ConfigError("the leaderboard needs Streamlit and Altair: pip install -e '.[leaderboard]'")
    if not APP.is_file():
        # The page, its reference grid (leaderboard/reference/) and submissions/ are the repository's,
        # not the package's: an installed wheel has none of them.
        raise ConfigError(
            f"{APP} not found: the leaderboard page, the reference grid it shows (leaderboard/reference/) and "
            "submissions/ ship with the qubench repository, not with the installed package. Clone the repository "
            "and run `qubench leaderboard` from there (pip install -e '.[leaderboard]')")
    for folder in results:
        if not Path(folder).is_dir():
            raise ConfigError(f"results folder {folder} does not exist")
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
           "--server.address", address, "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none",
           # Should anything unforeseen still raise, the browser gets its type, not a traceback with server paths.
           "--client.showErrorDetails", "type", "--"]
    for folder in results:
        cmd += ["--results", str(Path(folder).resolve())]
    if no_submissions:
        cmd.append("--no-submissions")
    elif submissions is not None:
        cmd += ["--submissions", str(Path(submissions).resolve())]
    if verifications is not None:
        cmd += ["--verifications", str(Path(verifications).resolve())]
    return cmd
