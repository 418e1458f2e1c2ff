"""The synthetic review corpus behind the embedded default model.

Short English reviews (restaurants, hotels, films, books, gadgets) with varied
sentiment, generated from a small grammar: an *opening* (the prompt, e.g.
``"The pasta was"`` or ``"I went to this hotel and"``) followed by a *rest*
(``" really good but the service was slow. I would not recommend it."``).
Adjectives come from VADER's lexicon (positive and negative valence) plus words
VADER scores as neutral; intensifiers, negations ("not great") and contrast
("but") make the VADER compound score spread over [-1, 1].

Every function is deterministic given ``seed`` (``numpy.random.Generator``).
Prompts, SFT demonstrations and preference pairs are all drawn from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Adjectives by the kind of thing they describe. "pos"/"neg" words carry VADER
# valence; "neutral" words are absent from VADER's lexicon (score 0).
_ADJECTIVES: dict[str, dict[str, tuple[str, ...]]] = {
    "any": {
        "pos": ("good", "great", "excellent", "amazing", "wonderful", "fantastic", "lovely",
                "perfect", "awesome", "superb", "outstanding", "brilliant", "impressive", "nice",
                "pleasant", "enjoyable", "delightful", "terrific"),
        "neg": ("bad", "terrible", "awful", "horrible", "disappointing", "poor", "dreadful",
                "lousy", "pathetic", "weak", "dull", "a disaster", "a mess"),
        "neutral": ("average", "ordinary", "typical", "standard", "decent", "reasonable",
                    "nothing special", "about what I expected"),
    },
    "food": {
        "pos": ("delicious", "fresh", "rich", "tasty", "perfectly cooked"),
        "neg": ("bland", "stale", "cold", "greasy", "disgusting", "soggy", "gross", "rotten",
                "burnt"),
        "neutral": ("small", "plain", "simple", "lukewarm", "salty"),
    },
    "people": {
        "pos": ("friendly", "helpful", "welcoming", "cheerful", "courteous", "kind"),
        "neg": ("rude", "slow", "unfriendly", "lazy", "careless", "useless"),
        "neutral": ("busy", "quiet", "formal", "young", "new"),
    },
    "place": {
        "pos": ("clean", "comfortable", "cozy", "spotless", "beautiful", "bright", "charming"),
        "neg": ("dirty", "noisy", "cramped", "smelly", "uncomfortable", "ugly", "filthy"),
        "neutral": ("small", "quiet", "dark", "large", "old", "modern"),
    },
    "story": {
        "pos": ("gripping", "funny", "beautiful", "clever", "heartwarming", "powerful",
                "stunning", "fun", "a masterpiece"),
        "neg": ("boring", "predictable", "confusing", "pointless", "stupid", "lame", "forgettable",
                "painful"),
        "neutral": ("long", "short", "slow", "simple", "dark", "unusual"),
    },
    "device": {
        "pos": ("solid", "reliable", "sturdy", "sleek", "fast", "easy to use", "brilliant"),
        "neg": ("broken", "useless", "flimsy", "annoying", "buggy", "cheap", "frustrating"),
        "neutral": ("heavy", "light", "small", "basic", "plastic", "simple"),
    },
}

_INTENSIFIERS = ("really", "very", "so", "extremely", "incredibly", "absolutely", "truly",
                 "quite", "pretty")
_NEGATABLE = ("good", "great", "nice", "impressive", "pleasant", "enjoyable")


@dataclass(frozen=True)
class _Domain:
    places: tuple[str, ...]
    aspects: dict[str, str]  # aspect noun -> adjective kind
    visits: tuple[str, ...]  # "{subject} {visit} this {place} and"
    of: str = "at"  # "The {aspect} {of} this {place} was"


_DOMAINS: dict[str, _Domain] = {
    "restaurant": _Domain(
        places=("restaurant", "cafe", "diner", "bistro", "pizza place", "bakery", "steakhouse"),
        aspects={"pasta": "food", "pizza": "food", "soup": "food", "salad": "food",
                 "steak": "food", "burger": "food", "coffee": "food", "dessert": "food",
                 "bread": "food", "curry": "food", "fish": "food", "food": "food",
                 "chicken": "food", "cake": "food", "service": "people", "staff": "people",
                 "waiter": "people", "waitress": "people", "owner": "people",
                 "dining room": "place", "patio": "place", "menu": "any", "atmosphere": "any"},
        visits=("went to", "ate at", "had dinner at", "had lunch at", "tried"),
    ),
    "hotel": _Domain(
        places=("hotel", "inn", "resort", "motel", "guest house"),
        aspects={"room": "place", "bed": "place", "bathroom": "place", "lobby": "place",
                 "pool": "place", "shower": "place", "view": "any", "location": "any",
                 "breakfast": "food", "staff": "people", "front desk": "people",
                 "manager": "people", "wifi": "device"},
        visits=("went to", "stayed at", "booked", "spent a week at", "spent the night at"),
    ),
    "film": _Domain(
        places=("movie", "film", "show", "series", "play"),
        aspects={"plot": "story", "acting": "story", "ending": "story", "story": "story",
                 "script": "story", "dialogue": "story", "soundtrack": "any",
                 "music": "any", "lead actor": "people", "cast": "any"},
        visits=("watched", "saw", "went to see", "finally watched"),
        of="of",
    ),
    "book": _Domain(
        places=("book", "novel", "memoir", "cookbook"),
        aspects={"writing": "story", "ending": "story", "main character": "story",
                 "first chapter": "story", "cover": "any", "story": "story"},
        visits=("read", "bought", "finished", "borrowed"),
        of="of",
    ),
    "product": _Domain(
        places=("phone", "laptop", "blender", "vacuum", "camera", "kettle", "speaker",
                "coffee maker", "printer", "watch"),
        aspects={"battery": "device", "screen": "device", "design": "any", "sound": "device",
                 "price": "any", "build quality": "device", "charger": "device",
                 "setup": "device", "customer support": "people", "delivery": "any"},
        visits=("bought", "ordered", "tried", "returned", "got"),
        of="of",
    ),
}

_SUBJECTS = ("I", "We", "My wife and I", "My husband and I", "My friend and I", "My family")

_CLOSERS: dict[str, tuple[str, ...]] = {
    "pos": ("I would definitely recommend it.", "We will be back soon.", "Highly recommended!",
            "Overall a great experience.", "Five stars.", "I loved every minute of it.",
            "Worth every penny.", "I am so glad we went.", "Can not wait to come back!",
            "Thank you for a wonderful time."),
    "neg": ("I would not recommend it.", "I will never come back.", "What a waste of money.",
            "Avoid it.", "Overall a terrible experience.", "One star.", "I want my money back.",
            "Never again.", "So disappointed.", "I regret it."),
    "neutral": ("It was fine for the price.", "Nothing special.", "Maybe I will try it again.",
                "It was an average experience.", "Hard to say more than that.",
                "Just as described.", "It is what it is."),
}

_MOODS = ("pos", "neg", "neutral", "mixed")
_MOOD_PROBS = (0.32, 0.40, 0.14, 0.14)


def _pick(rng: np.random.Generator, items: tuple[str, ...] | list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _adjective(rng: np.random.Generator, kind: str, polarity: str) -> str:
    """One adjective of ``kind`` with ``polarity`` ('pos'|'neg'|'neutral'), half the time generic."""
    pool = _ADJECTIVES[kind][polarity] if rng.random() < 0.6 else _ADJECTIVES["any"][polarity]
    return _pick(rng, pool)


def _predicate(rng: np.random.Generator, kind: str, polarity: str) -> str:
    """What follows "was": an adjective phrase, with intensifiers and negations."""
    if polarity == "neutral":
        return _adjective(rng, kind, "neutral")
    if polarity == "neg" and rng.random() < 0.25:
        negation = _pick(rng, ("not", "not very", "not really", "never", "not at all"))
        single_words = tuple(w for w in _ADJECTIVES[kind]["pos"] if " " not in w)
        adjective = _pick(rng, _NEGATABLE + single_words)
        return f"not {adjective} at all" if negation == "not at all" else f"{negation} {adjective}"
    adjective = _adjective(rng, kind, polarity)
    if rng.random() < 0.45 and not adjective.startswith(("a ", "easy", "perfectly")):
        return f"{_pick(rng, _INTENSIFIERS)} {adjective}"
    return adjective


def _clause(rng: np.random.Generator, domain: _Domain, polarity: str, aspect: str) -> str:
    """A full clause about one aspect: 'the staff was really friendly'."""
    return f"the {aspect} was {_predicate(rng, domain.aspects[aspect], polarity)}"


def _sentence_end(rng: np.random.Generator, polarity: str) -> str:
    return "!" if polarity != "neutral" and rng.random() < 0.2 else "."


def _review_parts(rng: np.random.Generator) -> tuple[str, str]:
    """One review as (opening, rest); ``rest`` starts with a space."""
    domain = _DOMAINS[_pick(rng, tuple(_DOMAINS))]
    mood = _MOODS[int(rng.choice(len(_MOODS), p=_MOOD_PROBS))]
    first, second = {"mixed": _pick(rng, (("pos", "neg"), ("neg", "pos")))}.get(mood, (mood, mood))
    aspects = list(domain.aspects)
    aspect = _pick(rng, aspects)
    other = _pick(rng, [a for a in aspects if a != aspect])
    place = _pick(rng, domain.places)

    form = int(rng.integers(4))
    if form == 0:
        opening = _pick(rng, ("The", "The", "Honestly, the", "Wow, the")) + f" {aspect} was"
        rest = f" {_predicate(rng, domain.aspects[aspect], first)}"
    elif form == 1:
        opening = f"The {aspect} {domain.of} this {place} was"
        rest = f" {_predicate(rng, domain.aspects[aspect], first)}"
    elif form == 2:
        opening = f"{_pick(rng, _SUBJECTS)} {_pick(rng, domain.visits)} this {place} and"
        rest = f" {_clause(rng, domain, first, aspect)}"
    else:
        opening = f"This {place} {_pick(rng, ('is', 'was'))}"
        rest = f" {_predicate(rng, 'any', first)}"

    roll = rng.random()
    if mood == "mixed" or roll < 0.3:
        joiner = " but" if first != second else _pick(rng, (" and", ", and", " and also"))
        rest += f"{joiner} {_clause(rng, domain, second, other)}"
    rest += _sentence_end(rng, first)
    closer_mood = "neutral" if mood == "mixed" else second
    if rng.random() < 0.6:
        rest += " " + _pick(rng, _CLOSERS[closer_mood])
    return opening, rest


def make_reviews(n: int, seed: int) -> list[str]:
    """``n`` full reviews (one or two sentences each), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return ["".join(_review_parts(rng)) for _ in range(n)]


