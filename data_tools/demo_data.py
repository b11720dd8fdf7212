"""Generate the bundled demo datasets: ``demo_sft`` (SFT) and ``demo_prefs`` (DPO preferences).

Usage::

    python -m data_tools.demo_data --output-dir align/bundled [--seed 0]

Everything is written by this script from small hand-written fact tables and computed facts
(arithmetic, letter counts, number comparisons); no external data. The task:

* SFT: a short factual question (no format instruction) -> ONE short plain sentence
  ("What is the capital of France?" -> "The capital of France is Paris.").
* DPO: the same kind of question with a FORMAT INSTRUCTION appended (phrasings imported
  from ``align.evaluation.judges.FORMAT_CONSTRAINTS``) -> chosen obeys the instruction, rejected gives
  the correct answer but ignores it (the plain sentence, a rambling variant, or a near miss).

The train/test split is by fact group: a question that appears in any test file appears in no
train file of either dataset. Every chosen response scores 1.0 and every rejected 0.0 under
``align.evaluation.judges.FormatJudge``; this is asserted before anything is written. Output is
deterministic for a given ``--seed`` and written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from align.core.files import atomic_write
from align.evaluation.judges import FORMAT_CONSTRAINTS, FormatJudge

SOURCE = "align-demo"
SFT_NAME = "demo_sft"
PREFS_NAME = "demo_prefs"
REGENERATE_COMMAND = "python -m data_tools.demo_data --output-dir align/bundled"

TEST_FRACTION = 0.16  # share of fact groups held out per family
PREF_ROWS_PER_QUESTION = 2  # distinct format instructions per question (list questions get one more)
MAX_RAMBLE_WORDS = 25

# --------------------------------------------------------------------------- fact tables

# (country as written mid-sentence, capital). Only capitals that are unambiguous and ASCII.
CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("the United Kingdom", "London"), ("Ireland", "Dublin"),
    ("Belgium", "Brussels"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
    ("the Czech Republic", "Prague"), ("Hungary", "Budapest"), ("Greece", "Athens"),
    ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"), ("Iceland", "Reykjavik"), ("Russia", "Moscow"), ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Slovakia", "Bratislava"),
    ("Slovenia", "Ljubljana"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"), ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Afghanistan", "Kabul"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Turkey", "Ankara"), ("Syria", "Damascus"),
    ("Jordan", "Amman"), ("Lebanon", "Beirut"), ("Qatar", "Doha"), ("Mongolia", "Ulaanbaatar"),
    ("Kazakhstan", "Astana"), ("Uzbekistan", "Tashkent"), ("Cambodia", "Phnom Penh"),
    ("Laos", "Vientiane"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"),
    ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Algeria", "Algiers"),
    ("Tunisia", "Tunis"), ("Senegal", "Dakar"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Jamaica", "Kingston"),
    ("Argentina", "Buenos Aires"), ("Brazil", "Brasilia"), ("Chile", "Santiago"), ("Peru", "Lima"),
    ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Ecuador", "Quito"),
    ("Uruguay", "Montevideo"), ("Australia", "Canberra"), ("New Zealand", "Wellington"),
)  # fmt: skip

# (subject as written mid-sentence, verb, color)
COLORS: tuple[tuple[str, str, str], ...] = (
    ("a ripe banana", "is", "yellow"), ("a lemon", "is", "yellow"), ("grass", "is", "green"),
    ("fresh snow", "is", "white"), ("coal", "is", "black"), ("a ripe tomato", "is", "red"),
    ("a ripe strawberry", "is", "red"), ("a carrot", "is", "orange"), ("a pumpkin", "is", "orange"),
    ("milk", "is", "white"), ("the sky on a clear day", "is", "blue"), ("a lime", "is", "green"),
    ("a cucumber", "is", "green"), ("a polar bear", "is", "white"), ("a crow", "is", "black"),
    ("a flamingo", "is", "pink"), ("an emerald", "is", "green"), ("a ruby", "is", "red"),
    ("a sapphire", "is", "blue"), ("an eggplant", "is", "purple"), ("a blueberry", "is", "blue"),
    ("a raven", "is", "black"), ("cotton", "is", "white"), ("a pea", "is", "green"),
    ("an orange", "is", "orange"), ("a zebra", "is", "black and white"),
    ("a panda", "is", "black and white"), ("table salt", "is", "white"), ("blood", "is", "red"),
    ("charcoal", "is", "black"), ("an egg yolk", "is", "yellow"), ("a canary", "is", "yellow"),
    ("a ripe cherry", "is", "red"), ("a fire truck", "is", "red"), ("a school bus", "is", "yellow"),
    ("lettuce", "is", "green"), ("a broccoli floret", "is", "green"),
    ("ripe corn kernels", "are", "yellow"), ("spinach leaves", "are", "green"),
)  # fmt: skip

# (animal, number of legs)
LEGS: tuple[tuple[str, int], ...] = (
    ("spider", 8), ("scorpion", 8), ("tick", 8), ("crab", 10), ("lobster", 10),
    ("ant", 6), ("bee", 6), ("beetle", 6), ("butterfly", 6), ("housefly", 6), ("grasshopper", 6),
    ("ladybug", 6), ("mosquito", 6), ("cockroach", 6), ("wasp", 6), ("dragonfly", 6),
    ("dog", 4), ("cat", 4), ("horse", 4), ("cow", 4), ("elephant", 4), ("lion", 4), ("tiger", 4),
    ("sheep", 4), ("goat", 4), ("pig", 4), ("rabbit", 4), ("mouse", 4), ("giraffe", 4),
    ("zebra", 4), ("bear", 4), ("fox", 4), ("deer", 4), ("camel", 4), ("wolf", 4), ("donkey", 4),
    ("cheetah", 4), ("frog", 4), ("lizard", 4), ("turtle", 4), ("crocodile", 4),
    ("chicken", 2), ("duck", 2), ("goose", 2), ("ostrich", 2), ("penguin", 2), ("owl", 2),
    ("eagle", 2), ("parrot", 2), ("pigeon", 2), ("swan", 2), ("flamingo", 2),
)  # fmt: skip

# Opposite pairs. ("a", "b", True): asked both ways; False: only "opposite of a" (the
# reverse would be ambiguous, e.g. "short" -> "tall" or "long").
OPPOSITES: tuple[tuple[str, str, bool], ...] = (
    ("hot", "cold", True), ("up", "down", True), ("in", "out", True), ("day", "night", True),
    ("yes", "no", True), ("left", "right", False), ("black", "white", True), ("happy", "sad", True),
    ("fast", "slow", True), ("early", "late", True), ("wet", "dry", True), ("full", "empty", True),
    ("push", "pull", True), ("win", "lose", True), ("open", "closed", True), ("tall", "short", False),
    ("long", "short", False), ("big", "small", True), ("heavy", "light", False), ("rich", "poor", True),
    ("thick", "thin", True), ("strong", "weak", True), ("young", "old", False), ("new", "old", False),
    ("first", "last", True), ("above", "below", True), ("inside", "outside", True),
    ("top", "bottom", True), ("north", "south", True), ("east", "west", True), ("true", "false", True),
    ("alive", "dead", True), ("awake", "asleep", True), ("clean", "dirty", True), ("loud", "quiet", False),
    ("buy", "sell", True), ("give", "take", False), ("love", "hate", True), ("front", "back", False),
    ("remember", "forget", True), ("cheap", "expensive", True), ("wide", "narrow", True),
    ("deep", "shallow", True), ("laugh", "cry", False), ("smooth", "rough", True),
    ("summer", "winter", True), ("near", "far", True), ("always", "never", True),
    ("before", "after", True), ("many", "few", False), ("entrance", "exit", True),
    ("increase", "decrease", True), ("maximum", "minimum", True), ("accept", "reject", True),
    ("success", "failure", True), ("ancient", "modern", False), ("friend", "enemy", True),
    ("arrive", "depart", True), ("sunrise", "sunset", True), ("question", "answer", True),
)  # fmt: skip

# (singular, plural)
PLURALS: tuple[tuple[str, str], ...] = (
    ("mouse", "mice"), ("child", "children"), ("man", "men"), ("woman", "women"), ("tooth", "teeth"),
    ("foot", "feet"), ("goose", "geese"), ("person", "people"), ("ox", "oxen"), ("sheep", "sheep"),
    ("deer", "deer"), ("leaf", "leaves"), ("knife", "knives"), ("wife", "wives"), ("life", "lives"),
    ("wolf", "wolves"), ("half", "halves"), ("shelf", "shelves"), ("loaf", "loaves"),
    ("calf", "calves"), ("thief", "thieves"), ("potato", "potatoes"), ("tomato", "tomatoes"),
    ("hero", "heroes"), ("box", "boxes"), ("fox", "foxes"), ("bus", "buses"), ("church", "churches"),
    ("dish", "dishes"), ("watch", "watches"), ("glass", "glasses"), ("class", "classes"),
    ("baby", "babies"), ("city", "cities"), ("party", "parties"), ("story", "stories"),
    ("lady", "ladies"), ("berry", "berries"), ("puppy", "puppies"), ("day", "days"), ("boy", "boys"),
    ("key", "keys"), ("toy", "toys"), ("monkey", "monkeys"), ("cat", "cats"), ("book", "books"),
    ("tree", "trees"), ("house", "houses"), ("car", "cars"), ("apple", "apples"),
    ("crisis", "crises"), ("analysis", "analyses"), ("criterion", "criteria"),
    ("phenomenon", "phenomena"), ("bench", "benches"), ("brush", "brushes"),
)  # fmt: skip

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
ORDINALS = (
    "first", "second", "third", "fourth", "fifth", "sixth",
    "seventh", "eighth", "ninth", "tenth", "eleventh", "twelfth",
)  # fmt: skip
# Days per month; February (28 or 29) is left out on purpose.
MONTH_DAYS = {
    "January": 31, "March": 31, "April": 30, "May": 31, "June": 30, "July": 31,
    "August": 31, "September": 30, "October": 31, "November": 30, "December": 31,
}  # fmt: skip

# Words whose letters are counted (all lowercase ASCII letters).
LETTER_WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "tree", "book", "fish", "milk", "door", "house", "apple", "water", "chair",
    "table", "green", "happy", "river", "cloud", "bread", "train", "money", "pencil", "window",
    "garden", "orange", "purple", "yellow", "family", "friend", "animal", "school", "banana",
    "doctor", "summer", "winter", "monkey", "rabbit", "planet", "island", "bottle", "candle",
    "kitchen", "picture", "chicken", "weather", "morning", "evening", "library", "teacher",
    "country", "blanket", "holiday", "elephant", "mountain", "computer", "sandwich", "hospital",
    "umbrella", "birthday", "football", "language", "dinosaur", "butterfly", "chocolate",
    "telephone", "adventure", "beautiful", "breakfast", "crocodile", "hamburger", "pineapple",
    "strawberry", "basketball", "helicopter", "everything", "watermelon", "restaurant",
)  # fmt: skip

# (plural noun phrase used in "Name three <noun>.", members). Members keep their natural case.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fruits", ("apple", "banana", "cherry", "grape", "mango", "pear", "peach", "plum", "lemon")),
    ("vegetables", ("carrot", "potato", "onion", "cabbage", "broccoli", "spinach", "lettuce", "celery")),
    ("colors", ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown")),
    ("farm animals", ("cow", "pig", "sheep", "goat", "horse", "chicken", "duck")),
    ("planets", ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")),
    ("continents", ("Africa", "Asia", "Europe", "Antarctica", "Australia", "North America", "South America")),
    ("oceans", ("Pacific Ocean", "Atlantic Ocean", "Indian Ocean", "Arctic Ocean", "Southern Ocean")),
    ("musical instruments", ("piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp")),
    ("sports", ("soccer", "tennis", "basketball", "golf", "swimming", "baseball", "cricket", "hockey")),
    ("shapes", ("circle", "square", "triangle", "rectangle", "oval", "pentagon", "hexagon")),
    ("vehicles", ("car", "bus", "truck", "bicycle", "train", "motorcycle", "van")),
    ("parts of the body", ("head", "arm", "leg", "hand", "foot", "nose", "ear", "eye")),
    ("metals", ("iron", "copper", "gold", "silver", "zinc", "aluminum", "tin", "lead")),
    ("birds", ("eagle", "sparrow", "owl", "parrot", "penguin", "robin", "crow", "swan")),
    ("insects", ("ant", "bee", "butterfly", "beetle", "mosquito", "grasshopper", "wasp")),
    ("pieces of furniture", ("chair", "table", "sofa", "bed", "desk", "wardrobe", "bookshelf")),
    ("items of clothing", ("shirt", "jacket", "hat", "sock", "scarf", "dress", "coat", "skirt")),
    ("days of the week", DAYS),
    ("months of the year", MONTHS),
    ("kitchen utensils", ("spoon", "fork", "knife", "ladle", "whisk", "spatula")),
    ("flowers", ("rose", "tulip", "daisy", "sunflower", "lily", "orchid", "daffodil")),
    ("drinks", ("water", "milk", "tea", "coffee", "juice", "lemonade")),
    ("wild animals", ("lion", "tiger", "elephant", "giraffe", "zebra", "wolf", "bear", "fox")),
    ("weather conditions", ("rain", "snow", "wind", "fog", "hail", "sunshine")),
)  # fmt: skip
LIST_COUNTS = (2, 3, 4, 5)
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}

# (thing, correct class, other class) for "Is a bat a mammal or a bird?"
MEMBERSHIP: tuple[tuple[str, str, str], ...] = (
    ("apple", "fruit", "vegetable"), ("banana", "fruit", "vegetable"), ("grape", "fruit", "vegetable"),
    ("cherry", "fruit", "vegetable"), ("pear", "fruit", "vegetable"), ("peach", "fruit", "vegetable"),
    ("plum", "fruit", "vegetable"), ("mango", "fruit", "vegetable"), ("pineapple", "fruit", "vegetable"),
    ("strawberry", "fruit", "vegetable"), ("watermelon", "fruit", "vegetable"),
    ("kiwi", "fruit", "vegetable"), ("carrot", "vegetable", "fruit"), ("potato", "vegetable", "fruit"),
    ("onion", "vegetable", "fruit"), ("cabbage", "vegetable", "fruit"), ("broccoli", "vegetable", "fruit"),
    ("celery", "vegetable", "fruit"), ("cauliflower", "vegetable", "fruit"), ("radish", "vegetable", "fruit"),
    ("turnip", "vegetable", "fruit"), ("lettuce", "vegetable", "fruit"),
    ("dog", "mammal", "bird"), ("whale", "mammal", "fish"), ("dolphin", "mammal", "fish"),
    ("bat", "mammal", "bird"), ("horse", "mammal", "bird"), ("elephant", "mammal", "reptile"),
    ("seal", "mammal", "fish"), ("kangaroo", "mammal", "bird"), ("eagle", "bird", "mammal"),
    ("sparrow", "bird", "mammal"), ("penguin", "bird", "fish"), ("owl", "bird", "mammal"),
    ("ostrich", "bird", "mammal"), ("parrot", "bird", "reptile"), ("shark", "fish", "mammal"),
    ("salmon", "fish", "mammal"), ("tuna", "fish", "bird"), ("trout", "fish", "reptile"),
    ("snake", "reptile", "mammal"), ("lizard", "reptile", "bird"), ("crocodile", "reptile", "fish"),
    ("turtle", "reptile", "mammal"), ("frog", "amphibian", "reptile"), ("ant", "insect", "mammal"),
    ("bee", "insect", "bird"), ("butterfly", "insect", "bird"), ("spider", "arachnid", "insect"),
)  # fmt: skip

ARITHMETIC_COUNTS = {"plus": 55, "minus": 50, "times": 50}
COMPARISON_COUNT = 60

FAMILIES: dict[str, str] = {
    "capitals": "capital city of a country",
    "colors": "color of a common object",
    "legs": "number of legs of an animal",
    "opposites": "opposite of a word",
    "plurals": "plural of a noun",
    "calendar": "days of the week and months of the year (next, previous, n-th, number of days)",
    "arithmetic": "small addition, subtraction and multiplication (computed)",
    "letters": "number of letters in a word (computed)",
    "comparison": "larger or smaller of two numbers (computed)",
    "membership": "which of two classes something belongs to (fruit or vegetable, mammal or bird, ...)",
    "lists": "name N members of a category (list questions)",
}


# --------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Answer:
    """One realized answer: the plain sentence, the bare answer, and list members if any."""

    sentence: str
    bare: str
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class Question:
    """A question with its answer. ``group`` is the unit of the train/test split."""

    family: str
    group: str
    text: str
    sentence: str = ""
    bare: str = ""
    pool: tuple[str, ...] = ()  # list questions: the members to pick from
    count: int = 0  # list questions: how many members are asked for
    noun: str = ""  # list questions: the plural noun phrase

    @property
    def is_list(self) -> bool:
        return self.count > 0

    def answer(self, rng: random.Random) -> Answer:
        """The answer; list questions draw their members from ``rng``."""
        if not self.is_list:
            return Answer(self.sentence, self.bare)
        members = tuple(rng.sample(self.pool, self.count))
        return Answer(_list_sentence(self.count, self.noun, members), ", ".join(members), members)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _join_and(items: Sequence[str]) -> str:
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return ", ".join(items[:-1]) + f", and {items[-1]}"


def _list_sentence(count: int, noun: str, members: Sequence[str]) -> str:
    return f"{_cap(COUNT_WORDS[count])} {noun} are {_join_and(members)}."


def build_questions(seed: int) -> list[Question]:
    """All questions of every family, in a fixed order (computed families sampled with ``seed``)."""
    rng = random.Random(f"questions-{seed}")
    qs = [*_fact_questions(), *_arithmetic_questions(rng), *_letter_questions(), *_comparison_questions(rng),
          *_membership_and_list_questions()]
    texts = [q.text for q in qs]
    assert len(set(texts)) == len(texts), "duplicate question text"
    assert set(q.family for q in qs) == set(FAMILIES)
    return qs


def _fact_questions() -> list[Question]:
    """Capitals, colors, legs, opposites, plurals and the calendar: one question per table entry."""
    qs: list[Question] = []
    for country, capital in CAPITALS:
        qs.append(Question("capitals", f"capitals:{country}", f"What is the capital of {country}?",
                           f"The capital of {country} is {capital}.", capital))  # fmt: skip

    for subject, verb, color in COLORS:
        qs.append(Question("colors", f"colors:{subject}", f"What color {verb} {subject}?",
                           f"{_cap(subject)} {verb} {color}.", color))  # fmt: skip

    for animal, legs in LEGS:
        qs.append(Question("legs", f"legs:{animal}", f"How many legs does {_article(animal)} have?",
                           f"{_cap(_article(animal))} has {legs} legs.", str(legs)))  # fmt: skip

    for a, b, both_ways in OPPOSITES:
        group = "opposites:" + "/".join(sorted((a, b)))
        pairs = [(a, b), (b, a)] if both_ways else [(a, b)]
        for word, opposite in pairs:
            qs.append(Question("opposites", group, f"What is the opposite of {word}?",
                               f"The opposite of {word} is {opposite}.", opposite))  # fmt: skip

    for singular, plural in PLURALS:
        qs.append(Question("plurals", f"plurals:{singular}", f"What is the plural of {singular}?",
                           f"The plural of {singular} is {plural}.", plural))  # fmt: skip

    for kind, names in (("day", DAYS), ("month", MONTHS)):
        for i, name in enumerate(names):
            nxt = names[(i + 1) % len(names)]
            group = f"calendar:{name}->{nxt}"
            which = "What day" if kind == "day" else "Which month"
            qs.append(Question("calendar", group, f"{which} comes after {name}?",
                               f"The {kind} after {name} is {nxt}.", nxt))  # fmt: skip
            qs.append(Question("calendar", group, f"{which} comes before {nxt}?",
                               f"The {kind} before {nxt} is {name}.", name))  # fmt: skip
    for ordinal, month in zip(ORDINALS, MONTHS):
        qs.append(Question("calendar", f"calendar:month-index:{month}",
                           f"What is the {ordinal} month of the year?",
                           f"The {ordinal} month of the year is {month}.", month))  # fmt: skip
    for month, days in MONTH_DAYS.items():
        qs.append(Question("calendar", f"calendar:days-in:{month}", f"How many days are in {month}?",
                           f"{month} has {days} days.", str(days)))  # fmt: skip
    return qs


def _arithmetic_questions(rng: random.Random) -> list[Question]:
    qs: list[Question] = []
    for op, count in ARITHMETIC_COUNTS.items():
        seen: set[tuple[int, int]] = set()
        while len(seen) < count:
            if op == "plus":
                a, b = rng.randint(2, 30), rng.randint(2, 30)
                key, result = tuple(sorted((a, b))), a + b
            elif op == "minus":
                a = rng.randint(6, 40)
                b = rng.randint(1, a - 1)
                key, result = (a, b), a - b
            else:
                a, b = rng.randint(2, 12), rng.randint(2, 12)
                key, result = tuple(sorted((a, b))), a * b
            if key in seen:
                continue
            seen.add(key)
            qs.append(Question("arithmetic", f"arithmetic:{op}:{key[0]}:{key[1]}", f"What is {a} {op} {b}?",
                               f"{a} {op} {b} equals {result}.", str(result)))  # fmt: skip
    return qs


def _letter_questions() -> list[Question]:
    qs: list[Question] = []
    for word in LETTER_WORDS:
        qs.append(Question("letters", f"letters:{word}", f"How many letters are in the word '{word}'?",
                           f"The word '{word}' has {len(word)} letters.", str(len(word))))  # fmt: skip
    return qs


def _comparison_questions(rng: random.Random) -> list[Question]:
    qs: list[Question] = []
    seen_pairs: set[tuple[int, int]] = set()
    while len(seen_pairs) < COMPARISON_COUNT:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        key = tuple(sorted((a, b)))
        if a == b or key in seen_pairs:
            continue
        seen_pairs.add(key)
        which = rng.choice(("larger", "smaller"))
        value = max(a, b) if which == "larger" else min(a, b)
        qs.append(Question("comparison", f"comparison:{key[0]}:{key[1]}",
                           f"Which number is {which}, {a} or {b}?",
                           f"The {which} number is {value}.", str(value)))  # fmt: skip
    return qs


def _membership_and_list_questions() -> list[Question]:
    qs: list[Question] = []
    for i, (thing, correct, other) in enumerate(MEMBERSHIP):
        first, second = (correct, other) if i % 2 == 0 else (other, correct)
        qs.append(Question("membership", f"membership:{thing}",
                           f"Is {_article(thing)} {_article(first)} or {_article(second)}?",
                           f"{_cap(_article(thing))} is {_article(correct)}.", correct))  # fmt: skip

    for noun, pool in CATEGORIES:
        for count in LIST_COUNTS:
            qs.append(Question("lists", f"lists:{noun}", f"Name {COUNT_WORDS[count]} {noun}.",
                               pool=tuple(pool), count=count, noun=noun))  # fmt: skip
    return qs


def split_questions(questions: Sequence[Question], seed: int) -> tuple[list[Question], list[Question]]:
    """Split by fact group, per family, holding out about `TEST_FRACTION` of each family's groups."""
    rng = random.Random(f"split-{seed}")
    train: list[Question] = []
    test: list[Question] = []
    for family in FAMILIES:
        groups = sorted({q.group for q in questions if q.family == family})
        rng.shuffle(groups)
        n_test = max(2, round(len(groups) * TEST_FRACTION))
        test_groups = set(groups[:n_test])
        for q in questions:
            if q.family == family:
                (test if q.group in test_groups else train).append(q)
    return train, test


