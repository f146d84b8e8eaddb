"""A deterministic synthetic corpus for the offline demo (no network, same bytes on every machine).

Each line is a short document about one person of a fixed, seeded "world": where they live, their
job, what they eat, who their friends are, plus sentences from a small stochastic grammar whose
word choices depend on earlier words.  A model has to *memorise* the world's facts and *learn* the
conditional word distributions to predict well: a larger teacher does both better than a tiny
student, and its soft next-token distribution carries that knowledge (e.g. the spread over a
person's friends), which is what distillation transfers.
"""

from __future__ import annotations

import random
from pathlib import Path

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kl",
    "st",
    "tr",
    "sh",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
_CODAS = ["", "", "n", "r", "s", "l", "m", "th", "nd"]


def _words(rng: random.Random, n: int, syllables: tuple[int, int]) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        k = rng.randint(*syllables)
        out.add("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(k)))
    return sorted(out)


class World:
    """The seeded facts the documents talk about."""

    def __init__(self, seed: int = 0, people: int = 240) -> None:
        rng = random.Random(seed)
        self.names = [w.capitalize() for w in _words(rng, people, (2, 3))]
        self.cities = [w.capitalize() for w in _words(rng, 24, (2, 3))]
        self.jobs = _words(rng, 20, (2, 2))
        self.foods = _words(rng, 30, (1, 2))
        self.animals = _words(rng, 16, (1, 2))
        self.adjectives = _words(rng, 24, (2, 2))
        self.verbs = _words(rng, 16, (1, 2))
        self.city = {n: rng.choice(self.cities) for n in self.names}
        self.job = {n: rng.choice(self.jobs) for n in self.names}
        # Each person likes 3 foods with fixed preferences: a real distribution to learn, not one answer.
        self.foods_of = {n: rng.sample(self.foods, 3) for n in self.names}
        self.friends = {n: rng.sample([m for m in self.names if m != n], 2) for n in self.names}
        # The grammar: every animal prefers a few adjectives and verbs; every verb a few objects.
        self.adj_of = {a: rng.sample(self.adjectives, 4) for a in self.animals}
        self.verb_of = {a: rng.sample(self.verbs, 3) for a in self.animals}
        self.obj_of = {v: rng.sample(self.foods, 4) for v in self.verbs}


def _weighted(rng: random.Random, items: list[str], decay: float = 0.5) -> str:
    weights = [decay**i for i in range(len(items))]
    return rng.choices(items, weights=weights, k=1)[0]


def _sentence(rng: random.Random, w: World, name: str) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return f"{name} lives in {w.city[name]} ."
    if kind == 1:
        return f"{name} works as a {w.job[name]} in {w.city[name]} ."
    if kind == 2:
        return f"{name} likes to eat {_weighted(rng, w.foods_of[name])} ."
    if kind == 3:
        friend = _weighted(rng, w.friends[name], 0.6)
        return f"{name} meets {friend} in {w.city[friend]} ."
    if kind == 4:
        return f"the {w.job[name]} {name} has a friend called {rng.choice(w.friends[name])} ."
    animal = rng.choice(w.animals)
    verb = _weighted(rng, w.verb_of[animal])
    return f"the {_weighted(rng, w.adj_of[animal])} {animal} of {name} {verb} the {_weighted(rng, w.obj_of[verb])} ."


def generate(num_docs: int = 12000, seed: int = 0) -> list[str]:
    """``num_docs`` documents (one line each, 3-7 sentences about one person)."""
    w = World(seed)
    rng = random.Random(seed + 1)
    docs = []
    for _ in range(num_docs):
        name = rng.choice(w.names)
        docs.append(" ".join(_sentence(rng, w, name) for _ in range(rng.randint(3, 7))))
    return docs


def write_corpus(path: str | Path, num_docs: int = 12000, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(generate(num_docs, seed)) + "\n", encoding="utf-8")
    return path


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A ChatML chat template (the format of Qwen's and SmolLM2's instruct models), for generated examples."""

_QUESTIONS = [
    ("Where does {n} live?", lambda w, n, rng: f"{n} lives in {w.city[n]} ."),
    ("What does {n} do?", lambda w, n, rng: f"{n} works as a {w.job[n]} in {w.city[n]} ."),
    ("What does {n} like to eat?", lambda w, n, rng: f"{n} likes to eat {_weighted(rng, w.foods_of[n])} ."),
    ("Who is a friend of {n}?", lambda w, n, rng: f"{n} has a friend called {rng.choice(w.friends[n])} ."),
]


def conversations(num: int = 2000, seed: int = 0) -> list[list[dict[str, str]]]:
    """``num`` conversations about the generated world: an optional system message, then 1-3 turns of a
    user question and the assistant's answer (``{role, content}`` messages, as ``data.format: chat`` reads)."""
    w = World(seed)
    rng = random.Random(seed + 2)
    out = []
    for _ in range(num):
        name = rng.choice(w.names)
        messages = (
            [{"role": "system", "content": "You answer in one sentence."}] if rng.random() < 0.5 else []
        )
        for _ in range(rng.randint(1, 3)):
            question, answer = rng.choice(_QUESTIONS)
            messages += [
                {"role": "user", "content": question.format(n=name)},
                {"role": "assistant", "content": answer(w, name, rng)},
            ]
        out.append(messages)
    return out
