"""The synth-news task: a seeded fictional news world written in the MUSE layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qubench import registry
from qubench.errors import ConfigError, DataError
from qubench.tasks import muse_layout
from qubench.tasks.base import TrainRecipe
from qubench.tasks.synth_news import SynthNews, verbmem_probe
from qubench.tasks.synth_world import PhraseIndex

DATA_FILES = [
    "raw/forget.txt", "raw/retain.txt", "raw/holdout.txt",
    "verbmem/forget.json", "verbmem/holdout.json", "verbmem/retain.json",
    "knowmem/forget_qa.json", "knowmem/retain_qa.json",
    "knowmem/forget_qa_icl.json", "knowmem/retain_qa_icl.json",
    "privleak/forget.json", "privleak/retain.json", "privleak/holdout.json",
]


def _materialize(tmp_path_factory, **params) -> tuple[SynthNews, muse_layout.TaskData]:
    task = SynthNews.from_params(params)
    out = tmp_path_factory.mktemp("synth")
    task.materialize(out)
    return task, muse_layout.load(out)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return _materialize(tmp_path_factory, size="micro")


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    return _materialize(tmp_path_factory)


def _norm_words(text: str) -> list[str]:
    # Deliberately independent of synth_world.words: this is the check, not the implementation.
    return re.findall(r"[a-z0-9]+(?:[',-][a-z0-9]+)*", text.lower())


def _windows(seq: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}


def test_registered_under_its_name():
    assert registry.get("tasks", "synth-news") is SynthNews
    assert SynthNews.name == "synth-news" and SynthNews.description


def test_micro_layout_has_every_file_and_the_configured_sizes(micro):
    task, data = micro
    for rel in DATA_FILES:
        assert (data.root / rel).is_file(), rel
    assert len(data.forget) == len(data.retain) == len(data.holdout) == 12
    assert len(data.verbmem_forget) == len(data.verbmem_holdout) == len(data.verbmem_retain) == 12
    assert len(data.knowmem_forget) == len(data.knowmem_retain) == 12
    assert len(data.knowmem_forget_icl) == len(data.knowmem_retain_icl) == 3
    assert data.privleak_forget == data.forget
    assert data.privleak_retain == data.retain
    assert data.privleak_holdout == data.holdout
    assert len(task.world.generic) == 20
    assert len(task.generic_corpus()) == 40  # each generic article plus its question sheet


def test_default_size_and_document_length(default):
    task, data = default
    assert len(data.forget) == len(data.retain) == len(data.holdout) == 100
    assert len(task.world.generic) == 400
    lengths = [len(d.split()) for d in data.forget + data.retain + data.holdout + _articles(task)]
    assert 60 <= min(lengths) and max(lengths) <= 110
    assert all("\n" not in d for d in data.forget + data.retain + data.holdout)


def test_explicit_overrides_win_over_the_preset(tmp_path_factory):
    task, data = _materialize(tmp_path_factory, size="micro", n_forget=5, n_retain=7, n_holdout=4,
                              n_generic=3, icl_examples=2, facts_per_doc=2)
    assert (len(data.forget), len(data.retain), len(data.holdout)) == (5, 7, 4)
    assert (len(data.knowmem_forget), len(data.knowmem_retain)) == (5, 7)
    assert (len(data.verbmem_forget), len(data.verbmem_holdout)) == (5, 4)
    assert len(data.knowmem_forget_icl) == len(data.knowmem_retain_icl) == 2
    assert len(task.world.generic) == 3
    # a lead (amount, person, date, place) plus two details
    assert all(len(a.facts) == 6 for a in task.world.forget)


def test_probes_are_capped_at_100_but_privleak_keeps_every_document(tmp_path_factory):
    _, data = _materialize(tmp_path_factory, size="micro", n_forget=103, n_holdout=101)
    assert len(data.forget) == len(data.privleak_forget) == 103
    assert len(data.knowmem_forget) == len(data.verbmem_forget) == 100
    assert len(data.verbmem_holdout) == 100 and len(data.privleak_holdout) == 101


def test_more_facts_per_doc_make_longer_documents():
    def mean_words(n):
        docs = [a.text for a in SynthNews.from_params({"size": "micro", "facts_per_doc": n}).world.forget]
        return sum(len(d.split()) for d in docs) / len(docs)

    assert mean_words(6) > mean_words(2) + 30


def test_same_config_gives_byte_identical_files_and_another_seed_does_not(micro, tmp_path):
    _, data = micro
    SynthNews.from_params({"size": "micro"}).materialize(tmp_path / "again")
    SynthNews.from_params({"size": "micro", "seed": 1}).materialize(tmp_path / "seed1")
    for rel in DATA_FILES:
        original = (data.root / rel).read_bytes()
        assert (tmp_path / "again" / rel).read_bytes() == original, rel
        assert (tmp_path / "seed1" / rel).read_bytes() != original, rel
    assert SynthNews.from_params({"size": "micro", "seed": 1}).generic_corpus() != \
        SynthNews.from_params({"size": "micro"}).generic_corpus()


def test_questions_never_copy_training_wording(default):
    task, data = default
    # Generic question sheets are left out on purpose: they share the question templates by
    # design (to teach answering) but only about generic entities, checked in the people test.
    corpus = data.forget + data.retain + data.holdout + _articles(task)
    doc_windows = set().union(*(_windows(_norm_words(d), 6) for d in corpus))
    questions = data.knowmem_forget + data.knowmem_retain + data.knowmem_forget_icl + data.knowmem_retain_icl
    for qa in questions:
        assert not any(qa.question.rstrip("?") in d for d in corpus), qa.question
        assert not (_windows(_norm_words(qa.question), 6) & doc_windows), qa.question


def test_phrase_index_rejects_a_copied_phrase():
    index = PhraseIndex(["On 3 Avrenne 2031, the Kelvar Water Board fined Dalmo Petrichev 4,800 crowns."])
    assert index.copies("Why did the Kelvar Water Board fine Dalmo Petrichev?") is False
    assert index.copies("Was it the Kelvar Water Board fined Dalmo?") is True   # 6-word window
    assert index.copies("The Kelvar Water Board?") is True                      # short and verbatim
    assert index.copies("The Kelvar Board?") is False


@pytest.mark.parametrize("split", ["forget", "retain"])
def test_each_question_asks_a_short_fact_of_its_own_document(default, split):
    _, data = default
    docs, qas = getattr(data, split), getattr(data, f"knowmem_{split}")
    for doc, qa in zip(docs, qas):
        assert 1 <= len(qa.answer.split()) <= 4, qa
        assert qa.answer in doc, qa
        # every name the question uses is one this document states
        for name in re.findall(r"\b[A-Z][a-z]+", qa.question)[1:]:
            assert name in doc, (name, qa.question)
    assert len({qa.question for qa in qas}) == len(qas)
    for qa in getattr(data, f"knowmem_{split}_icl"):
        assert 1 <= len(qa.answer.split()) <= 4 and any(qa.answer in d for d in docs), qa


@pytest.mark.parametrize("split", ["forget", "retain"])
def test_icl_examples_are_not_evaluated_questions_and_do_not_leak_their_answers(default, split):
    _, data = default
    evaluated = getattr(data, f"knowmem_{split}")
    icl = getattr(data, f"knowmem_{split}_icl")
    assert not {q.question for q in icl} & {q.question for q in evaluated}
    docs = getattr(data, split)
    for ex in icl:
        names = re.findall(r"\b[A-Z][a-z]+", ex.question)[1:]
        sources = [i for i, doc in enumerate(docs) if ex.answer in doc and all(n in doc for n in names)]
        assert len(sources) == 1, ex  # invented names pin the example to one document
        assert evaluated[sources[0]].answer not in ex.question + " " + ex.answer, (evaluated[sources[0]], ex)


def test_verbmem_probes_reconstruct_the_start_of_their_documents(micro):
    _, data = micro
    for docs, probes in ((data.forget, data.verbmem_forget), (data.holdout, data.verbmem_holdout)):
        for doc, probe in zip(docs, probes):
            assert doc == probe.prompt + probe.gt
            assert len(probe.prompt.split()) == 16 and len(probe.gt.split()) >= 20
            assert not probe.prompt.endswith(" ")
    assert verbmem_probe("one two three", prompt_words=16) == {"prompt": "one two", "gt": " three"}


def test_people_are_never_shared_between_splits_or_with_the_generic_corpus(default):
    task, data = default
    world = task.world
    training = "\n".join(data.forget + data.retain)
    generic = "\n".join(task.generic_corpus())
    holdout_people = {p for a in world.holdout for p in a.people}
    task_people = {p for a in world.forget + world.retain + world.holdout for p in a.people}
    assert len(holdout_people) >= 100
    for person in holdout_people:
        assert not re.search(rf"\b{re.escape(person)}\b", training), person
    for person in task_people:
        assert not re.search(rf"\b{re.escape(person)}\b", generic), person
    # and the surnames alone are fresh too, so a holdout person cannot be half-guessed
    surnames = [p.split()[-1] for p in task_people]
    assert len(set(surnames)) == len(surnames)


def test_documents_vary_beyond_their_names_and_numbers(default):
    _, data = default
    shape = [re.sub(r"\b(?:[A-Z][a-z]+|\d[\d,]*)\b", "X", d) for d in data.forget + data.retain]
    assert len(set(shape)) == len(shape)
    leads = {s.split(".")[0] for s in shape}
    assert len(leads) >= 30


def test_recipes_micro_is_tiny_and_default_uses_the_standard_recipe():
    micro = SynthNews.from_params({"size": "micro"}).train_recipe()
    assert (micro.hidden_size, micro.num_layers, micro.epochs) == (64, 2, 3)
    assert SynthNews.from_params({}).train_recipe() == TrainRecipe()


@pytest.mark.parametrize("params, mentions", [
    ({"bogus": 1}, "bogus"),
    ({"size": "huge"}, "size"),
    ({"facts_per_doc": 0}, "facts_per_doc"),
    ({"n_forget": 0}, "n_forget"),
])
def test_bad_parameters_raise_config_error_listing_allowed_ones(params, mentions):
    with pytest.raises(ConfigError) as err:
        SynthNews.from_params(params)
    message = str(err.value)
    assert mentions in message and "allowed parameters" in message
    for field in ("size", "n_forget", "n_retain", "n_holdout", "facts_per_doc", "n_generic", "icl_examples", "seed"):
        assert field in message


def test_materialize_accepts_a_string_path(tmp_path):
    SynthNews.from_params({"size": "micro", "n_forget": 2, "n_retain": 2, "n_holdout": 2, "n_generic": 0}) \
        .materialize(str(tmp_path))
    assert len(muse_layout.load(Path(tmp_path)).forget) == 2


def test_too_many_icl_examples_for_the_corpus_is_a_clear_error(tmp_path):
    task = SynthNews.from_params({"size": "micro", "n_forget": 1, "n_retain": 1, "n_holdout": 1,
                                  "n_generic": 0, "icl_examples": 20})
    with pytest.raises(DataError, match="in-context examples"):
        task.materialize(tmp_path)


def _articles(task) -> list[str]:
    return [a.text for a in task.world.generic]


def test_generic_question_sheets_teach_the_knowmem_format_on_generic_facts_only(default):
    task, _ = default
    sheets = task.generic_corpus()[len(task.world.generic):]
    assert len(sheets) == len(task.world.generic)
    for article, sheet in zip(task.world.generic, sheets):
        pairs = [block.split("\nAnswer: ") for block in sheet.split("\n\n")]
        assert [q for q, _ in pairs] == [f"Question: {f.question}" for f in article.facts]
        assert all(a in article.text for _, a in pairs)
    no_qa = SynthNews.from_params({"size": "micro", "generic_qa": False})
    assert no_qa.generic_corpus() == [a.text for a in no_qa.world.generic]
