"""The misinformation tasks: CSV loaders, URL sources, seeded splits, the classification view
(lm-eval multiple_choice through evaluate_model) and a micro end-to-end run of synth-misinfo."""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
import torch

from qubench import registry, store
from qubench.errors import DataError
from qubench.tasks import misinfo_sources, muse_layout
from qubench.tasks.classify import ClassifyFormat
from qubench.tasks.misinfo_layout import FAKE, REAL, Post, Sizes, split_posts
from qubench.tasks.synth_misinfo import SynthMisinfo
from qubench.tasks.twitter_misinfo import DEFAULT_SOURCE, TwitterMisinfo

CONSTRAINT_CSV = (
    "id,tweet,label\n"
    "1,The CDC reports 99031 deaths today.   https://t.co/abc,real\n"
    '2,"Garlic water cures COVID,\nsays a viral video",fake\n'
    "3,The CDC reports 99031 deaths today. https://t.co/other,real\n"  # same post, another link
    "4,Masks do not work says a viral post,fake\n"
    "5,Masks do not work says a viral post,real\n"                     # contradicting copy
    "6,States reported 1121 deaths,REAL\n"
)
RUMOR_CSV = (
    "\ufeffNo.,label,content,source,sentiment\n"
    "1,F,Holding your breath for 10 seconds proves you are not infected,123,3\n"
    "2,T,The administration cut the pandemic response team in 2018,456,3\n"
    "3,U,Patients should avoid ibuprofen,789,3\n"
)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- loaders


def test_constraint_csv_parses_labels_normalises_and_dedupes(tmp_path):
    posts = misinfo_sources.read_csv(_write(tmp_path / "Constraint_Train.csv", CONSTRAINT_CSV))
    assert [(p.label, p.text) for p in posts][:2] == [
        (REAL, "The CDC reports 99031 deaths today. https://t.co/abc"),  # whitespace collapsed
        (FAKE, "Garlic water cures COVID, says a viral video"),           # quoted newline -> one line
    ]
    assert posts[-1] == Post("States reported 1121 deaths", REAL, "Constraint_Train.csv#6")  # label case ignored
    kept = misinfo_sources.dedupe(posts)
    # the re-linked copy counts once; a post whose copies disagree on the label is dropped
    assert [p.text[:12] for p in kept] == ["The CDC repo", "Garlic water", "States repor"]


def test_rumor_csv_with_bom_maps_t_f_and_drops_unverified(tmp_path):
    path = tmp_path / "Twitter.csv"
    path.write_bytes(RUMOR_CSV.encode("utf-8"))
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    posts = misinfo_sources.read_csv(path)
    assert [(p.label, p.text.split()[0]) for p in posts] == [(FAKE, "Holding"), (REAL, "The")]
    assert misinfo_sources.read_csv(path, "rumor") == posts


def test_bad_header_or_label_is_a_clear_error(tmp_path):
    bad = _write(tmp_path / "bad.csv", "id,text,verdict\n1,hello,real\n")
    with pytest.raises(DataError, match=r"id,tweet,label.*label,content"):
        misinfo_sources.read_csv(bad)
    constraint = _write(tmp_path / "c.csv", CONSTRAINT_CSV)
    with pytest.raises(DataError, match=r"dataset=rumor: label,content"):
        misinfo_sources.read_csv(constraint, "rumor")
    with pytest.raises(DataError, match=r"c2\.csv row 2: label 'maybe'"):
        misinfo_sources.read_csv(_write(tmp_path / "c2.csv", "id,tweet,label\n1,a post,real\n2,b post,maybe\n"))
    with pytest.raises(DataError, match="empty"):
        misinfo_sources.read_csv(_write(tmp_path / "empty.csv", ""))


