"""MUSE tasks: one loader for the GitHub layout and for hub datasets (read through `datasets`
from a local snapshot here), the real MUSE-News files, and the muse-news-mini replica."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qubench import registry
from qubench.errors import ConfigError, DataError
from qubench.tasks import muse_layout
from qubench.tasks.muse_source import HUB_LAYOUT, read_muse, write_layout

from test_metrics import load_task_utils

ROWS = {
    "raw/forget.txt": ["Forget article one.", "Forget article two."],
    "raw/retain1.txt": ["Retain article one."],
    "raw/retain2.txt": ["Retain article two."],
    "raw/holdout.txt": ["Holdout article."],
    "verbmem/forget.json": [{"prompt": "Forget article", "gt": " one."}],
    "knowmem/forget_qa.json": [{"question": "Which article?", "answer": "one"}],
    "knowmem/retain_qa.json": [{"question": "Which retain?", "answer": "two"}],
    "knowmem/forget_qa_icl.json": [{"question": "Q?", "answer": "A"}],
    "knowmem/retain_qa_icl.json": [{"question": "R?", "answer": "B"}],
    "privleak/forget.json": ["Forget article one."],
    "privleak/retain.json": ["Retain article one."],
    "privleak/holdout.json": ["Holdout article."],
}


def write_github_layout(root: Path) -> Path:
    for rel, rows in ROWS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        text = "\n\n\n".join(rows) if rel.endswith(".txt") else json.dumps(rows)
        (root / rel).write_text(text, encoding="utf-8")
    return root


def write_hub_snapshot(root: Path) -> Path:
    """The hub repo's own layout: parquet per (config, split) and a README declaring the configs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    card = ["---", "configs:"]
    for config, splits in HUB_LAYOUT.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, rel in splits.items():
            rows = ROWS[rel]
            table = pa.Table.from_pylist([{"text": r} for r in rows] if isinstance(rows[0], str) else rows)
            path = root / config / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
            card += [f"  - split: {split}", f"    path: {config}/{split}-*.parquet"]
    (root / "README.md").write_text("\n".join(card + ["---", ""]), encoding="utf-8")
    return root


def test_github_layout_and_hub_dataset_give_the_same_task_folder(tmp_path):
    github = read_muse(str(write_github_layout(tmp_path / "gh")))
    hub = read_muse(str(write_hub_snapshot(tmp_path / "hub")))
    assert github.files == hub.files == ROWS
    write_layout(hub, tmp_path / "out")
    data = muse_layout.load(tmp_path / "out")
    assert data.forget == ["Forget article one.", "Forget article two."]
    assert data.retain == ["Retain article one.", "Retain article two."]  # retain1 + retain2
    assert data.verbmem_forget[0].prompt == "Forget article" and data.knowmem_retain[0].answer == "two"