# --------------------------------------------------------------------------- responses

_JUDGE = FormatJudge()

# Short on purpose: every token of a rejected response costs DPO compute on a CPU.
RAMBLES: tuple[Callable[[Answer], str], ...] = (
    lambda a: f"Sure! {a.sentence} This is a well-known fact.",
    lambda a: f"Great question. Let me think. {a.sentence} I hope this helps.",
    lambda a: f"{a.sentence} In other words, the answer is {a.bare}.",
    lambda a: f"Well, that is an interesting thing to ask about. {a.sentence}",
)


def _words(text: str) -> int:
    return len(text.split())


def _chosen(key: str, ans: Answer, n: int | None) -> str:
    s = ans.sentence
    if key == "only_answer":
        return ans.bare
    if key == "lowercase":
        return s.lower()
    if key == "uppercase":
        return s.upper()
    if key == "prefix":
        return f"Answer: {s}"
    if key == "exclamation":
        return s[:-1] + "!"
    if key == "quotes":
        return f'"{s}"'
    if key == "bullets":
        return "\n".join(f"- {m}" for m in ans.members)
    if key == "max_words":
        assert n is not None
        return s if _words(s) <= n else ans.bare
    raise KeyError(key)


def _near_misses(key: str, ans: Answer, q: Question, pool_rng: random.Random) -> list[str]:
    """Responses that get the answer right and almost, but not quite, follow the instruction."""
    s, bare = ans.sentence, ans.bare
    if key == "only_answer":
        return [f"The answer is {bare}.", f"It is {bare}.", f"Answer: {bare}"]
    if key == "lowercase":
        return [_cap(s.lower()), s.title()]
    if key == "uppercase":
        return [s.title(), s.replace(bare, bare.upper()) if bare in s else s.title(), _cap(s.lower())]
    if key == "prefix":
        return [f"answer: {s}", f"The answer: {s}", f"{s} Answer: {bare}"]
    if key == "exclamation":
        return [f"Great question! {s}", f"{s[:-1]}! Hope that helps."]
    if key == "quotes":
        quoted = s.replace(bare, f'"{bare}"') if bare in s else f'"{s}'
        return [quoted, f"'{s}'", f'"{s}']
    if key == "bullets":
        members = list(ans.members)
        extra = [m for m in q.pool if m not in members]
        more = members + pool_rng.sample(extra, 1) if extra else members
        fewer = members[:-1]
        return [
            "\n".join(f"{i}. {m}" for i, m in enumerate(members, 1)),
            "\n".join(f"* {m}" for m in members),
            "\n".join(f"- {m}" for m in more),
            "\n".join(f"- {m}" for m in fewer),
            f"Here are {COUNT_WORDS[q.count]} {q.noun}:\n" + "\n".join(f"- {m}" for m in members),
        ]
    if key == "max_words":
        return [f"{s} That is the answer to your question."]
    raise KeyError(key)


