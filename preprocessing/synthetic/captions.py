"""View captions for synthetic frames: name the objects really visible, with varied wording.

Captions are written like human or captioner text (PLA-style view captions): synonyms
(couch/sofa), counts and plurals ("two chairs"), and a handful of sentence templates.
"""

from __future__ import annotations

import numpy as np

from preprocessing.synthetic.categories import CATEGORIES

STRUCTURE = ("wall", "floor", "ceiling")
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
ROOM_WORDS = {
    "Living room / Lounge": ("living room", "lounge", "room"),
    "Bedroom / Hotel": ("bedroom", "hotel room", "room"),
    "Office": ("office", "workspace", "room"),
    "Kitchen": ("kitchen", "room"),
    "Bathroom": ("bathroom", "room"),
    "Conference Room": ("conference room", "meeting room", "room"),
}


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _phrase(category: str, count: int, rng: np.random.Generator) -> str:
    words = CATEGORIES[category].words
    singular, plural = words[int(rng.integers(len(words)))]
    if count == 1:
        return _article(singular)
    if count in NUMBERS and rng.random() < 0.7:
        return f"{NUMBERS[count]} {plural}"
    return ("some " if rng.random() < 0.5 else "several ") + plural


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def make_caption(visible: list[tuple[str, int, float]], scene_type: str, rng: np.random.Generator) -> str:
    """Caption from [(category, instance count, image fraction)] of visible annotated objects.

    Only categories in `visible` are named; the largest (up to four) non-structural ones come first.
    """
    objects = [(c, n) for c, n, frac in sorted(visible, key=lambda v: -v[2]) if c not in STRUCTURE][:4]
    room = ROOM_WORDS.get(scene_type, ("room",))
    room_word = room[int(rng.integers(len(room)))]
    if not objects:
        seen = [c for c, _, _ in visible if c in STRUCTURE]
        if not seen:
            return f"a dark corner of the {room_word}"
        return f"a plain view of the {room_word} showing the {_join(sorted(seen))}"
    phrases = [_phrase(c, n, rng) for c, n in objects]
    first, rest = phrases[0], phrases[1:]
    template = int(rng.integers(6))
    if template == 0 or not rest:
        text = f"{_article(room_word)} with {_join(phrases)}"
    elif template == 1:
        text = f"{first} next to {_join(rest)}"
    elif template == 2:
        text = f"there is {first} in the {room_word}, with {_join(rest)} nearby"
    elif template == 3:
        text = f"{_join(phrases)} in {_article(room_word)}"
    elif template == 4:
        text = f"a view of {first} near {_join(rest)}"
    else:
        text = f"{first} and {_join(rest)} seen from across the {room_word}"
    return text[0].upper() + text[1:] + "."


def visible_objects(object_image: np.ndarray, categories: list[str], annotated: list[bool],
                    min_fraction: float = 0.01) -> list[tuple[str, int, float]]:
    """[(category, instance count, image fraction)] of annotated objects covering >= min_fraction."""
    ids, counts = np.unique(object_image[object_image >= 0], return_counts=True)
    frac = counts / object_image.size
    per_cat: dict[str, list[float]] = {}
    for oid, f in zip(ids, frac, strict=True):
        if f >= min_fraction and annotated[oid]:
            per_cat.setdefault(categories[oid], []).append(float(f))
    return [(c, len(fs), sum(fs)) for c, fs in per_cat.items()]
