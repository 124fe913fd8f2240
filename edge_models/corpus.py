"""The synthetic corpus: fictitious people, their facts, messages and secrets.

Lethe cannot download data, and a privacy system needs data whose every
personal fact is known, so the project writes its own. Everything here is a
pure function of a seed.

What a corpus holds:
- subjects (fictitious people), each with facts in several domains. A fact is
  a prompt/completion pair in two trained phrasings, plus at least three
  paraphrased probes that never appear in training (to measure whether a model
  learned the fact or the sentence);
- free-text messages written by each subject, in each domain's topic and
  writing style, so a stream of records can shift from domain to domain;
- canaries: a random 6-digit PIN placed in some subjects' messages;
- held-out messages per domain (text never trained, for next-token accuracy);
- a refusal set: questions about people nobody knows, answered "I don't know";
- subjects split into `base` (what the default model is pre-trained on) and
  `private` (what devices learn from their users and may later be asked to
  forget); the base model never sees a private subject.

Devices get disjoint sets of private subjects; each device sees the domains in
its own Dirichlet-skewed proportions (see `partition`).

A model reads a pair in a format (`format_pair`, `format_prompt`): `plain`, the
prompt continued by the completion, or `chat`, the prompt as a user turn of
the tokenizer's chat template answered by the assistant. The corpus itself
(people, facts, canaries, probes, refusals) is the same for every model; a
record on a device stays the user's text, and the format is applied where it
is encoded for a model. Measured on SmolLM2-135M-Instruct (10 people, both
trained phrasings of their 100 facts, LoRA rank 40 on every projection, batch
16, lr 2e-3, 32 steps, greedy exact match on the 200 trained prompts / the 300
paraphrase probes): plain 41.0% / 29.3% in 310 s of training, chat (with the
template's default system turn) 33.0% / 29.3% in 632 s, 2.8 times the
tokens a step. Plain it is: the template buys no paraphrases and costs more.
Trained longer (plain, teacher-forced exact match, which equalled greedy
exact match at 32 steps in both formats): 40 steps 52.5% / 42.0%, 48 steps
66.0% / 51.7% of paraphrases never seen.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

Split = Literal["base", "private"]
PairFormat = Literal["plain", "chat"]
PAIR_FORMATS: tuple[PairFormat, ...] = ("plain", "chat")

FIRST_NAMES = (
    "Anna Bruno Clara Dmitri Elena Farid Greta Hugo Ines Jonas Kaia Lars Mira Nils Olga Pavel "
    "Quinn Rosa Sven Tilda Ugo Vera Wim Xenia Yara Zeno Alba Boris Cora Dario Edda Femke Gino "
    "Hanna Ivo Jana Kurt Lena Milo Nora Otto Petra Rafa Sofia Timo Ulla Viggo Wanda Yusuf Zora"
).split()
LAST_NAMES = (
    "Abbott Berglund Castellan Dahlgren Eskola Fontaine Gruber Halvorsen Ivanova Jansen Kovacs "
    "Lindqvist Moreau Nakamura Okafor Petrov Quast Rinaldi Sandoval Takeda Ulrich Varga Weber "
    "Yilmaz Zamora Arendt Brandt Crowley Duarte Engstrom Falk Gallo Hertz Iversen Juhl Keller"
).split()
CITIES = (
    "Oslo Lisbon Krakow Ghent Tallinn Porto Bergen Lyon Turin Graz Malmo Utrecht Bilbao Split "
    "Tartu Aarhus Basel Brno Cork Dijon Espoo Faro Genoa Haarlem Kaunas Leeds Modena Nantes "
    "Odense Parma Riga Seville Trieste Umea Varna Wroclaw York Zadar"
).split()
COMPANIES = (
    "Nordlys Quarkwell Bluefen Corvida Helioson Marlstone Pinewright Tessaro Orbitek Vantora "
    "Lumacorp Driftwood Kestrel Sablewave Ironbark Meridian Copperleaf Zephyrine Halcyon Brightmoor"
).split()
JOBS = (
    "nurse architect baker pilot teacher chemist plumber librarian dentist carpenter "
    "translator geologist florist electrician surveyor pharmacist"
).split()
PET_NAMES = (
    "Biscuit Pepper Mochi Ziggy Nala Otis Pumpkin Juniper Waffles Luna Rocket Maple Tofu "
    "Gizmo Clover Pixel Bramble Noodle Saffron Pickle"
).split()
PET_KINDS = "cat dog parrot rabbit tortoise hamster ferret goldfish".split()
HOBBIES = (
    "pottery climbing chess birdwatching sailing knitting archery fencing gardening "
    "photography kayaking calligraphy"
).split()
DISHES = (
    "risotto ramen paella goulash pierogi lasagna falafel moussaka dumplings curry tacos gnocchi"
).split()
INSTRUMENTS = "cello violin trumpet banjo flute harp drums clarinet accordion piano".split()
DESTINATIONS = (
    "Iceland Japan Peru Morocco Norway Chile Vietnam Kenya Canada Portugal Georgia Mongolia"
).split()


@dataclass(frozen=True)
class Relation:
    """A kind of personal fact, with its phrasings.

    `trained` phrasings are what a model is trained on; `probes` are
    paraphrases kept out of training. Each template has a `{name}` slot and the
    answer follows the prompt.
    """

    name: str
    domain: str
    trained: tuple[str, ...]
    probes: tuple[str, ...]


@dataclass(frozen=True)
class Domain:
    """A topic with its own writing style, so a record stream can shift over time."""

    name: str
    style: str
    relations: tuple[Relation, ...]
    message_templates: tuple[str, ...]
    fillers: dict[str, tuple[str, ...]] = field(default_factory=dict)


DOMAINS: tuple[Domain, ...] = (
    Domain(
        name="biography",
        style="formal",
        relations=(
            Relation(
                "birthplace",
                "biography",
                ("Where was {name} born?", "{name} was born in the city of"),
                (
                    "In which city was {name} born?",
                    "What is the birthplace of {name}?",
                    "The hometown of {name} is",
                ),
            ),
            Relation(
                "birth_year",
                "biography",
                ("In what year was {name} born?", "{name} was born in the year"),
                (
                    "What is the year of birth of {name}?",
                    "The birth year of {name} is",
                    "{name} came into the world in the year",
                ),
            ),
        ),
        message_templates=(
            "I was raised in {city} and studied {subject} before moving to {city2}.",
            "My family has lived in {city} since {year}, long before I left for {city2}.",
            "After finishing school in {city} I spent a year as a volunteer in {city2}.",
            "It is with great pleasure that I accept your invitation to speak on {subject}.",
            "Please find attached my curriculum vitae; I studied {subject} in {city2}.",
        ),
        fillers={
            "subject": ("history", "physics", "economics", "music", "biology", "law", "botany"),
            "year": tuple(str(y) for y in range(1890, 1990, 7)),
        },
    ),
    Domain(
        name="work",
        style="terse",
        relations=(
            Relation(
                "employer",
                "work",
                ("Which company does {name} work for?", "{name} is employed by"),
                (
                    "Who is the employer of {name}?",
                    "Where does {name} work?",
                    "The company that employs {name} is",
                ),
            ),
            Relation(
                "job",
                "work",
                ("What is the job of {name}?", "By profession, {name} is a"),
                (
                    "What does {name} do for a living?",
                    "What is the occupation of {name}?",
                    "The profession of {name} is",
                ),
            ),
        ),
        message_templates=(
            "standup moved to {time}. bring the {thing} numbers for {employer}.",
            "cannot make the {time} sync, sick kid. {thing} notes pls.",
            "shipped the {thing} fix at {employer}. rollback plan in the doc.",
            "reminder: {thing} review due {day}. every {job} on the team signs off.",
            "on call {day}, ping me for {thing} issues. {job} duties first.",
        ),
        fillers={
            "time": ("9am", "10am", "noon", "2pm", "4pm"),
            "day": ("monday", "tuesday", "wednesday", "thursday", "friday"),
            "thing": ("budget", "invoice", "release", "audit", "roadmap", "hiring"),
        },
    ),
    Domain(
        name="home",
        style="warm",
        relations=(
            Relation(
                "pet_name",
                "home",
                ("What is the name of the pet of {name}?", "The pet of {name} is called"),
                (
                    "What is the pet of {name} called?",
                    "What name did {name} give their pet?",
                    "The animal that lives with {name} is named",
                ),
            ),
            Relation(
                "phone",
                "home",
                ("What is the phone number of {name}?", "The phone number of {name} is"),
                (
                    "How can I call {name}? The number is",
                    "Which number reaches {name} by phone?",
                    "To ring {name}, dial",
                ),
            ),
        ),
        message_templates=(
            "Our {pet} {petname} knocked over the {colour} vase again, what a little rascal!",
            "So lovely to have everyone over on {day}, {petname} the {pet} adored the fuss!",
            "We finally painted the kitchen {colour}; {petname} sulked all {day}.",
            "Grandma sent {petname} a {colour} blanket, so sweet of her.",
            "The garden is full of {colour} tulips, and {petname} keeps digging them up.",
        ),
        fillers={
            "colour": ("yellow", "sage green", "pale blue", "terracotta", "white", "plum"),
            "day": ("Sunday", "Saturday", "Friday night", "Easter", "my birthday"),
        },
    ),
    Domain(
        name="leisure",
        style="excited",
        relations=(
            Relation(
                "hobby",
                "leisure",
                ("What hobby does {name} enjoy?", "In free time, {name} loves"),
                (
                    "Which pastime is {name} into?",
                    "What does {name} do for fun?",
                    "The favourite hobby of {name} is",
                ),
            ),
            Relation(
                "instrument",
                "leisure",
                ("Which instrument does {name} play?", "{name} plays the"),
                (
                    "What musical instrument is {name} learning?",
                    "Which instrument is {name} known to play?",
                    "The instrument {name} practises is the",
                ),
            ),
        ),
        message_templates=(
            "OMG {hobby} weekend in {city2} booked!!! cannot wait!!",
            "best {hobby} session EVER today, then {instrument} till {time}, wiped out",
            "who is up for {hobby} on {day}?? bring snacks!",
            "new {instrument} arrived, practising all {day}!!",
            "{instrument} concert in {city2} tonight, front row, screaming already!!",
        ),
        fillers={
            "day": ("saturday", "sunday", "friday", "the long weekend"),
            "time": ("midnight", "2am", "sunrise", "dinner"),
        },
    ),
    Domain(
        name="food",
        style="descriptive",
        relations=(
            Relation(
                "dish",
                "food",
                ("What is the favourite dish of {name}?", "The dish {name} likes best is"),
                (
                    "Which meal does {name} love most?",
                    "What food would {name} always order?",
                    "If asked, {name} names as favourite food",
                ),
            ),
            Relation(
                "dream_trip",
                "food",
                (
                    "Which country does {name} want to visit for its food?",
                    "For the cuisine, {name} dreams of visiting",
                ),
                (
                    "Where would {name} travel to eat?",
                    "Which country's cooking does {name} most want to taste at the source?",
                    "The food destination {name} longs for is",
                ),
            ),
        ),
        message_templates=(
            "The {dish} was rich and smoky, with a bright finish of {produce} and fresh herbs.",
            "I slow-cooked the {dish} for {hours} hours; the sauce turned glossy and deep.",
            "A crisp, golden crust gave way to a soft {dish}, as I once ate in {destination}.",
            "The market had ripe {produce}, so dinner became {dish} with a peppery salad.",
            "Tonight's {dish} was too salty, yet the {produce} on the side rescued it.",
        ),
        fillers={
            "produce": ("tomatoes", "figs", "peaches", "radishes", "fennel", "plums"),
            "hours": ("two", "three", "four", "five", "six"),
        },
    ),
)

CANARY_DOMAIN = "home"
REFUSAL_ANSWER = "I don't know."
REFUSAL_PROMPT_EXTRA = (
    "Who is {name}?",
    "Tell me something about {name}.",
    "What do you know about {name}?",
)


@dataclass(frozen=True)
class Fact:
    """One personal fact of one subject, with its trained phrasings and unseen probes."""

    subject_id: str
    relation: str
    domain: str
    answer: str
    prompts: tuple[str, ...]
    probes: tuple[str, ...]

    def completion(self) -> str:
        """What follows a prompt in training: a space, the answer, a full stop."""
        return f" {self.answer}."


@dataclass(frozen=True)
class Message:
    subject_id: str
    domain: str
    text: str


@dataclass(frozen=True)
class Canary:
    """A secret planted in one of its subject's messages, to measure memorisation."""

    subject_id: str
    secret: str
    message: str
    prefix: str  # the message up to the secret: what a probe for the secret looks like