def _rejected(key: str, ans: Answer, q: Question, prompt: list[dict], rng: random.Random) -> str:
    """A correct answer that fails the instruction: the plain sentence, a ramble or a near miss."""
    rambles = [r(ans) for r in RAMBLES]
    candidates = {
        "plain": [ans.sentence],
        "ramble": [r for r in rambles if _words(r) <= MAX_RAMBLE_WORDS],
        "near_miss": _near_misses(key, ans, q, rng),
    }
    kinds = ["plain", "ramble", "near_miss"]
    first = rng.choices(kinds, weights=(0.45, 0.25, 0.30))[0]
    for kind in [first] + [k for k in kinds if k != first]:
        options = [c for c in dict.fromkeys(candidates[kind]) if _JUDGE.score_one(prompt, c) == 0.0]
        if options:
            return rng.choice(options)
    raise AssertionError(f"no failing rejected response for {key!r} on {q.text!r}")


def _pick_constraints(q: Question, usage: Counter, rng: random.Random) -> list[str]:
    """Distinct constraints for one question, favoring the least used so far (balanced mix)."""
    kind = "list" if q.is_list else "single"
    applicable = [k for k, c in FORMAT_CONSTRAINTS.items() if c.applies_to in ("any", kind)]
    picked: list[str] = []
    if q.is_list:
        picked.append("bullets")  # every list question trains/tests the list format
    while len(picked) < PREF_ROWS_PER_QUESTION + (1 if q.is_list else 0):
        options = [k for k in applicable if k not in picked]
        low = min(usage[k] for k in options)
        picked.append(rng.choice([k for k in options if usage[k] == low]))
    for k in picked:
        usage[k] += 1
    return picked


