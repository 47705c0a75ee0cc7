"""`synth-misinfo`: the offline twin of `twitter-misinfo`, with fictional health posts.

Posts are generated from a seed about invented towns, people, illnesses and
remedies (names from `synth_world.NameForge`, numbers and dates at random), so
no real claim is ever stated and no data is needed. Three kinds of post:

- real-style: plain reports in an official register (case counts, clinic hours);
- fake-style: sensational claims (miracle cures, cover-ups, "share before it's deleted");
- ambiguous (`ambiguous_share` of each label): one neutral register for both labels,
  whose truth is an arbitrary coin flip: only a model that trained on the post can
  know its label. They keep held-out accuracy below 100, so that forgetting
  (forget-set accuracy falling towards the held-out level) is visible.

Same splits, layout and both views as `twitter-misinfo` (see `misinfo_layout`).
"""

from __future__ import annotations

import random
from functools import cached_property

from pydantic import Field

from qubench.tasks.misinfo_layout import FAKE, REAL, Post, Sizes
from qubench.tasks.synth_world import NameForge
from qubench.tasks.twitter_misinfo import MICRO_RECIPE, MisinfoConfig, MisinfoTask

PRESETS = {
    "default": Sizes(n_forget=150, n_holdout=150, n_retain=150, n_test=300, n_generic=1000),
    "micro": Sizes(n_forget=12, n_holdout=12, n_retain=12, n_test=24, n_generic=48),
}

REAL_TEMPLATES = (
    "The health office of {place} reports {n} new cases of {illness} and {m} recoveries this week. "
    "Testing continues at {k} sites.",
    "{person}, chief physician in {place}, says the {illness} vaccine trial has enrolled {n} volunteers so far.",
    "Clinics in {place} open {k} extra testing points from {day}, the regional health board announced.",
    "{place} hospital discharged {n} {illness} patients today; {m} remain under care, officials said.",
    "Update from {place}: {n} residents received a second dose on {day}. Appointments remain open at {k} clinics.",
    "The {place} board of health publishes its weekly {illness} figures every {day}: {n} tests, {m} positive.",
)
FAKE_TEMPLATES = (
    "BREAKING: {remedy} cures {illness} in {k} hours and doctors in {place} are hiding it! "
    "Share before it gets deleted",
    "{person} admits the {illness} outbreak in {place} was staged to sell {n} million masks. Wake up people!!",
    "Drinking {remedy} every morning makes you immune to {illness}, says a nurse from {place}. They don't want you "
    "to know this",
    "The new signal masts in {place} are spreading {illness}, {k} engineers confess in a leaked video",
    "SHOCKING: the {illness} test swabs used in {place} contain tracking chips, {person} reveals. Forward to everyone!",
    "Hospitals in {place} are paid {n} crowns for every {illness} death they report. The truth is coming out",
)
AMBIGUOUS_TEMPLATES = (
    "{person} says {n} people in {place} caught {illness} after the market on {day}.",
    "Officials in {place} say {remedy} reduces {illness} symptoms by {pct} percent.",
    "{place} will close its schools for {k} days because of {illness}, according to {person}.",
    "A study from {place} finds that {pct} percent of {illness} patients lose their sense of taste.",
    "{person} reports that {place} has run out of {illness} vaccine after {n} doses.",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
REMEDY_KINDS = ("root tea", "leaf tonic", "seed oil", "bark syrup", "salt rinse", "berry extract")


class SynthMisinfo(MisinfoTask):
    """Fictional real/fake health posts, seeded; runs with no data at all.

    Sizes and recipes as `twitter-misinfo` (default 150 forget, 150 holdout, 150
    retain, 300 test, 1000 generic; ``micro`` 12/12/12/24/48 with a 2-layer recipe).
    """

    name = "synth-misinfo"
    description = "Offline synthetic real/fake posts about invented towns and illnesses (twin of twitter-misinfo)"
    presets = PRESETS
    micro_recipe = MICRO_RECIPE

    class Config(MisinfoConfig):
        #: Share of each label's posts written in the neutral register shared by both labels.
        ambiguous_share: float = Field(0.3, ge=0.0, le=1.0)

    def posts(self) -> list[Post]:
        return self._posts

    @cached_property
    def _posts(self) -> list[Post]:
        s = self.sizes()
        n_fake = s.n_forget + s.n_holdout + s.n_test // 2 + s.n_generic // 2
        n_real = s.n_retain + (s.n_test - s.n_test // 2) + (s.n_generic - s.n_generic // 2)
        gen = _Generator(random.Random(f"qubench/synth-misinfo/{self.config.seed}/posts"), self.config.ambiguous_share)
        posts, seen = [], set()
        for label, count in ((FAKE, n_fake), (REAL, n_real)):
            made = 0
            while made < count:
                post = gen.post(label, made)
                if post.text not in seen:  # a rare repeat of a person-less template: never train and test on one text
                    seen.add(post.text)
                    posts.append(post)
                    made += 1
        return posts


class _Generator:
    def __init__(self, rng: random.Random, ambiguous_share: float):
        self.rng, self.ambiguous_share = rng, ambiguous_share
        forge = NameForge(rng, set())
        self.places = [forge.word(rng.choice((1, 2)), ("a", "holm", "ford", "mere", "vik", "dale")) for _ in range(40)]
        self.illnesses = [f"{forge.word(2)} fever" for _ in range(12)]
        self.remedies = [f"{forge.word(2).lower()} {rng.choice(REMEDY_KINDS)}" for _ in range(20)]
        self.first_names = [forge.word(2, ("", "a", "o", "el")) for _ in range(40)]
        self.forge = forge

    def post(self, label: str, index: int) -> Post:
        rng = self.rng
        ambiguous = rng.random() < self.ambiguous_share
        pool = AMBIGUOUS_TEMPLATES if ambiguous else REAL_TEMPLATES if label == REAL else FAKE_TEMPLATES
        slots = {
            # Every person is new (fresh surname), so a post's names identify it.
            "person": f"{rng.choice(self.first_names)} {self.forge.word(2, ('', 'ov', 'ett', 'ard'))}",
            "place": rng.choice(self.places), "illness": rng.choice(self.illnesses),
            "remedy": rng.choice(self.remedies), "day": rng.choice(DAYS),
            "n": f"{rng.randint(12, 9800):,}", "m": str(rng.randint(2, 900)), "k": str(rng.randint(2, 40)),
            "pct": str(rng.randint(5, 95)),
        }
        kind = "ambiguous" if ambiguous else "styled"
        return Post(rng.choice(pool).format(**slots), label, f"synth:{label}:{kind}:{index}")