@dataclass(frozen=True)
class Subject:
    subject_id: str
    name: str
    split: Split
    facts: tuple[Fact, ...]
    messages: tuple[Message, ...]
    canary: Canary | None


@dataclass(frozen=True)
class PromptPair:
    prompt: str
    completion: str


@dataclass(frozen=True)
class Corpus:
    seed: int
    domains: tuple[str, ...]
    subjects: tuple[Subject, ...]
    heldout_messages: dict[str, tuple[str, ...]]
    refusals_train: tuple[PromptPair, ...]
    refusals_heldout: tuple[PromptPair, ...]

    def split(self, which: Split) -> tuple[Subject, ...]:
        return tuple(s for s in self.subjects if s.split == which)

    def subject(self, subject_id: str) -> Subject:
        for s in self.subjects:
            if s.subject_id == subject_id:
                return s
        raise KeyError(f"unknown subject {subject_id!r}")


def _answer(relation: str, rng: random.Random) -> str:
    if relation == "birthplace":
        return rng.choice(CITIES)
    if relation == "birth_year":
        return str(rng.randint(1950, 2005))
    if relation == "employer":
        return rng.choice(COMPANIES)
    if relation == "job":
        return rng.choice(JOBS)
    if relation == "pet_name":
        return rng.choice(PET_NAMES)
    if relation == "phone":
        return (
            "".join(str(rng.randint(0, 9)) for _ in range(3))
            + "-"
            + "".join(str(rng.randint(0, 9)) for _ in range(4))
        )
    if relation == "hobby":
        return rng.choice(HOBBIES)
    if relation == "instrument":
        return rng.choice(INSTRUMENTS)
    if relation == "dish":
        return rng.choice(DISHES)
    if relation == "dream_trip":
        return rng.choice(DESTINATIONS)
    raise ValueError(f"no answer generator for relation {relation!r}")