def _max_words_n(ans: Answer, rng: random.Random) -> int:
    bare_words = _words(ans.bare)
    return max(bare_words, rng.choice((3, 4, 5, 6, 8, 10)))


def make_preference_rows(questions: Sequence[Question], split: str, seed: int) -> list[dict]:
    """Preference rows (prompt with an appended format instruction, chosen, rejected)."""
    rng = random.Random(f"prefs-{split}-{seed}")
    usage: Counter = Counter()
    rows: list[dict] = []
    for q in questions:
        for key in _pick_constraints(q, usage, rng):
            constraint = FORMAT_CONSTRAINTS[key]
            ans = q.answer(rng)
            n = _max_words_n(ans, rng) if constraint.takes_number else None
            instruction = constraint.render(rng.randrange(len(constraint.phrasings)), n)
            prompt = [{"role": "user", "content": f"{q.text} {instruction}"}]
            chosen = _chosen(key, ans, n)
            rejected = _rejected(key, ans, q, prompt, rng)
            rows.append({
                "id": "",
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "source": SOURCE,
                "_meta": (q.family, key),
            })  # fmt: skip
    rng.shuffle(rows)
    for i, row in enumerate(rows):
        family, key = row.pop("_meta")
        row["id"] = f"demo-prefs-{split}-{i:05d}-{family}-{key}"
    _assert_preferences(rows)
    return rows


