"""Built-in instruction conversations with verifiable answers (no download).

Task families, each a prompt template and an exact answer:
- `repeat`: say a made-up word back;
- `uppercase`, `reverse`: edit a short word;
- `count`: how many times a letter occurs in a word of three distinct letters;
- `sort`: sort three to five small numbers;
- `add`: add two numbers below 100, half of them with `<think>` working before the answer;
- `capital`: the capital of a country from a fixed table (facts are memorised, not reasoned).

`examples(count, seed)` is deterministic. Held-out sets come from another seed with every
prompt that also occurs in the training set removed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from jaxllm.errors import DataError

NAME = "builtin"  # the data.path that names these tasks
FAMILIES = ("repeat", "uppercase", "reverse", "count", "sort", "add", "capital")

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Canada": "Ottawa",
    "Chile": "Santiago",
    "India": "New Delhi",
    "China": "Beijing",
    "Russia": "Moscow",
    "Greece": "Athens",
    "Cuba": "Havana",
}

SYSTEM = "You are a helpful assistant. Answer with the answer only."


@dataclass(frozen=True)
class Example:
    family: str
    prompt: str
    answer: str
    thinking: str | None = None

    def messages(self, with_system: bool) -> list[dict[str, str]]:
        reply = (
            self.answer
            if self.thinking is None
            else (f"<think>{self.thinking}</think>{self.answer}")
        )
        conversation = [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": reply},
        ]
        return ([{"role": "system", "content": SYSTEM}] if with_system else []) + conversation


def _word(rng: random.Random, low: int = 3, high: int = 6) -> str:
    consonants, vowels = "bcdfghjklmnprstvz", "aeiou"
    length = rng.randint(low, high)
    return "".join(rng.choice(vowels if i % 2 else consonants) for i in range(length))


def _addition_working(a: int, b: int) -> str:
    ones = a % 10 + b % 10
    tens = a // 10 + b // 10 + ones // 10
    return f"{a % 10}+{b % 10}={ones}, {a // 10}+{b // 10}+{ones // 10}={tens}"


def make_example(family: str, rng: random.Random) -> Example:
    if family == "repeat":
        word = _word(rng)
        return Example(family, f"Say '{word}' back to me.", word)
    if family == "uppercase":
        word = _word(rng)
        return Example(family, f"Write '{word}' in capital letters.", word.upper())
    if family == "reverse":
        word = _word(rng)
        return Example(family, f"Reverse the letters of '{word}'.", word[::-1])
    if family == "count":
        # Few distinct letters, so counts spread over 0..5 and no constant answer does well.
        alphabet = rng.sample("abcdefghijklmnop", 3)
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 8)))
        letter = rng.choice(alphabet)
        return Example(
            family, f"How many times does '{letter}' occur in '{word}'?", str(word.count(letter))
        )
    if family == "sort":
        numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
        return Example(
            family,
            f"Sort ascending: {', '.join(map(str, numbers))}",
            ", ".join(map(str, sorted(numbers))),
        )
    if family == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        thinking = _addition_working(a, b) if rng.random() < 0.5 else None
        return Example(family, f"What is {a} + {b}?", str(a + b), thinking)
    if family == "capital":
        country = rng.choice(sorted(CAPITALS))
        return Example(family, f"What is the capital of {country}?", CAPITALS[country])
    raise ValueError(f"unknown task family '{family}'; use one of {', '.join(FAMILIES)}")


def examples(count: int, seed: int, families: tuple[str, ...] = FAMILIES) -> list[Example]:
    """`count` examples cycling through `families`, deterministic in `seed`."""
    rng = random.Random(seed)
    return [make_example(families[i % len(families)], rng) for i in range(count)]


def held_out(
    count: int, seed: int, train: list[Example], families: tuple[str, ...] = FAMILIES
) -> list[Example]:
    """`count` examples cycling through `families` from `seed` whose prompts are not in
    `train` (facts may repeat: the capital table is small, so its family tests recall, the
    others generalisation)."""
    seen = {example.prompt for example in train if example.family != "capital"}
    fresh = []
    rng = random.Random(seed)
    draws = 100 * count + 10_000  # a family whose prompts the training set nearly exhausts
    for index in range(draws):
        if len(fresh) == count:
            break
        example = make_example(families[index % len(families)], rng)
        if example.prompt not in seen:
            fresh.append(example)
    if len(fresh) < count:
        raise DataError(
            f"only {len(fresh)} of {count} held-out prompts of the families "
            f"{', '.join(families)} were found outside the {len(train)} training examples in "
            f"{draws} draws; train on fewer built-in examples or add families "
            "(data.builtin_families)"
        )
    return fresh
