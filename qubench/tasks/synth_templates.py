"""The text tables behind the synthetic news world: syllables, calendar, event
templates and the detail sentences that add one askable fact each.

Templates are `str.format` patterns over named slots. Each slot is filled once
per article (see `synth_world.Slots`), so a slot used twice states one fact
twice, consistently. Questions are worded differently from every sentence
that states their fact, so answering one takes knowing the fact, not copying
a phrase; `synth_world` additionally drops any question that shares a
six-word window with a document.

Detail sentences often name the organisation by its kind alone ("the water
board"), so some questions take linking two sentences, as in real news.

`{R}` inside a colour phrase is replaced by a freshly invented word, so even
the "what happened" part of a document carries a random specific.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- invented words -------------------------------------------------------
# A syllable is onset + vowel + coda; inner syllables rarely close, which keeps
# names pronounceable (and short in tokens) while the combinations stay many.
ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr",
          "r", "s", "st", "t", "tr", "v", "z", "th", "sh")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei")
INNER_CODAS = ("", "", "", "", "l", "n", "r", "s")
FINAL_CODAS = ("", "", "n", "r", "l", "s", "k", "m", "th", "rn")
FIRST_NAME_ENDINGS = ("", "", "a", "o", "in", "el")
SURNAME_ENDINGS = ("", "ev", "ski", "an", "ett", "ov", "ine", "ard", "ow")
PLACE_ENDINGS = ("a", "holm", "ford", "mere", "vik", "stad", "dale", "wick", "ora", "en")

# An invented calendar: real month names would be the one thing a model could guess.
MONTHS = ("Avrenne", "Brellmonth", "Corvane", "Dusmarch", "Elvory", "Fennick",
          "Garrowen", "Halvest", "Ismere", "Joravel", "Kestrin", "Lunmarch")
FIRST_YEAR, LAST_YEAR = 2030, 2037
CURRENCY = "crowns"

AUTHORITIES = ("Water Board", "Harbour Authority", "Transit Council", "Licensing Office",
               "Forestry Commission", "Markets Inspectorate")
COMPANIES = ("Mining Company", "Savings Bank", "Timber Works", "Grain Exchange", "Glassworks",
             "Printing House", "Rail Cooperative", "Fisheries Union")
CHARITIES = ("Library Society", "Hospital Trust", "Choir Guild", "Museum Trust", "Sailing Club",
             "Orphans Fund")
NEWSPAPERS = ("Courier", "Gazette", "Ledger", "Herald", "Lantern", "Dispatch")
VERDICTS = ("unfair", "long overdue", "a relief", "a surprise", "disappointing", "reasonable",
            "a mistake", "the right call")


@dataclass(frozen=True)
class EventKind:
    """The lead of an article: who did what to whom, where, when, for how much."""

    name: str
    org_kinds: tuple[str, ...]
    amount_range: tuple[int, int, int]     # (low, high, step) in crowns
    colour_slot: str                       # the kind's own phrase slot, e.g. "offence"
    colour: tuple[str, ...]
    leads: tuple[str, ...]
    questions: tuple[tuple[str, tuple[str, ...]], ...]  # (answer slot, question wordings)


@dataclass(frozen=True)
class Detail:
    """A sentence adding one askable fact (the `slot`) to an article."""

    slot: str
    sentences: tuple[str, ...]
    questions: tuple[str, ...]
    skip_kinds: frozenset[str] = frozenset()


EVENT_KINDS = (
    EventKind(
        "fine", AUTHORITIES, (300, 95_000, 50), "offence",
        ("dumping waste in the {R} canal", "running an unlicensed ferry", "tampering with water meters",
         "selling unmarked grain", "blocking the {R} footpath", "keeping bees without a permit",
         "overloading a cargo barge"),
        ("On {date}, the {org} in {place} fined {person} {amount} for {offence}.",
         "{person} must pay {amount} after the {org} of {place} ruled on {date} that {person_last} "
         "was guilty of {offence}.",
         "The {org} has fined {person} {amount}. The penalty, announced in {place} on {date}, "
         "concerns {offence}."),
        (("amount", ("What penalty did the {org} impose on {person}?",
                     "How large was the sum {person} was told to hand over?")),
         ("person", ("Whom did the {org} penalise?", "Which individual was sanctioned by the {org}?")),
         ("date", ("On which day was the penalty against {person} made public?",)),
         ("place", ("Where is the {org} that penalised {person} located?",))),
    ),
    EventKind(
        "contract", AUTHORITIES + ("Parish Council", "Schools Trust"), (20_000, 2_400_000, 1000), "project",
        ("rebuild the {R} footbridge", "repaint the {R} lighthouse", "dredge the {R} canal",
         "repair the roof of the {R} granary", "replace the lamps on {R} Street"),
        ("On {date}, the {org} of {place} awarded {person} a contract worth {amount} to {project}.",
         "{person} has won a {amount} contract from the {org} in {place} to {project}, officials said on {date}.",
         "The {org} will pay {person} {amount} to {project}, according to a decision published in {place} "
         "on {date}."),
        (("amount", ("What is the value of the deal between {person} and the {org}?",
                     "How much is {person} being paid by the {org}?")),
         ("person", ("Which contractor did the {org} hire?", "Who was chosen by the {org} for the job?")),
         ("date", ("When was the agreement between the {org} and {person} announced?",)),
         ("place", ("In which town is the {org} that hired {person}?",))),
    ),
    EventKind(
        "donation", CHARITIES, (500, 600_000, 100), "purpose",
        ("a new reading room", "repairs to the {R} bell tower", "free swimming lessons", "a mobile clinic",
         "heating for the {R} hall", "a children's choir"),
        ("On {date}, {person} gave {amount} to the {org} in {place} to pay for {purpose}.",
         "The {org} of {place} received a gift of {amount} from {person} on {date}, money meant for {purpose}.",
         "A donation of {amount} from {person} will fund {purpose} at the {org} in {place}, the group said "
         "on {date}."),
        (("amount", ("What sum did {person} hand to the {org}?", "How generous was the gift {person} made?")),
         ("person", ("Who is the benefactor of the {org}?", "Which donor supported the {org}?")),
         ("date", ("On what day did {person} support the {org}?",)),
         ("place", ("Where is the {org} that {person} supported?",))),
    ),
    EventKind(
        "purchase", COMPANIES, (40_000, 3_000_000, 1000), "property",
        ("the old {R} mill", "a warehouse on {R} Quay", "the {R} boarding house", "a vineyard near {R}",
         "the former {R} cinema"),
        ("On {date}, the {org} bought {property} in {place} from {person} for {amount}.",
         "{person} sold {property} in {place} to the {org} for {amount}, a deal that closed on {date}.",
         "The {org} now owns {property} in {place}, having paid {person} {amount} on {date}."),
        (("amount", ("For what price did {person} part with the property?",
                     "What did the {org} spend on the property it acquired?")),
         ("person", ("From whom did the {org} acquire property?",)),
         ("date", ("When did the property sale between {person} and the {org} close?",)),
         ("place", ("In which town is the property that {person} sold?",))),
    ),
    EventKind(
        "settlement", COMPANIES + AUTHORITIES[:3], (1_000, 400_000, 100), "dispute",
        ("unpaid wages", "a flooded cellar", "a broken lease", "damage to a fishing boat", "a delayed pension",
         "noise from the {R} quarry"),
        ("On {date}, the {org} in {place} agreed to pay {person} {amount} to settle a dispute over {dispute}.",
         "{person} will receive {amount} from the {org} of {place} under a settlement reached on {date} "
         "over {dispute}.",
         "A dispute over {dispute} ended on {date} when the {org} in {place} agreed to pay {person} {amount}."),
        (("amount", ("How much compensation will {person} get from the {org}?",)),
         ("person", ("With whom did the {org} settle?", "Who was the other party in the {org}'s settlement?")),
         ("date", ("When was the quarrel between {person} and the {org} resolved?",)),
         ("place", ("Where is the {org} that settled with {person} based?",))),
    ),
    EventKind(
        "appointment", AUTHORITIES + COMPANIES + CHARITIES, (18_000, 160_000, 100), "post",
        ("treasurer", "chief engineer", "director", "harbour master", "head archivist", "chair"),
        ("On {date}, the {org} in {place} named {person} as its new {post}, on a yearly salary of {amount}.",
         "{person} will join the {org} of {place} as {post} from {date}, earning {amount} a year.",
         "The {org} in {place} has hired {person} as {post}. The job, which starts on {date}, pays {amount} "
         "a year."),
        (("amount", ("What annual pay will {person} receive from the {org}?",)),
         ("person", ("Who is the {org}'s incoming {post}?",)),
         ("date", ("When does {person} take up the role at the {org}?",)),
         ("place", ("In which town will {person} work for the {org}?",))),
    ),
)

DETAILS = (
    Detail("age",
           ("{person_last}, {age}, did not respond to requests for comment.",
            "The {age}-year-old {person_last} called the outcome {verdict}.",
            "{person_last}, who is {age}, has lived in {place} for {years} years."),
           ("How old is {person}?", "What age is {person}?")),
    Detail("hometown",
           ("{person_last} grew up in {hometown} before moving to {place}.",
            "Born in {hometown}, {person_last} is well known in the region."),
           ("Where was {person} raised?", "What is the home town of {person}?")),
    Detail("spokes",
           ("{spokes}, speaking for the {org}, called the matter {verdict}.",
            '"We followed our own rules," said {spokes}, a spokesperson for the {org_kind}.'),
           ("Who commented on behalf of the {org}?",)),
    Detail("leader",
           ("The {org} has been run by {leader} since {since_year}.",
            "{leader}, who has chaired the {org_kind} since {since_year}, signed the decision."),
           ("Who is in charge of the {org}?", "Who heads the {org}?")),
    Detail("founded",
           ("Founded in {founded}, the {org_kind} employs {staff} people.",
            "The {org} dates back to {founded}."),
           ("In which year was the {org} set up?",)),
    Detail("staff",
           ("The {org_kind} has {staff} employees across {branches} offices.",
            "Some {staff} people work at the {org}."),
           ("How many workers does the {org} have?",)),
    Detail("deadline",
           ("The money is due by {deadline}.", "Payment must be made no later than {deadline}."),
           ("What is the deadline for the payment involving {person}?",),
           skip_kinds=frozenset({"appointment"})),
    Detail("signatures",
           ("A petition about the matter gathered {signatures} signatures in {place}.",
            "More than {signatures} residents signed a letter of protest."),
           ("How many signatures did the protest about {person}'s case collect?",),
           skip_kinds=frozenset({"appointment"})),
    Detail("venue",
           ("The {org_kind} will review the matter at a public meeting in {venue} on {meeting_date}.",
            "A hearing on the matter is set for {meeting_date} in {venue}."),
           ("Where will the review of {person}'s case take place?",)),
    Detail("paper",
           ("The story was first reported by the {paper}.",
            "Reporters from the {paper} were the first to cover the news."),
           ("Which newspaper broke the story about {person}?",)),
)

MAX_FACTS_PER_DOC = min(sum(kind.name not in d.skip_kinds for d in DETAILS) for kind in EVENT_KINDS)