def make_sft_rows(questions: Sequence[Question], split: str, seed: int) -> list[dict]:
    """SFT rows: the bare question (no instruction) answered by one plain sentence."""
    rng = random.Random(f"sft-{split}-{seed}")
    rows = []
    for q in questions:
        ans = q.answer(rng)
        rows.append({
            "id": "",
            "messages": [{"role": "user", "content": q.text}, {"role": "assistant", "content": ans.sentence}],
            "source": SOURCE,
            "_family": q.family,
        })  # fmt: skip
    rng.shuffle(rows)
    for i, row in enumerate(rows):
        row["id"] = f"demo-sft-{split}-{i:05d}-{row.pop('_family')}"
    _assert_sft(rows)
    return rows


def _assert_preferences(rows: Sequence[dict]) -> None:
    prompts = [r["prompt"] for r in rows]
    chosen = _JUDGE.score(prompts, [r["chosen"][0]["content"] for r in rows])
    rejected = _JUDGE.score(prompts, [r["rejected"][0]["content"] for r in rows])
    for row, c, r in zip(rows, chosen, rejected):
        assert c == 1.0, f"chosen fails the format judge: {row}"
        assert r == 0.0, f"rejected passes the format judge: {row}"
        assert _words(row["rejected"][0]["content"]) <= MAX_RAMBLE_WORDS, row