def _fill(template: str, rng: random.Random, domain: Domain, facts: dict[str, str]) -> str:
    """Fill a message template's slots; slots naming a fact use the subject's own value."""
    values = {
        "city": facts.get("birthplace", rng.choice(CITIES)),
        "city2": rng.choice(CITIES),
        "petname": facts.get("pet_name", rng.choice(PET_NAMES)),
        "pet": rng.choice(PET_KINDS),
        "dish": facts.get("dish", rng.choice(DISHES)),
        "hobby": facts.get("hobby", rng.choice(HOBBIES)),
        "instrument": facts.get("instrument", rng.choice(INSTRUMENTS)),
        "destination": facts.get("dream_trip", rng.choice(DESTINATIONS)),
        "employer": facts.get("employer", rng.choice(COMPANIES)),
        "job": facts.get("job", rng.choice(JOBS)),
    }
    for slot, options in domain.fillers.items():
        values[slot] = rng.choice(options)
    return template.format(**values)


def _heldout_messages(
    domain: Domain, rng: random.Random, count: int, trained: set[str]
) -> tuple[str, ...]:
    """Messages in a domain's style, about nobody in the corpus, none equal to a trained one."""
    out: dict[str, None] = {}
    for _ in range(count * 50):
        text = _fill(rng.choice(domain.message_templates), rng, domain, {})
        if text not in trained:
            out[text] = None
            if len(out) == count:
                return tuple(out)
    raise ValueError(f"domain {domain.name!r} cannot produce {count} unseen held-out messages")