def make_prompts(n: int, seed: int) -> list[str]:
    """``n`` review openings such as ``"The pasta was"``, drawn with repeats.

    The grammar has about 1,500 distinct openings, so draws with another seed overlap these: for
    held-out prompts, deal distinct prompts out as ``agents.pipeline`` does.
    """
    rng = np.random.default_rng(seed)
    return [_review_parts(rng)[0] for _ in range(n)]


def distinct_prompts(n: int, seed: int) -> list[str]:
    """``n`` different review openings: the first ``n`` distinct ones among corpus draws with ``seed``.

    Raises ValueError if the grammar (about 1,500 distinct openings) cannot supply ``n``.
    """
    draws = make_prompts(4 * n, seed)
    found = list(dict.fromkeys(draws))
    if len(found) < n:
        found = list(dict.fromkeys(draws + make_prompts(16 * n, seed + 1)))
    if len(found) < n:
        raise ValueError(f"the corpus grammar supplied {len(found)} distinct prompts, fewer than the {n} asked for")
    return found[:n]


def make_demonstrations(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` SFT demonstrations ``{"prompt", "completion"}``; completion starts with a space."""
    rng = np.random.default_rng(seed)
    return [dict(zip(("prompt", "completion"), _review_parts(rng))) for _ in range(n)]


def vocabulary() -> set[str]:
    """Every word the grammar can produce (lower case, punctuation stripped)."""
    texts: list[str] = list(_SUBJECTS) + list(_INTENSIFIERS) + list(_NEGATABLE)
    texts += ["the was at of this and but also is not very really never all", "Honestly Wow"]
    texts += [w for kinds in _ADJECTIVES.values() for pool in kinds.values() for w in pool]
    texts += [w for pool in _CLOSERS.values() for w in pool]
    for domain in _DOMAINS.values():
        texts += list(domain.places) + list(domain.aspects) + list(domain.visits)
    return {w.strip(".,!").lower() for t in texts for w in t.split()}