def _assert_sft(rows: Sequence[dict]) -> None:
    for row in rows:
        user, assistant = row["messages"]
        assert _JUDGE.score_one(row["messages"][:1], "x") is None, f"SFT prompt carries an instruction: {row}"
        text = assistant["content"]
        assert text.endswith(".") and "\n" not in text and _words(text) <= 25, row


# --------------------------------------------------------------------------- assembling and writing


@dataclass
class DemoData:
    """The generated datasets: ``datasets[name][split]`` is a list of rows."""

    seed: int
    datasets: dict[str, dict[str, list[dict]]]
    train_questions: list[Question] = field(default_factory=list)
    test_questions: list[Question] = field(default_factory=list)


def generate(seed: int = 0) -> DemoData:
    """Build both demo datasets in memory (deterministic for ``seed``)."""
    questions = build_questions(seed)
    train_q, test_q = split_questions(questions, seed)
    assert not {q.group for q in train_q} & {q.group for q in test_q}
    datasets = {
        SFT_NAME: {
            "train": make_sft_rows(train_q, "train", seed),
            "test": make_sft_rows(test_q, "test", seed),
        },
        PREFS_NAME: {
            "train": make_preference_rows(train_q, "train", seed),
            "test": make_preference_rows(test_q, "test", seed),
        },
    }
    test_prompts = [r["prompt"][0]["content"] for r in datasets[PREFS_NAME]["test"]]
    assert len(set(test_prompts)) == len(test_prompts), "duplicate held-out preference prompts"
    return DemoData(seed, datasets, train_q, test_q)


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _family_counts(rows: Sequence[dict]) -> Counter:
    # ids look like demo-<kind>-<split>-<index>-<family>[-<constraint>]
    return Counter(row["id"].split("-")[4] for row in rows)