def test_bad_sources_fail_with_what_to_pass(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="neither an existing folder nor a hub dataset ID"):
        read_muse("./no/such/muse")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        read_muse(str(tmp_path / "file.txt"))
    root = write_github_layout(tmp_path / "gh")
    (root / "knowmem/retain_qa.json").unlink()
    with pytest.raises(DataError, match="lacks knowmem/retain_qa.json"):
        read_muse(str(root))
    (root / "verbmem/forget.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_muse(str(root))


def test_hub_dataset_without_hub_access_says_to_pass_a_folder(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="--task-param source=/path/to/muse"):
        read_muse("muse-bench/MUSE-News")


def test_muse_tasks_name_muse_models_and_published_auc():
    news, books = registry.create("tasks", "muse-news"), registry.create("tasks", "muse-books")
    assert news.config.source == "muse-bench/MUSE-News" and books.config.source == "muse-bench/MUSE-Books"
    assert news.default_target == "muse-bench/MUSE-News_target"
    assert news.published_auc_retrain == 0.4772 and books.published_auc_retrain == 0.5393
    with pytest.raises(ConfigError, match="sorce"):
        registry.create("tasks", "muse-news", {"sorce": "x"})


def test_run_without_retrain_model_uses_the_published_auc(tiny_model_dir, tmp_path, monkeypatch):
    """--model without --retrain-model on a MUSE task: PrivLeak against MUSE's AUC_retrain, said in the result."""
    from click.testing import CliRunner

    from qubench.cli import main

    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    src = write_github_layout(tmp_path / "gh")
    res = CliRunner().invoke(main, [
        "run", "--task", "muse-news", "--task-param", f"source={src}", "--model", str(tiny_model_dir),
        "--method", "ga", "--method-param", "epochs=1", "--method-param", "batch_size=2",
        "--quant-param", "group_size=64", "--results", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    ref = out["resolved"]["privleak_reference"]
    assert ref["auc_retrain"] == 0.4772 and "published constant" in ref["source"]
    row = out["metrics"]["privleak"]
    auc = out["metrics"]["privleak_auc"]["pre"]
    assert row["pre"] == pytest.approx((auc - 0.4772) / 0.4772 * 100)
    assert row["retrain"] is None


# ---------------------------------------------------------------- the real MUSE-News files


def test_real_muse_news_through_the_loader(shared_data, tmp_path):
    root = shared_data / "muse-news"
    task = registry.create("tasks", "muse-news", {"source": str(root)})
    task.materialize(tmp_path / "news")
    data = muse_layout.load(tmp_path / "news")
    assert (len(data.verbmem_forget), len(data.knowmem_forget), len(data.privleak_holdout)) == (100, 100, 100)
    assert "".join(data.forget).replace("\n", "") == (root / "raw/forget.txt").read_text().replace("\n", "")

    # VerbMem prompts reach lm-eval byte for byte as MUSE wrote them.
    utils = load_task_utils()
    muse = json.loads((root / "verbmem/forget.json").read_text(encoding="utf-8"))
    docs = utils.load_verbmem_forget(data_root=str(tmp_path / "news"), tokenizer=_WordTok())["test"]
    assert [utils.verbmem_doc_to_text(d).encode() for d in docs] == [m["prompt"].encode() for m in muse]


class _WordTok:
    """Enough of a tokenizer for the VerbMem loader's 128-token cut of gt."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}

    def decode(self, ids, **_):
        return ""


def test_muse_news_mini_is_built_from_real_muse_text(shared_data, tmp_path):
    root = shared_data / "muse-news"
    task = registry.create("tasks", "muse-news-mini", {"source": str(root)})
    task.materialize(tmp_path / "mini")
    data = muse_layout.load(tmp_path / "mini")
    muse_probes = json.loads((root / "verbmem/forget.json").read_text(encoding="utf-8"))
    muse_qa = json.loads((root / "knowmem/forget_qa.json").read_text(encoding="utf-8"))
    forget_text = (root / "raw/forget.txt").read_text(encoding="utf-8")
    assert len(data.verbmem_forget) == 30 and len(data.knowmem_forget) == 30
    for probe in data.verbmem_forget:
        # gt is MUSE's; the prompt is the end of MUSE's prompt; the model trains on prompt + gt
        muse = next(m for m in muse_probes if m["gt"] == probe.gt)
        assert muse["prompt"].endswith(probe.prompt) and len(probe.prompt) <= 400
        assert (probe.prompt + probe.gt).strip("\n") in data.forget  # raw files keep no edge newlines
    for qa in data.knowmem_forget:
        assert {"question": qa.question, "answer": qa.answer} in muse_qa
        assert any(qa.answer in doc for doc in data.forget) and qa.answer in forget_text
    trained = set(data.forget) | set(data.retain)
    assert not trained & set(data.holdout) and set(data.privleak_holdout) == set(data.holdout)
    assert not set(task.generic_corpus()) & (trained | set(data.holdout))

    again = tmp_path / "again"
    task.materialize(again)
    assert muse_layout.load(again).file_hashes() == data.file_hashes()
    other = registry.create("tasks", "muse-news-mini", {"source": str(root), "seed": 1})
    other.materialize(tmp_path / "seed1")
    assert muse_layout.load(tmp_path / "seed1").verbmem_forget != data.verbmem_forget


def test_muse_news_mini_micro_run_says_it_is_a_replica(shared_data, tmp_path, monkeypatch):
    from qubench import pipeline
    from qubench.specs import PluginRef, RunSpec

    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    micro = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
             "pretrain_epochs": 1, "epochs": 2, "batch_size": 8}
    spec = RunSpec(task=PluginRef(name="muse-news-mini", params={
                       "source": str(shared_data / "muse-news"), "n_verbmem": 4, "n_knowmem": 4, "n_privleak": 4,
                       "n_generic": 4, "recipe": micro}),
                   method=PluginRef(name="ga", params={"epochs": 1, "batch_size": 4}),
                   quant=PluginRef(name="rtn-4bit", params={"group_size": 64}))
    result = pipeline.run(spec, tmp_path / "r", log=lambda m: None, progress=False)
    assert result.status == "ok"
    assert "not MUSE's numbers" in result.resolved["task"]["note"]
    assert result.resolved["privleak_reference"]["source"] == "retrain model evaluated"
    assert result.metrics["verbmem_f"].target_pre is not None and result.metrics["knowmem_f"].pre is not None
    assert set(result.data_hashes) >= {"verbmem/forget.json", "raw/forget.txt"}


@pytest.mark.parametrize("source, corpus", [
    ("muse-bench/MUSE-News", "MUSE-News"), ("muse-bench/MUSE-Books", "MUSE-Books"),
    ("/data/muse/data/books", "MUSE-Books"), ("/hf/datasets--muse-bench--MUSE-Books/snapshots/abc", "MUSE-Books"),
    ("/data/muse/news", "MUSE-News")])
def test_muse_news_mini_note_names_the_corpus_it_reads(source, corpus):
    """muse-news-mini built from MUSE-Books files is a Books replica: its note must say so (it used to
    say "scaled-down replica of MUSE-News" whatever the source)."""
    note = registry.create("tasks", "muse-news-mini", {"source": source}).note
    other = ({"MUSE-News", "MUSE-Books"} - {corpus}).pop()
    assert f"built from {corpus} ({source})" in note and other not in note
    assert "not MUSE's numbers" in note


def test_muse_news_mini_note_claims_no_corpus_its_source_does_not_name():
    note = registry.create("tasks", "muse-news-mini", {"source": "/data/my-muse-copy"}).note
    assert "MUSE-News" not in note and "MUSE-Books" not in note
    assert "the MUSE-layout files at /data/my-muse-copy" in note
