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


# --------------------------------------------------------------------------- region captions

REGION_MIN_FRACTION = 0.004  # a detector misses objects smaller than this share of the image
REGION_MISS_RATE = 0.1  # a visible object the detector does not report
REGION_WRONG_NAME_RATE = 0.05  # a box named after another category
REGION_LOOSENESS = 0.15  # each box side moves outwards by up to this share of the box size


def region_captions(object_image: np.ndarray, categories: list[str], annotated: list[bool],
                    rng: np.random.Generator) -> list[dict[str, object]]:
    """What a 2D detector + captioner reports for one colour frame: ``[{"text", "box"}]``.

    One phrase per visible annotated object (wall, floor and ceiling are not objects), the box
    ``[x_min, y_min, x_max, y_max]`` in colour-image pixels. Realistic noise: objects below
    ``REGION_MIN_FRACTION`` of the image are not detected, a detected one is missed at
    ``REGION_MISS_RATE``, named after another category at ``REGION_WRONG_NAME_RATE``, named by a
    synonym ("cupboard", "washbasin"), and boxes are loose (up to ``REGION_LOOSENESS`` per side).
    """
    height, width = object_image.shape
    ids, counts = np.unique(object_image[object_image >= 0], return_counts=True)
    names = sorted({c for c in CATEGORIES if c not in STRUCTURE})
    out: list[dict[str, object]] = []
    for oid, count in zip(ids.tolist(), counts.tolist(), strict=True):
        category = categories[oid]
        if not annotated[oid] or category in STRUCTURE or count < REGION_MIN_FRACTION * object_image.size:
            continue
        if rng.random() < REGION_MISS_RATE:
            continue
        if rng.random() < REGION_WRONG_NAME_RATE:
            category = names[int(rng.integers(len(names)))]
        rows, cols = np.nonzero(object_image == oid)
        x0, x1, y0, y1 = cols.min(), cols.max() + 1, rows.min(), rows.max() + 1
        loose = rng.uniform(0.0, REGION_LOOSENESS, 4)
        bw, bh = x1 - x0, y1 - y0
        box = [max(0.0, x0 - loose[0] * bw), max(0.0, y0 - loose[1] * bh),
               min(float(width), x1 + loose[2] * bw), min(float(height), y1 + loose[3] * bh)]
        words = CATEGORIES[category].words
        singular = words[int(rng.integers(len(words)))][0]
        text = _article(singular) if rng.random() < 0.6 else f"the {singular}"
        out.append({"text": text, "box": [round(float(v), 1) for v in box]})
    return out