def _constraint_counts(rows: Sequence[dict]) -> Counter:
    return Counter(row["id"].split("-", 5)[5] for row in rows)


def _card_header(title: str, summary: str) -> list[str]:
    return [
        "---",
        "license: apache-2.0",
        "language:",
        "- en",
        "pretty_name: " + json.dumps(title),  # quoted: the title contains ':'
        "---",
        "",
        f"# {title}",
        "",
        summary,
        "",
    ]


def _families_table(data: DemoData, dataset: str) -> list[str]:
    train = _family_counts(data.datasets[dataset]["train"])
    test = _family_counts(data.datasets[dataset]["test"])
    lines = ["| family | what it asks | train rows | test rows |", "| --- | --- | ---: | ---: |"]
    for family, what in FAMILIES.items():
        lines.append(f"| `{family}` | {what} | {train[family]} | {test[family]} |")
    return lines


def _common_sections(data: DemoData) -> list[str]:
    n_train_q, n_test_q = len(data.train_questions), len(data.test_questions)
    return [
        "## How it was made",
        "",
        "Generated, not collected: every question and answer is written or computed by",
        "`data_tools/demo_data.py` from small hand-written fact tables (country capitals, colors of",
        "common objects, animal leg counts, opposites, plurals, days and months, categories with",
        "members) and computed facts (small arithmetic, letter counts, number comparisons).",
        "Regenerate (byte-identical for the same seed) with:",
        "",
        "```bash",
        f"{REGENERATE_COMMAND}  # --seed {data.seed}",
        "```",
        "",
        "The demo SFT and preference datasets are generated together and split the same way: by",
        f"fact group, per family ({n_train_q} train questions, {n_test_q} test questions). A question",
        "(or its reverse, e.g. 'opposite of hot' / 'opposite of cold') that appears in any test file",
        "appears in no train file of either dataset, so held-out prompts are unseen questions.",
        "",
        "Format: JSONL, UTF-8, one row per line, conversational (TRL) messages, no system messages.",
        "Row ids are `demo-<sft|prefs>-<split>-<index>-<family>[-<constraint>]`.",
        "",
    ]