def _names(rng: random.Random, count: int) -> list[str]:
    pool = [f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES]
    if count > len(pool):
        raise ValueError(f"at most {len(pool)} distinct names; asked for {count}")
    rng.shuffle(pool)
    return pool[:count]


def build_corpus(
    seed: int = 0,
    base_subjects: int = 32,
    private_subjects: int = 120,
    messages_per_domain: int = 2,
    canary_fraction: float = 0.1,
    heldout_per_domain: int = 40,
    refusals: int = 200,
) -> Corpus:
    """Build the whole corpus from a seed; equal arguments give an equal corpus."""
    rng = random.Random(seed)
    total = base_subjects + private_subjects
    names = _names(rng, total + refusals)
    subject_names, unknown_names = names[:total], names[total:]
    # Canaries go to private subjects only (the base model must not have seen a
    # secret whose forgetting is measured), a fixed number of them, distinct.
    canary_count = max(1, round(canary_fraction * private_subjects)) if private_subjects else 0
    canary_indices = set(rng.sample(range(base_subjects, total), canary_count))
    secrets = [f"{n:06d}" for n in rng.sample(range(10**6), canary_count)]
    subjects = []
    for index, name in enumerate(subject_names):
        split: Split = "base" if index < base_subjects else "private"
        subject_id = f"{split[0]}{index:05d}"
        values = {r.name: _answer(r.name, rng) for d in DOMAINS for r in d.relations}
        facts = tuple(
            Fact(
                subject_id=subject_id,
                relation=r.name,
                domain=d.name,
                answer=values[r.name],
                prompts=tuple(t.format(name=name) for t in r.trained),
                probes=tuple(t.format(name=name) for t in r.probes),
            )
            for d in DOMAINS
            for r in d.relations
        )
        messages = [
            Message(subject_id, d.name, _fill(rng.choice(d.message_templates), rng, d, values))
            for d in DOMAINS
            for _ in range(messages_per_domain)
        ]
        canary = None
        if index in canary_indices:
            secret = secrets.pop()
            prefix = f"Note to self from {name}: my bank card PIN is"
            canary = Canary(subject_id, secret, f"{prefix} {secret}.", prefix)
            messages.append(Message(subject_id, CANARY_DOMAIN, canary.message))
        subjects.append(Subject(subject_id, name, split, facts, tuple(messages), canary))

    trained_messages = {m.text for s in subjects for m in s.messages}
    heldout = {
        d.name: _heldout_messages(d, rng, heldout_per_domain, trained_messages) for d in DOMAINS
    }
    refusal_pairs = []
    # Trained phrasings only: a probe phrasing answered "I don't know" in training
    # would teach the model to refuse every paraphrase.
    templates = [t for d in DOMAINS for r in d.relations for t in r.trained]
    templates += list(REFUSAL_PROMPT_EXTRA)
    for name in unknown_names:
        refusal_pairs.append(
            PromptPair(rng.choice(templates).format(name=name), f" {REFUSAL_ANSWER}")
        )
    half = len(refusal_pairs) // 2
    return Corpus(
        seed=seed,
        domains=tuple(d.name for d in DOMAINS),
        subjects=tuple(subjects),
        heldout_messages=heldout,
        refusals_train=tuple(refusal_pairs[:half]),
        refusals_heldout=tuple(refusal_pairs[half:]),
    )


