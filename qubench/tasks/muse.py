"""`muse-news` and `muse-books`: the real MUSE benchmark (Shi et al., 2024).

Data from the hub dataset (`muse-bench/MUSE-News`, `muse-bench/MUSE-Books`) or a
local folder in MUSE's GitHub layout (`--task-param source=PATH`). Models are
MUSE's own 7B target and retrain checkpoints by hub ID unless `--model` /
`--retrain-model` give others; nothing is trained here. Without a retrain model,
PrivLeak uses MUSE's published AUC_retrain for the corpus (the result says which).
"""

from __future__ import annotations

from pathlib import Path

from qubench.plugin import PluginConfig
from qubench.tasks.base import Task
from qubench.tasks.muse_source import folder_fingerprint, read_muse, write_layout


class MuseConfig(PluginConfig):
    #: Hub dataset ID, local dataset snapshot, or folder in MUSE's GitHub layout.
    source: str = ""
    #: Hub revision (commit or tag) to pin; ignored for local folders.
    revision: str | None = None


class MuseTask(Task):
    default_source = ""

    class Config(MuseConfig):
        pass

    def __init__(self, config=None):
        super().__init__(config)
        if not self.config.source:
            self.config = self.config.model_copy(update={"source": self.default_source})

    def source_fingerprint(self) -> str | None:
        path = Path(self.config.source).expanduser()
        return folder_fingerprint(path) if path.is_dir() else None

    def materialize(self, out_dir: Path) -> None:
        write_layout(read_muse(self.config.source, self.config.revision), out_dir)


class MuseNews(MuseTask):
    name = "muse-news"
    description = ("MUSE-News (BBC news): hub muse-bench/MUSE-News or a local MUSE folder; "
                   "MUSE's 7B target/retrain models by hub ID")
    default_source = "muse-bench/MUSE-News"
    default_target = "muse-bench/MUSE-News_target"
    default_retrain = "muse-bench/MUSE-news_retrain"
    published_auc_retrain = 0.4772


class MuseBooks(MuseTask):
    name = "muse-books"
    description = ("MUSE-Books (Harry Potter): hub muse-bench/MUSE-Books or a local MUSE folder; "
                   "MUSE's 7B target/retrain models by hub ID")
    default_source = "muse-bench/MUSE-Books"
    default_target = "muse-bench/MUSE-Books_target"
    default_retrain = "muse-bench/MUSE-books_retrain"
    published_auc_retrain = 0.5393