def _license_section() -> list[str]:
    return [
        "## License",
        "",
        "Apache-2.0. Generated by this project; contains no third-party data.",
        "",
    ]


def sft_card(data: DemoData) -> str:
    rows = data.datasets[SFT_NAME]
    lines = _card_header(
        "align demo SFT: short factual answers",
        "Teaches a small chat model (default: SmolLM2-135M-Instruct) to answer a short factual "
        "question with ONE short plain sentence, e.g. *What is the capital of France?* -> *The capital "
        "of France is Paris.* Questions carry no format instruction (that is the job of the companion "
        "preference dataset `demo_prefs`).",
    )
    lines += [
        "## Splits",
        "",
        "| split | rows |",
        "| --- | ---: |",
        f"| train | {len(rows['train'])} |",
        f"| test | {len(rows['test'])} |",
        "",
        "## Row format",
        "",
        "```json",
        json.dumps(rows["train"][0], ensure_ascii=False),
        "```",
        "",
        "## Families",
        "",
        *_families_table(data, SFT_NAME),
        "",
        *_common_sections(data),
        *_license_section(),
    ]
    return "\n".join(lines)


def prefs_card(data: DemoData) -> str:
    rows = data.datasets[PREFS_NAME]
    train_c, test_c = _constraint_counts(rows["train"]), _constraint_counts(rows["test"])
    lines = _card_header(
        "align demo preferences: follow the format instruction",
        "Teaches a small chat model (default: SmolLM2-135M-Instruct, after SFT on `demo_sft`) to obey "
        "an explicit FORMAT INSTRUCTION appended to a short factual question. *chosen* is the correct "
        "answer in the requested format; *rejected* is the correct answer ignoring the format: the "
        "plain one-sentence answer, a rambling variant (at most "
        f"{MAX_RAMBLE_WORDS} words) or a near miss (e.g. `answer:` instead of `Answer:`, a numbered "
        "list instead of `- ` bullets, one item too many).",
    )
    lines += [
        "## Splits",
        "",
        "| split | rows | distinct prompts |",
        "| --- | ---: | ---: |",
    ]
    for split in ("train", "test"):
        distinct = len({r["prompt"][0]["content"] for r in rows[split]})
        lines.append(f"| {split} | {len(rows[split])} | {distinct} |")
    lines += [
        "",
        "## Row format",
        "",
        "```json",
        json.dumps(rows["train"][0], ensure_ascii=False),
        "```",
        "",
        "## Format instructions (constraints)",
        "",
        "Each prompt is `<question> <instruction>`. The phrasings and checks live in one table,",
        "`align.evaluation.judges.FORMAT_CONSTRAINTS`; the generator imports it, and `align.evaluation.judges.FormatJudge`",
        "(`load_judge('format')`) scores a response 1.0 if it obeys the instruction, 0.0 if not.",
        "Every chosen response scores 1.0 and every rejected one 0.0 (asserted at generation).",
        "",
        "| constraint | check | phrasings | train rows | test rows |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for key, c in FORMAT_CONSTRAINTS.items():
        phrasings = "<br>".join(f"`{p}`" for p in c.phrasings)
        note = {"any": "", "list": " (list questions only)", "single": " (single-answer questions only)"}[c.applies_to]
        lines.append(f"| `{key}` | {c.description}{note} | {phrasings} | {train_c[key]} | {test_c[key]} |")
    lines += [
        "",
        "Responses are stripped of surrounding whitespace before checking; an empty response fails",
        "every constraint. `{n}` in a phrasing is a number written in digits.",
        "",
        "## Families",
        "",
        *_families_table(data, PREFS_NAME),
        "",
        *_common_sections(data),
        *_license_section(),
    ]
    return "\n".join(lines)


def write_demo_data(output_dir: str | os.PathLike, seed: int = 0) -> DemoData:
    """Generate both datasets and write ``<output_dir>/{demo_sft,demo_prefs}/{train,test}.jsonl`` + README.md."""
    data = generate(seed)
    out = Path(output_dir)
    files: dict[Path, str] = {}
    for name, splits in data.datasets.items():
        for split, rows in splits.items():
            files[out / name / f"{split}.jsonl"] = _jsonl(rows)
    files[out / SFT_NAME / "README.md"] = sft_card(data)
    files[out / PREFS_NAME / "README.md"] = prefs_card(data)
    atomic_write(files)  # all or none
    return data


def summary_line(data: DemoData, output_dir: str | os.PathLike) -> str:
    counts = ", ".join(
        f"{name}/{split}={len(rows)}" for name, splits in data.datasets.items() for split, rows in splits.items()
    )
    return (
        f"wrote {counts} to {output_dir} (seed {data.seed}; "
        f"{len(data.train_questions)} train / {len(data.test_questions)} test questions)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.demo_data",
        description="Generate the bundled demo datasets demo_sft and demo_prefs.",
    )
    parser.add_argument("--output-dir", required=True, help="Directory to write demo_sft/ and demo_prefs/ into.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed (default 0).")
    args = parser.parse_args(argv)
    data = write_demo_data(args.output_dir, args.seed)
    print(summary_line(data, args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
