"""Word lists of the locator: function words, relational nouns, verbs and their forms.

Everything here is a plain string table (no tokens): the closed classes used to
segment a question, the nouns that can head a bridge phrase, the verb list with
its generated inflections (:data:`VERB_FORMS`, form -> base), and the string
predicates that depend only on these tables.
"""

# The word lists are written as "a b c".split() on purpose (readable, diffable).
# ruff: noqa: SIM905

from __future__ import annotations

import re

# ---------------------------------------------------------------------------
# Function words

DETS = frozenset("the a an this these those its his her their our my your".split())
WH = frozenset("what who whom whose which when where why how".split())
BE = frozenset("is was are were be been being am isn't wasn't aren't weren't".split())
DO = frozenset("do does did don't doesn't didn't".split())
HAVE = frozenset("has have had hasn't haven't hadn't".split())
MODAL = frozenset("can could will would shall should may might must can't won't couldn't wouldn't".split())
AUX = BE | DO | HAVE | MODAL
PREPS = frozenset(
    "of in on at by for from with to into onto about after before during since under over "
    "between through near within across against among along behind beyond toward towards "
    "upon via per like as than around outside inside throughout".split()
)
REL = frozenset("that which who whom whose where when".split())
ADVERBS = frozenset("also not never first originally once still later now currently formerly".split())
CONNECTORS = frozenset(
    "of the and or de del della di da du des la le les von van der den y in on for at a an to & - : with "
    "'s ' el al bin ibn".split()
)
# Question-initial capitalised words that are not part of a name.
NOT_NAME_START = WH | AUX | PREPS | DETS | frozenset(
    "according along besides since this that there".split()
)

QUOTES = frozenset({'"', "“", "”"})
SINGLE_QUOTES = frozenset({"'", "‘", "’"})

# ---------------------------------------------------------------------------
# Nouns

# Nouns that denote an entity through its relation to another one. Agent and
# kin nouns license "the E <noun>" ("the Green performer"); all of them license
# "the <noun> from/in E" ("the actor from Terminator").
AGENT_NOUNS = frozenset(
    """
    performer singer artist band group author writer novelist poet composer lyricist songwriter director
    producer screenwriter creator designer developer inventor founder cofounder co-founder owner
    operator manufacturer maker publisher distributor employer successor predecessor star actor actress
    member player winner champion participant narrator host presenter coach manager captain illustrator
    editor translator architect sculptor painter photographer engineer builder sponsor broadcaster
    frontman vocalist guitarist drummer bassist pianist rapper leader president ceo chairman
    spokesperson occupant
    """.split()
)
KIN_NOUNS = frozenset(
    """
    spouse wife husband father mother son daughter child children brother sister sibling siblings
    parent parents grandfather grandmother grandson granddaughter uncle aunt cousin nephew niece
    partner girlfriend boyfriend
    """.split()
)
ROLE_NOUNS = AGENT_NOUNS | KIN_NOUNS | frozenset(
    """
    person man woman guy people individual figure character voice team club league cast crew
    company firm organization organisation agency party label network studio school university
    college country nation state city town place
    """.split()
)

# Nouns for a value of the entity rather than another entity ("the population
# of ...", "the total area of ..."): they never head a bridge phrase.
ATTRIBUTE_NOUNS = frozenset(
    """
    name names population age height length width depth size date year years day month time number
    percentage percent amount price cost value total rank ranking enrollment distance season episode
    result end beginning start part type kind sort form version history meaning origin death birth
    """.split()
)

WH_DETS = frozenset("what which whose how".split())
OF_COMPOUNDS = frozenset(
    {"body of water", "place of birth", "place of death", "country of origin", "country of citizenship",
     "head of state", "head of government", "member of parliament", "place of worship", "point of origin"}
)
PARTICLES = frozenset("out up down off away back over".split())

# Relative words that can open a headless relative ("where X is employed"); time
# nouns that license "when" as a relative word ("the war when ...").
HEADLESS = frozenset("who where what whom".split())
TIME_NOUNS = frozenset("war conflict battle time period era age year day decade century season reign".split())

# "What is the name of ___?", "What is ___ called?" only restate the bridge.
EMPTY_WORDS = frozenset({"'s", "s", "name", "called"})

# ---------------------------------------------------------------------------
# Verbs

