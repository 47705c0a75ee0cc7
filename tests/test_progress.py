"""What a run says while it works: a start and an end line per stage (or that it was cached), plain
progress lines with an estimate off a terminal, and no other library's progress bars."""

from __future__ import annotations

import io
import types

import pytest

from qubench import progress
from qubench.quiet import QUIET_TQDM_PACKAGES, silence_library_bars
from qubench.stages.base import Stage


class Folder(Stage):
    description = "a folder for the progress tests"
    step = "prepare"
    group_shared = False

    def __init__(self, fail: bool = False):
        self.fail = fail

    def identity(self):
        return {"what": "folder"}

    def activity(self):
        return "writing a test folder"

    def build(self, tmp):
        if self.fail:
            raise RuntimeError("disk full")
        (tmp / "x").write_text("1")


Folder.kind = "test_progress_folder"  # set after the class, so it is not registered as a cache kind


def test_every_stage_logs_its_start_and_end_or_that_it_was_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path))
    lines = []
    with progress.reporting(lines.append):
        with pytest.raises(RuntimeError):
            Folder(fail=True).get()
        Folder().get()
        Folder().get()
    assert lines[0] == "writing a test folder ..."
    assert lines[1].startswith("writing a test folder: failed after ") and lines[1].endswith(" s")
    assert lines[2] == "writing a test folder ..."
    assert lines[3].startswith("writing a test folder: done in ")
    assert lines[4] == "writing a test folder: cached"
    assert len(lines) == 5
    lines.clear()
    Folder().get()  # outside a run: library use stays silent
    assert lines == []


def test_run_stages_name_what_they_build():
    from qubench.specs import PluginRef, RunSpec
    from qubench.stages.run import RunStages

    spec = RunSpec(task=PluginRef(name="synth-news", params={"size": "micro"}), method=PluginRef(name="ga"))
    stages = RunStages(spec)
    assert stages.task_data().activity() == "preparing task data (synth-news)"
    assert stages.models(data=None).activity() == "preparing target and retrain models (trained here for synth-news)"


def test_off_a_terminal_a_loop_logs_plain_lines_with_the_time_left(monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    lines = []
    with progress.reporting(lines.append):
        with progress.Steps("training target model", 4, terminal=False) as steps:
            for i in range(4):
                steps.advance(1, f"loss {i}.0")
    # every step but the last (the stage's own end line says when it is done)
    assert [line.split(" steps")[0] for line in lines] == [f"  training target model: {i}/4" for i in (1, 2, 3)]
    assert all(", about " in line and " left, loss " in line for line in lines)
    assert lines[0].endswith("loss 0.0")


def test_plain_lines_are_rate_limited_and_off_when_progress_is(monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "3600")
    lines = []
    with progress.reporting(lines.append):
        with progress.Steps("unlearning", 50, terminal=False) as steps:
            for _ in range(50):
                steps.advance()
        with progress.Steps("unlearning", 50, enabled=False, terminal=False) as steps:
            steps.advance()
    assert lines == []


@pytest.mark.parametrize("seconds, text", [(4.25, "4.2 s"), (65, "1 min 05 s"), (7260, "2 h 01 min")])
def test_durations_read_as_a_person_would_write_them(seconds, text):
    assert progress.duration(seconds) == text


def _bars_drawn_by(module_name: str) -> str:
    """Draw tqdm bars the ways libraries do (explicit disable=False, tqdm.auto, disable given positionally)
    from code that claims to be `module_name`, and return what reached the stream."""
    silence_library_bars()
    stream = io.StringIO()
    module = types.ModuleType(module_name)
    exec("from tqdm import tqdm\nfrom tqdm.auto import tqdm as auto_tqdm\n"
         "def draw(stream):\n"
         "    list(tqdm(range(3), desc='Applying quantization config', file=stream, disable=False))\n"
         "    list(auto_tqdm(range(3), file=stream))\n"
         "    list(tqdm(range(3), None, None, True, stream, None, 0.1, 10.0, None, None, False))\n",
         module.__dict__)
    module.draw(stream)
    return stream.getvalue()


@pytest.mark.parametrize("package", QUIET_TQDM_PACKAGES)
def test_tqdm_bars_of_the_quieted_libraries_are_never_drawn(package):
    assert _bars_drawn_by(f"{package}.some.module") == ""


def test_tqdm_bars_of_other_code_still_draw():
    drawn = _bars_drawn_by("huggingface_hub.file_download")  # hub downloads keep their own switch
    assert "Applying quantization config" in drawn and "3/3" in drawn