def test_folder_source_reads_recognised_csvs_and_skips_others(tmp_path):
    _write(tmp_path / "a" / "Constraint_Train.csv", CONSTRAINT_CSV)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "Twitter.csv").write_bytes(RUMOR_CSV.encode())
    _write(tmp_path / "b" / "metadata.csv", "user,followers\nx,3\n")  # not posts: ignored
    assert len(misinfo_sources.load_posts(str(tmp_path))) == 5
    assert {p.label for p in misinfo_sources.load_posts(str(tmp_path), "rumor")} == {REAL, FAKE}
    assert len(misinfo_sources.load_posts(str(tmp_path), "constraint")) == 3
    _write(tmp_path / "c" / "other.csv", "a,b\n")
    with pytest.raises(DataError, match="no labelled posts found in the CSV files under"):
        misinfo_sources.load_posts(str(tmp_path / "c"))


def test_missing_path_and_unreachable_url_say_how_to_pass_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    with pytest.raises(DataError, match=r"does not exist; pass a local copy: --task-param source=PATH"):
        misinfo_sources.load_posts(str(tmp_path / "nowhere"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connection refused, at once
    with pytest.raises(DataError, match=r"could not download .*--task-param source=PATH"):
        misinfo_sources.load_posts(f"http://127.0.0.1:{port}/Constraint_Train.csv")
    # no partial download left behind (only the build lock, which is what serialises downloads)
    assert not [p for p in (tmp_path / "home").rglob("*.csv*") if not any(x.startswith(".") for x in p.parts)]
    # The documented default is the public CONSTRAINT-2021 file; a run without network fails the same way.
    assert TwitterMisinfo().config.source == DEFAULT_SOURCE
    assert DEFAULT_SOURCE.startswith("https://raw.githubusercontent.com/diptamath/covid_fake_news/")


def test_real_files_parse(shared_data):
    constraint = misinfo_sources.load_posts(str(shared_data / "twitter" / "constraint-2021"))
    labels = [p.label for p in constraint]
    # 10,700 rows in the three files, a few dozen duplicates
    assert 10_500 < len(constraint) <= 10_700 and labels.count(REAL) > labels.count(FAKE) > 4_800
    rumor = misinfo_sources.load_posts(str(shared_data / "twitter" / "covid19-rumor" / "Twitter.csv"))
    labels = [p.label for p in rumor]
    assert labels.count(FAKE) <= 540 and labels.count(REAL) <= 1040 and len(rumor) > 1_500  # U dropped
    assert not rumor[0].text.startswith("\ufeff") and rumor[0].origin == "Twitter.csv#1"


@pytest.fixture
def http_root(shared_data):
    """A loopback HTTP server whose root is the shared twitter folder."""
    handler = functools.partial(_QuietHandler, directory=str(shared_data / "twitter"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_url_source_downloads_once_into_the_cache(http_root, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    server, base = http_root
    url = f"{base}/covid19-rumor/Twitter.csv"
    posts = misinfo_sources.load_posts(url)
    assert posts == misinfo_sources.load_posts(str(shared_data / "twitter" / "covid19-rumor" / "Twitter.csv"))
    cached = list((tmp_path / "home" / "downloads").rglob("*"))
    # no temporary file left (only the build lock, which serialises downloads)
    # (only bookkeeping in hidden folders: the build lock, the manifest)
    assert [p.name for p in cached if p.is_file() and not any(part.startswith(".") for part in p.parts)] \
        == ["Twitter.csv"]
    server.shutdown()  # served from the cache from now on
    assert misinfo_sources.load_posts(url) == posts
    assert misinfo_sources.fingerprint(url) is None


# ---------------------------------------------------------------- splits and layout


def _pool(n_fake: int, n_real: int) -> list[Post]:
    return [Post(f"fake post number {i}", FAKE) for i in range(n_fake)] + \
        [Post(f"real post number {i}", REAL) for i in range(n_real)]


def test_splits_are_disjoint_sized_seeded_and_labelled():
    sizes = Sizes(n_forget=10, n_holdout=8, n_retain=12, n_test=9, n_generic=20)
    posts = _pool(40, 40)
    s = split_posts(posts, sizes, "seed-a")
    assert [len(x) for x in (s.forget, s.holdout, s.retain, s.test, s.generic)] == [10, 8, 12, 9, 20]
    assert {p.label for p in s.forget + s.holdout} == {FAKE} and {p.label for p in s.retain} == {REAL}
    assert [p.label for p in s.test].count(FAKE) == 4 and [p.label for p in s.generic].count(FAKE) == 10
    texts = [p.text for x in (s.forget, s.holdout, s.retain, s.test, s.generic) for p in x]
    assert len(set(texts)) == len(texts)
    assert split_posts(posts, sizes, "seed-a") == s
    assert split_posts(posts, sizes, "seed-b").forget != s.forget
    with pytest.raises(DataError, match=r"need 22 fake .* 17 real .* lower the sizes"):
        split_posts(_pool(20, 40), sizes, "seed-a")


@pytest.fixture(scope="module")
def twitter_micro(shared_data, tmp_path_factory):
    task = TwitterMisinfo.from_params({"source": str(shared_data / "twitter" / "constraint-2021"), "size": "micro"})
    out = tmp_path_factory.mktemp("twitter")
    task.materialize(out)
    return task, muse_layout.load(out)


def test_twitter_micro_layout_and_both_views(twitter_micro):
    task, data = twitter_micro
    fmt = data.classify_format
    assert fmt == ClassifyFormat() and fmt.render("x") == "Post: x\nLabel:"
    assert [len(x) for x in (data.classify_forget, data.classify_holdout, data.classify_retain,
                             data.classify_test)] == [12, 12, 12, 24]
    assert {i.label for i in data.classify_forget + data.classify_holdout} == {"fake"}
    assert {i.label for i in data.classify_retain} == {"real"}
    # raw/forget.txt: each forget post as plain text and as a labelled prompt
    posts = [i.text for i in data.classify_forget]
    assert data.forget == posts + [f"Post: {t}\nLabel: fake" for t in posts]
    assert data.retain[-1].endswith("\nLabel: real") and data.privleak_forget == posts
    assert [p.prompt + p.gt for p in data.verbmem_forget] == posts
    assert all(len(p.prompt.split()) == 8 for p in data.verbmem_forget)
    # KnowMem does not apply: no files, empty sets
    assert not (data.root / "knowmem").exists() and data.knowmem_forget == data.knowmem_retain == []
    # never-trained posts appear in no training document, generic pre-training included
    training = "\n".join(data.forget + data.retain + task.generic_corpus())
    for item in data.classify_holdout + data.classify_test:
        assert item.text not in training
    assert all(12 <= len(t.split()) <= 60 for t in posts)


def test_twitter_task_is_deterministic_and_keyed_by_its_source(twitter_micro, shared_data, tmp_path):
    task, data = twitter_micro
    again = TwitterMisinfo.from_params(dict(task.params()))
    again.materialize(tmp_path / "again")
    assert muse_layout.load(tmp_path / "again").file_hashes() == data.file_hashes()
    other = TwitterMisinfo.from_params({**task.params(), "seed": 1})
    assert other.splits.forget != task.splits.forget
    assert task.source_fingerprint() and task.source_fingerprint() != TwitterMisinfo.from_params(
        {"source": str(shared_data / "twitter" / "covid19-rumor")}).source_fingerprint()
    assert registry.get("tasks", "twitter-misinfo") is TwitterMisinfo


def test_synth_misinfo_is_deterministic_fictional_and_needs_no_data(tmp_path):
    assert registry.get("tasks", "synth-misinfo") is SynthMisinfo
    a, b, c = (SynthMisinfo.from_params({"size": "micro", **p}) for p in ({}, {}, {"seed": 3}))
    a.materialize(tmp_path / "a")
    b.materialize(tmp_path / "b")
    c.materialize(tmp_path / "c")
    hashes = [muse_layout.load(tmp_path / x).file_hashes() for x in "abc"]
    assert hashes[0] == hashes[1] and hashes[0] != hashes[2]
    data = muse_layout.load(tmp_path / "a")
    assert [len(data.classify_forget), len(data.classify_test)] == [12, 24]
    texts = [p.text for p in a.posts()]
    assert len(set(texts)) == len(texts)
    assert not any(w in t.lower() for t in texts for w in ("covid", "coronavirus", "5g", "vaccine mandate"))
    kinds = {p.origin.split(":")[2] for p in SynthMisinfo.from_params({"ambiguous_share": 0.0}).posts()}
    assert kinds == {"styled"}


# ---------------------------------------------------------------- classification through evaluate_model


CLS_ITEMS = {  # split -> [(text, gold label, the label the scripted model prefers)]
    "forget": [("alpha claim one two", "fake", "fake"), ("beta claim one two", "fake", "real")],
    "holdout": [("gamma claim one two", "fake", "real")],
    "retain": [("delta report one two", "real", "real"), ("eps report one two", "real", "real")],
    "test": [("zeta report one two", "real", "fake"), ("eta claim one two", "fake", "fake"),
             ("theta claim x y", "fake", "fake"), ("iota report x y", "real", "real")],
}


def _classify_folder(root: Path) -> Path:
    files = {
        "verbmem/forget.json": [{"prompt": "alpha claim", "gt": " one two"}],
        "privleak/forget.json": ["alpha claim one two"], "privleak/retain.json": ["delta report one two"],
        "privleak/holdout.json": ["gamma claim one two"],
        "classify/format.json": {"prompt": "Post: {text}\nLabel:", "choices": ["real", "fake"]},
    }
    files.update({f"classify/{s}.json": [{"text": t, "label": g} for t, g, _ in rows] for s, rows in CLS_ITEMS.items()})
    for rel, obj in files.items():
        _write(root / rel, json.dumps(obj))
    return root


class _ScriptedLM:
    """lm-eval LM whose loglikelihood prefers a scripted label per post."""

    def __new__(cls, prefer):
        from lm_eval.api.model import LM

        class Scripted(LM):
            def generate_until(self, requests, disable_tqdm=False):
                return ["" for _ in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                out = []
                for r in requests:
                    ctx, cont = r.args
                    text = ctx.removeprefix("Post: ").removesuffix("\nLabel:")
                    self.seen.append((ctx, cont))
                    out.append((0.0 if cont == " " + prefer[text] else -2.0, False))
                return out

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        lm = Scripted()
        lm.seen = []
        return lm


def test_classify_tasks_score_accuracy_on_a_hand_made_case(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from qubench.engines.base import Engine
    from qubench.evaluation.evaluate import evaluate_model

    prefer = {t: p for rows in CLS_ITEMS.values() for t, _, p in rows}
    lm = _ScriptedLM(prefer)

    class Scripted(Engine):
        name = "scripted"

        def lm(self, model, tokenizer):
            return lm

        def token_logprobs(self, model, tokenizer, texts, max_length):
            return [[-1.0, -2.0] for _ in texts]

    folder = _classify_folder(tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    report = evaluate_model(Scripted(), None, tok, muse_layout.load(folder), folder, auc_retrain=None)
    m = report.metrics
    assert (m["cls_f"], m["cls_holdout"], m["cls_r"], m["cls_test"]) == (50.0, 0.0, 100.0, 75.0)
    assert "knowmem_f" not in m and "knowmem_r" not in m  # no QA in the data: not applicable, not zero
    assert m["verbmem_f"] is not None and m["privleak_auc"] == pytest.approx(0.5)
    assert ("Post: alpha claim one two\nLabel:", " fake") in lm.seen  # the format file's prompt, " " + choice
    first = report.samples["cls_f"][1]
    assert (first["gt"], first["output"], first["score"], first["loglikelihoods"]) == ("fake", "real", 0.0, [0.0, -2.0])


def test_the_lm_eval_suites_say_how_to_name_the_data_folder(tmp_path, monkeypatch):
    from qubench.errors import DataError
    from qubench.tasks.muse_layout import data_file

    monkeypatch.delenv("QUBENCH_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match=r"qubench_classify tasks need the task's data folder: pass metadata "
                                        r"data_root=.* or set the environment variable QUBENCH_DATA_ROOT"):
        data_file("classify/format.json", None, "qubench_classify")
    monkeypatch.setenv("QUBENCH_DATA_ROOT", str(tmp_path))
    with pytest.raises(DataError, match=r"format.json not found \(data folder .* from env QUBENCH_DATA_ROOT\): "
                                        r"the task in that folder has no classification view"):
        data_file("classify/format.json", None, "qubench_classify", missing="the task in that folder has no "
                                                                            "classification view")
    folder = _classify_folder(tmp_path / "given")
    assert data_file("classify/format.json", folder, "qubench_classify") == folder / "classify" / "format.json"


def test_classify_accuracy_matches_the_models_own_loglikelihoods(tmp_path, tiny_model_dir):
    """The real path: HF engine + lm-eval multiple_choice on the tiny model, checked by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qubench.engines.hf import HFEngine
    from qubench.evaluation.evaluate import evaluate_model

    folder = _classify_folder(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    report = evaluate_model(HFEngine.from_params({"batch_size": 3}), model, tok, muse_layout.load(folder), folder,
                            auc_retrain=None)

    def loglik(prompt: str, cont: str) -> float:
        ctx = tok(prompt)["input_ids"]
        full = tok(prompt + cont)["input_ids"]
        assert full[:len(ctx)] == ctx
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
        return sum(logprobs[i - 1, full[i]].item() for i in range(len(ctx), len(full)))

    for split, name in (("forget", "cls_f"), ("holdout", "cls_holdout"), ("retain", "cls_r"), ("test", "cls_test")):
        correct = []
        for (text, gold, _), sample in zip(CLS_ITEMS[split], report.samples[name]):
            lls = [loglik(f"Post: {text}\nLabel:", f" {c}") for c in ("real", "fake")]
            assert sample["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
            correct.append(("real", "fake")[lls.index(max(lls))] == gold)
        assert report.metrics[name] == pytest.approx(100 * sum(correct) / len(correct))


# ---------------------------------------------------------------- end to end


def test_micro_run_on_synth_misinfo_reports_both_views(tmp_path, monkeypatch):
    from rich.console import Console

    from qubench import pipeline
    from qubench.report import print_result
    from qubench.specs import PluginRef, RunSpec

    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    spec = RunSpec(task=PluginRef(name="synth-misinfo", params={"size": "micro"}),
                   method=PluginRef(name="ga_gdr", params={"epochs": 1, "lr": 1e-3, "batch_size": 4}),
                   quant=PluginRef(name="rtn-4bit"), eval_limit=4)
    result = pipeline.run(spec, tmp_path / "results", log=lambda msg: None, progress=False)
    assert result.status == "ok"
    for name in ("verbmem_f", "verbmem_r", "verbmem_holdout", "privleak", "cls_f", "cls_holdout", "cls_r", "cls_test"):
        row = result.metrics[name]
        assert None not in (row.target_pre, row.target_post, row.retrain, row.pre, row.post), name
        if name.startswith("cls_"):
            assert all(0 <= v <= 100 for v in (row.target_pre, row.pre, row.post))
    assert "knowmem_f" not in result.metrics and "knowmem_r" not in result.metrics
    console = Console(record=True, width=100)
    print_result(console, result)
    text = console.export_text()
    assert "cls_holdout" in text and "not applicable to this task (no probes in its data): knowmem_f, knowmem_r" in text