# Base forms of common verbs; inflected forms are generated below.
BASE_VERBS = frozenset(
    """
    act add affect agree air allow announce appear apply approve arrive ask attack attend award base be
    bear beat become begin believe belong border break bring broadcast build buy call capture carry
    cause cease change choose claim close coach come compete compose conquer consider contain continue
    control cost create cross cut debut declare defeat defend depict describe design destroy develop die
    direct discover distribute divide do draft draw drink drive drop earn eat educate elect employ end
    enter erupt establish expand explain fail fall feature feel fight fill find finish flood flow fly
    follow form found fund gain get give go govern graduate grow happen have head hear help hire hit
    hold host house illustrate include increase influence inherit introduce invade invent involve issue
    join keep kill know land last launch lead learn leave lend let lie like live locate lose love make
    manage manufacture marry mean meet merge move name need nominate note occupy occur open operate
    order originate own paint participate pass pay perform pick place plan play portray possess precede
    premiere prepare present produce promote propose protect prove provide publish purchase put raise
    rank reach read receive record reduce refer reign release remain replace represent require retire
    return reveal rule run say score see seek sell send serve set settle share sign sing sink sit speak
    spend split stand star start stay stop study succeed suffer supply support surrender take talk teach
    tell think throw train travel try turn understand unite use visit vote want win work write adopt
    exist rise voice sponsor achieve acquire admit arrest assassinate assume ban bomb borrow burn
    celebrate collapse collect comprise conclude confirm construct convert crown decide defect deny
    discuss dissolve donate emigrate encourage enact escape evolve exile hate hide identify ignore
    impeach import improve inspire invite kidnap lay lease migrate murder negotiate observe obtain offer
    oppose outlive overthrow pardon pray predict prefer prevent print process pronounce protest punish
    qualify quit rebuild recognize recruit regain reject rely remove rename repeal rescue resign resist
    respond restore retain revolt ride ring sail save search seize separate shoot smoke solve steal
    strike submit suggest surpass surround survive suspend swim tour trade transfer translate treat
    trust vanish wear wed withdraw worship
    """.split()
)
_IRREGULAR = {
    "be": "was were been is are am",
    "bear": "bore born borne",
    "beat": "beaten",
    "become": "became",
    "begin": "began begun",
    "break": "broke broken",
    "bring": "brought",
    "build": "built",
    "buy": "bought",
    "choose": "chose chosen",
    "come": "came",
    "do": "did done does",
    "draw": "drew drawn",
    "drink": "drank drunk",
    "drive": "drove driven",
    "eat": "ate eaten",
    "fall": "fell fallen",
    "feel": "felt",
    "fight": "fought",
    "find": "found",
    "fly": "flew flown flies",
    "get": "got gotten",
    "give": "gave given",
    "go": "went gone goes",
    "grow": "grew grown",
    "have": "had has",
    "hear": "heard",
    "hold": "held",
    "keep": "kept",
    "know": "knew known",
    "lead": "led",
    "leave": "left",
    "lend": "lent",
    "lie": "lay lain",
    "lose": "lost",
    "make": "made",
    "mean": "meant",
    "meet": "met",
    "pay": "paid",
    "read": "read",
    "rise": "rose risen",
    "run": "ran",
    "say": "said",
    "see": "saw seen",
    "seek": "sought",
    "sell": "sold",
    "send": "sent",
    "sing": "sang sung",
    "sink": "sank sunk",
    "sit": "sat",
    "speak": "spoke spoken",
    "spend": "spent",
    "stand": "stood",
    "take": "took taken",
    "teach": "taught",
    "tell": "told",
    "think": "thought",
    "throw": "threw thrown",
    "understand": "understood",
    "win": "won",
    "write": "wrote written",
}

PARTICIPLE_EXTRA = frozenset(
    "born located based headquartered situated named known called founded educated buried crowned "
    "nominated signed released married established formed elected drafted honored "
    "honoured employed published produced written made".split()
)

# Past forms (by spelling) that are nouns; "-ing" words that are nouns.
_NOT_PAST = frozenset("hundred kindred shed".split())
_ING_NOUNS = frozenset(
    """
    thing things something nothing anything everything king kingdom building buildings wedding ring
    morning evening ceiling painting paintings meeting spring string wing during according including
    clothing darling earring offspring pudding sibling siblings viking setting ending beginning
    recording recordings opening training housing landing feeling writing teaching singing
    """.split()
)

ROLE_VERBS = frozenset("play plays played playing portray portrays portrayed voice voices voiced".split())

# Participles that never head a finite clause on their own.
PURE_PARTICIPLES = frozenset(
    "born borne sung written known given taken seen spoken shown drawn driven eaten fallen flown grown "
    "risen thrown chosen broken begun done gone been".split()
)

IRREGULAR_PARTS = frozenset(w for forms in _IRREGULAR.values() for w in forms.split()) - AUX

# Words that count half in the decomposition alignment.
STOP_FOR_ALIGN = DETS | PREPS | AUX | WH | frozenset({"?", ".", ",", "'s", "and", "or"})

# ---------------------------------------------------------------------------
# Verb forms and string predicates


def _inflections(base: str) -> set[str]:
    forms = set(_IRREGULAR.get(base, "").split())
    if base.endswith("e"):
        forms |= {base + "s", base + "d", base[:-1] + "ing"}
    elif base.endswith("y") and base[-2:-1] not in "aeiou":
        forms |= {base[:-1] + "ies", base[:-1] + "ied", base + "ing"}
    else:
        suffix_s = "es" if base.endswith(("s", "sh", "ch", "x", "z", "o")) else "s"
        forms |= {base + suffix_s, base + "ed", base + "ing"}
        if re.fullmatch(r"[^aeiou]*[aeiou][bdgklmnprt]", base):  # stop -> stopped
            forms |= {base + base[-1] + "ed", base + base[-1] + "ing"}
    return forms


def _build_verb_forms() -> dict[str, str]:
    forms: dict[str, str] = {}  # form -> base
    for base in BASE_VERBS:
        for form in _inflections(base):
            forms.setdefault(form, base)
    for base in BASE_VERBS:
        forms[base] = base
    return forms


VERB_FORMS: dict[str, str] = _build_verb_forms()  # form -> base


def looks_past(low: str) -> bool:
    """Unlisted past forms ("volunteered", "authored"); short or "-eed" words are mostly nouns."""
    return len(low) >= 6 and low.endswith("ed") and not low.endswith("eed") and low not in _NOT_PAST


def looks_ing(low: str) -> bool:
    """Unlisted present participles ("encompassing", "suspending"), not "-ing" nouns."""
    return len(low) >= 6 and low.endswith("ing") and low not in _ING_NOUNS


def verbish(low: str) -> bool:
    return low in VERB_FORMS or low in PARTICIPLE_EXTRA or looks_past(low) or looks_ing(low)