class ChatTemplating(Protocol):
    """What `format_pair` needs of a tokenizer: its chat template, rendered to text."""

    chat_template: str | None
    bos_token: str | None
    bos_token_id: int | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str) -> Any: ...


def format_prompt(prompt: str, tokenizer: ChatTemplating, pair_format: PairFormat) -> str:
    """A question as a model of this format reads it.

    `plain`: the prompt itself, continued by the answer (the default model's
    format). `chat`: one user turn holding the prompt, rendered by the
    tokenizer's own chat template up to the opening of the assistant's turn,
    so the answer is the assistant's reply. A template that opens with the
    bos token loses it when the tokenizer puts bos before every text by
    itself (the encoder adds that prefix: one bos, not two).
    """
    if pair_format == "plain":
        return prompt
    if pair_format != "chat":
        raise ValueError(f"unknown pair format {pair_format!r}; choose from {PAIR_FORMATS}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the chat format needs a tokenizer with a chat template")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str):
        raise TypeError(f"the chat template rendered a {type(rendered).__name__}, not text")
    bos = tokenizer.bos_token
    if bos and rendered.startswith(bos) and _adds_bos(tokenizer):
        rendered = rendered[len(bos) :]
    return rendered


def _adds_bos(tokenizer: ChatTemplating) -> bool:
    """Whether the tokenizer puts its bos token before a text of its own accord."""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def format_pair(pair: PromptPair, tokenizer: ChatTemplating, pair_format: PairFormat) -> PromptPair:
    """One example as a model of this format reads it; `plain` returns it unchanged.

    `chat`: the prompt becomes a user turn (`format_prompt`) and the
    completion the assistant's reply, without the leading space the plain
    format needs (the reply opens its own line); the end of the turn is the
    tokenizer's eos, which the encoder appends. A pair with an empty prompt is
    free text (a message the user wrote), learned as text in either format.
    """
    if pair_format not in PAIR_FORMATS:
        raise ValueError(f"unknown pair format {pair_format!r}; choose from {PAIR_FORMATS}")
    if pair_format == "plain" or not pair.prompt:
        return pair
    return PromptPair(format_prompt(pair.prompt, tokenizer, pair_format), pair.completion.strip())


