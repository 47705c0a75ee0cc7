"""A seeded generator of a fictional news world: invented people, places,
organisations, dates and sums, written up as short news articles that each
state several facts.

Everything specific in an article is drawn at random, so a model that never
saw an article cannot guess its names and numbers, and nothing can leak from
pretrained knowledge. Randomness comes from `random.Random` seeded with a
string, whose output is stable across Python versions, so the same seed gives
byte-identical data everywhere.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from qubench.errors import DataError
from qubench.tasks.synth_templates import (
    CURRENCY, DETAILS, EVENT_KINDS, FINAL_CODAS, FIRST_NAME_ENDINGS, FIRST_YEAR, INNER_CODAS, LAST_YEAR,
    MONTHS, NEWSPAPERS, ONSETS, PLACE_ENDINGS, SURNAME_ENDINGS, VERDICTS, VOWELS, EventKind,
)

PERSON_SLOTS = ("person", "spokes", "leader")
OTHER_PLACE_SLOTS = ("hometown", "venue")   # a town other than the one the event happened in
LATER_DATE_SLOTS = ("deadline", "meeting_date")
NUMBER_SLOTS = {  # slot: (low, high, thousands separator?)
    "age": (23, 81, False), "years": (2, 40, False), "since_year": (2012, 2029, False),
    "founded": (1820, 2025, False), "branches": (2, 14, False),
    "staff": (12, 4800, True), "signatures": (120, 9800, True),
}
N_PLACES = 30        # towns per world; events recur in them, like a regional paper's beat
N_FIRST_NAMES = 60   # first names repeat across people; surnames never do


@dataclass(frozen=True)
class Fact:
    question: str
    answer: str


@dataclass(frozen=True)
class Article:
    text: str
    facts: tuple[Fact, ...]   # every askable fact the text states
    people: tuple[str, ...]   # full names of everyone mentioned


class NameForge:
    """Invents pronounceable capitalised words from syllables and never hands out
    the same word twice (across every forge sharing `taken`)."""

    def __init__(self, rng: random.Random, taken: set[str]):
        self.rng = rng
        self.taken = taken

    def word(self, syllables: int = 2, endings: tuple[str, ...] = ("",)) -> str:
        rng = self.rng
        for _ in range(10_000):
            codas = [rng.choice(INNER_CODAS) for _ in range(syllables - 1)] + [rng.choice(FINAL_CODAS)]
            stem = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + coda for coda in codas)
            word = (stem + rng.choice(endings)).capitalize()
            if 4 <= len(word) <= 13 and word not in self.taken:
                self.taken.add(word)
                return word
        raise DataError("the synthetic world ran out of invented names; ask for fewer documents")


class World:
    """One set of towns and first names, and the random state articles draw from."""

    def __init__(self, rng: random.Random, taken: set[str]):
        self.rng = rng
        self.forge = NameForge(rng, taken)
        self.first_names = [self.forge.word(2, FIRST_NAME_ENDINGS) for _ in range(N_FIRST_NAMES)]
        self.places = [self.forge.word(rng.choice((1, 2)), PLACE_ENDINGS) for _ in range(N_PLACES)]

    def person(self) -> str:
        return f"{self.rng.choice(self.first_names)} {self.forge.word(2, SURNAME_ENDINGS)}"


class Slots(dict):
    """The values of one article's template slots, invented the first time a
    template asks for them (so a slot named twice states one fact twice).
    Once sealed, asking for a new slot is a template bug: a question would
    otherwise name something the article never stated."""

    def __init__(self, world: World, kind: EventKind):
        super().__init__()
        self.world, self.kind = world, kind
        self.people: list[str] = []
        self.sealed = False
        self._month_index = 0  # of the event date, so later dates really are later

    def __missing__(self, key: str) -> str:
        if self.sealed:
            raise KeyError(f"slot {key!r} is not stated in the article ({self.kind.name} templates)")
        self[key] = value = self._invent(key)
        return value

    def _date(self, first_month: int, last_month: int) -> str:
        month_index = self.world.rng.randint(first_month, last_month)
        if not self._month_index:
            self._month_index = month_index
        year, month = divmod(month_index, len(MONTHS))
        return f"{self.world.rng.randint(1, 28)} {MONTHS[month]} {year}"

    def _invent(self, key: str) -> str:
        world, rng = self.world, self.world.rng
        if key in PERSON_SLOTS:
            self.people.append(name := world.person())
            return name
        if key == "person_last":
            return self["person"].rsplit(" ", 1)[1]
        if key == "org":
            org_kind = rng.choice(self.kind.org_kinds)
            self["org_kind"] = org_kind.lower()   # "the water board", for later mentions
            return f"{world.forge.word()} {org_kind}"
        if key == "org_kind":
            self["org"]
            return self["org_kind"]
        if key == "paper":
            return f"{world.forge.word()} {rng.choice(NEWSPAPERS)}"
        if key == "place":
            return rng.choice(world.places)
        if key in OTHER_PLACE_SLOTS:
            return rng.choice([p for p in world.places if p != self["place"]])
        if key == "date":
            return self._date(FIRST_YEAR * len(MONTHS), (LAST_YEAR + 1) * len(MONTHS) - 1)
        if key in LATER_DATE_SLOTS:
            start = self._month_index or FIRST_YEAR * len(MONTHS)
            return self._date(start + 1, start + 8)
        if key == "amount":
            low, high, step = self.kind.amount_range
            return f"{rng.randrange(low, high + 1, step):,} {CURRENCY}"
        if key == "verdict":
            return rng.choice(VERDICTS)
        if key == self.kind.colour_slot:
            return rng.choice(self.kind.colour).replace("{R}", world.forge.word())
        if key in NUMBER_SLOTS:
            low, high, grouped = NUMBER_SLOTS[key]
            number = rng.randint(low, high)
            return f"{number:,}" if grouped else str(number)
        raise KeyError(f"unknown template slot {key!r}")


def write_article(world: World, facts_per_doc: int) -> Article:
    """One single-paragraph article: a lead sentence (who, what, where, when, how
    much) and `facts_per_doc` detail sentences in random order."""
    rng = world.rng
    kind = rng.choice(EVENT_KINDS)
    details = rng.sample([d for d in DETAILS if kind.name not in d.skip_kinds], facts_per_doc)
    slots = Slots(world, kind)
    sentences = [rng.choice(kind.leads)] + [rng.choice(d.sentences) for d in details]
    text = " ".join(s.format_map(slots) for s in sentences)
    slots.sealed = True
    asked = list(kind.questions) + [(d.slot, d.questions) for d in details]
    facts = tuple(Fact(rng.choice(wordings).format_map(slots), slots[slot]) for slot, wordings in asked)
    for fact in facts:
        if fact.answer not in text:  # a template bug, never bad user input
            raise AssertionError(f"answer {fact.answer!r} missing from generated article {text[:60]!r}")
    return Article(text, facts, tuple(slots.people))


@dataclass(frozen=True)
class SynthWorld:
    forget: list[Article]
    retain: list[Article]
    holdout: list[Article]
    generic: list[Article]   # same genre, entities disjoint from the three splits above


def build_world(seed: int, n_forget: int, n_retain: int, n_holdout: int, n_generic: int,
                facts_per_doc: int) -> SynthWorld:
    taken: set[str] = set()  # shared, so no invented word is reused between the task and generic worlds
    task = World(random.Random(f"qubench/synth-news/{seed}/task"), taken)
    # One stream, then split: forget, retain and holdout are identically distributed.
    docs = [write_article(task, facts_per_doc) for _ in range(n_forget + n_retain + n_holdout)]
    generic_world = World(random.Random(f"qubench/synth-news/{seed}/generic"), taken)
    generic = [write_article(generic_world, facts_per_doc) for _ in range(n_generic)]
    return SynthWorld(docs[:n_forget], docs[n_forget:n_forget + n_retain], docs[n_forget + n_retain:], generic)


# --- knowledge questions --------------------------------------------------

def words(text: str) -> list[str]:
    """Lower-cased words without surrounding punctuation, for phrase comparisons."""
    return [w for w in (t.strip("\"'.,;:?!()").lower() for t in text.split()) if w]


class PhraseIndex:
    """The n-word windows of a corpus, to reject questions that copy its wording."""

    def __init__(self, docs: list[str], n: int = 6):
        self.n = n
        self.windows: set[tuple[str, ...]] = set()
        seqs = [words(d) for d in docs]
        for seq in seqs:
            self.windows.update(tuple(seq[i:i + n]) for i in range(len(seq) - n + 1))
        self._joined = "\n".join(" " + " ".join(seq) + " " for seq in seqs)

    def copies(self, question: str) -> bool:
        seq = words(question)
        if len(seq) < self.n:
            return f" {' '.join(seq)} " in self._joined
        return any(tuple(seq[i:i + self.n]) in self.windows for i in range(len(seq) - self.n + 1))


def choose_questions(articles: list[Article], n_eval: int, n_icl: int, index: PhraseIndex,
                     rng: random.Random) -> tuple[list[Fact], list[Fact]]:
    """One evaluated question for each of the first `n_eval` articles, and `n_icl`
    in-context examples about other facts, none of which gives away an evaluated answer."""
    usable = [[f for f in a.facts if not index.copies(f.question)] for a in articles]
    evaluated: list[Fact] = []
    for i in range(min(n_eval, len(articles))):
        if not usable[i]:
            raise DataError(f"every question about synthetic article {i} copies document wording")
        evaluated.append(rng.choice(usable[i]))
    # Prefer articles without an evaluated question; then reuse evaluated ones, latest first.
    # Small corpora may need several rounds, taking a second fact of the same article.
    order = list(range(len(evaluated), len(articles))) + list(reversed(range(len(evaluated))))
    pools = {}
    for i in order:
        secret = evaluated[i].answer if i < len(evaluated) else None
        pools[i] = [f for f in usable[i] if secret is None or (secret not in f.question and secret not in f.answer)]
    examples: list[Fact] = []
    while len(examples) < n_icl and any(pools.values()):
        for i in order:
            if pools[i] and len(examples) < n_icl:
                examples.append(pools[i].pop(rng.randrange(len(pools[i]))))
    if len(examples) < n_icl:
        raise DataError(f"only {len(examples)} in-context examples available, {n_icl} requested")
    return evaluated, examples