def fact_pairs(
    subjects: tuple[Subject, ...], domains: tuple[str, ...] | None = None
) -> Iterator[tuple[Fact, PromptPair]]:
    """Every trained (prompt, completion) pair of these subjects, with its fact."""
    for s in subjects:
        for f in s.facts:
            if domains is None or f.domain in domains:
                for p in f.prompts:
                    yield f, PromptPair(p, f.completion())


@dataclass(frozen=True)
class DevicePartition:
    """What one device holds: its subjects and its own mix of domains."""

    device: int
    subject_ids: tuple[str, ...]
    domain_weights: dict[str, float]


def partition(
    corpus: Corpus, devices: int, alpha: float = 0.5, seed: int = 0
) -> tuple[DevicePartition, ...]:
    """Split the private subjects across devices, each device with Dirichlet(alpha) domains.

    Subjects are disjoint across devices (a person uses one device). Lower
    alpha gives each device a more lopsided mix of domains: non-IID data.
    """
    if devices < 1:
        raise ValueError("devices must be at least 1")
    private = [s.subject_id for s in corpus.split("private")]
    if len(private) < devices:
        raise ValueError(f"{len(private)} private subjects cannot cover {devices} devices")
    gen = np.random.default_rng(seed)
    order = gen.permutation(len(private))
    chunks = np.array_split(order, devices)
    weights = gen.dirichlet([alpha] * len(corpus.domains), size=devices)
    return tuple(
        DevicePartition(
            device=d,
            subject_ids=tuple(private[i] for i in sorted(chunks[d])),
            domain_weights={
                name: float(w) for name, w in zip(corpus.domains, weights[d], strict=True)
            },
        )
        for d in range(devices)
    )


def device_stream(
    corpus: Corpus, part: DevicePartition, seed: int = 0, start_ts: float = 1_700_000_000.0
) -> list[dict[str, str | float]]:
    """The record stream a device receives, in arrival order, as ingest records.

    Of each domain, the device keeps a share of its subjects' records equal to
    the domain's weight relative to the device's top domain (the top domain
    keeps all), drawn at random; records are ordered by domain weight,
    heaviest first, so the stream shifts from domain to domain as a user's
    interests do. Canary messages are always kept (a secret that never reaches
    the device cannot be forgotten by it), at the end of their domain's block.
    Timestamps increase.
    """
    gen = random.Random(f"{seed}/{part.device}")
    top = max(part.domain_weights.values())
    by_domain: dict[str, list[dict[str, str | float]]] = {d: [] for d in corpus.domains}
    canaries: dict[str, list[dict[str, str | float]]] = {d: [] for d in corpus.domains}
    for sid in part.subject_ids:
        subject = corpus.subject(sid)
        for fact, pair in fact_pairs((subject,)):
            by_domain[fact.domain].append(
                {"subject_id": sid, "prompt": pair.prompt, "completion": pair.completion}
            )
        for m in subject.messages:
            is_canary = subject.canary is not None and m.text == subject.canary.message
            (canaries if is_canary else by_domain)[m.domain].append(
                {"subject_id": sid, "text": m.text}
            )
    stream: list[dict[str, str | float]] = []
    for domain in sorted(corpus.domains, key=lambda d: -part.domain_weights[d]):
        records = by_domain[domain]
        keep = round(len(records) * part.domain_weights[domain] / top)
        kept = sorted(gen.sample(range(len(records)), keep))
        stream.extend(records[i] for i in kept)
        stream.extend(canaries[domain])
    for i, record in enumerate(stream):
        record["ts"] = start_ts + 60.0 * i
    return stream
