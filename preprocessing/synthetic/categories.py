"""Category vocabulary of the synthetic scenes: ScanNet raw categories, their ids and caption words.

The raw-category ids are the real ScanNet ids (the ScanNet200 benchmark's source ids) and the
NYU40 ids are those of the real ``scannetv2-labels.combined.tsv``, so the synthetic label file maps
categories exactly like the real one for every category used here.
"""

from __future__ import annotations

from dataclasses import dataclass

NYU40_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)  # index i -> NYU40 id i + 1 (the spelling is the real file's)

# NYU40 id -> (eigen13 id, eigen13 class)
_EIGEN13 = {
    1: (12, "Wall"), 2: (5, "Floor"), 3: (6, "Furniture"), 4: (1, "Bed"), 5: (4, "Chair"),
    6: (9, "Sofa"), 7: (10, "Table"), 8: (12, "Wall"), 9: (13, "Window"), 10: (6, "Furniture"),
    11: (8, "Picture"), 12: (6, "Furniture"), 13: (13, "Window"), 14: (10, "Table"),
    15: (6, "Furniture"), 16: (13, "Window"), 17: (6, "Furniture"), 18: (7, "Objects"),
    19: (7, "Objects"), 20: (5, "Floor"), 21: (7, "Objects"), 22: (3, "Ceiling"), 23: (2, "Books"),
    24: (6, "Furniture"), 25: (11, "TV"), 26: (7, "Objects"), 27: (7, "Objects"), 28: (7, "Objects"),
    29: (7, "Objects"), 30: (7, "Objects"), 31: (7, "Objects"), 32: (6, "Furniture"),
    33: (7, "Objects"), 34: (7, "Objects"), 35: (7, "Objects"), 36: (7, "Objects"), 37: (7, "Objects"),
    38: (7, "Objects"), 39: (6, "Furniture"), 40: (7, "Objects"),
}

MPCAT40 = (
    "wall", "floor", "chair", "door", "table", "picture", "cabinet", "cushion", "window", "sofa",
    "bed", "curtain", "chest_of_drawers", "plant", "sink", "stairs", "ceiling", "toilet", "stool",
    "towel", "mirror", "tv_monitor", "shower", "column", "bathtub", "counter", "fireplace",
    "lighting", "beam", "railing", "shelving", "blinds", "gym_equipment", "seating", "board_panel",
    "furniture", "appliances", "clothes", "objects", "misc",
)  # index i -> mpcat40 index i + 1


@dataclass(frozen=True)
class Category:
    """One raw ScanNet category as used by the synthetic scenes."""

    name: str  # raw_category (what aggregation.json segGroups carry as `label`)
    raw_id: int  # the `id` column (ScanNet200 ids are these)
    nyu40: int
    mpcat40: str
    words: tuple[tuple[str, str], ...]  # caption phrases (singular, plural); synonyms included
    color: tuple[int, int, int]  # base albedo (RGB)


def _c(name, raw_id, nyu40, mpcat, color, *synonyms):
    words = [(name, _plural(name))] + [(s, _plural(s)) for s in synonyms]
    return Category(name, raw_id, nyu40, mpcat, tuple(words), color)


def _plural(word: str) -> str:
    if " of " in word:
        head, tail = word.split(" of ", 1)
        return f"{_plural(head)} of {tail}"
    if word.endswith("clothes"):
        return word
    if word.endswith(("s", "sh", "ch", "x")):
        return word + "es"
    if word.endswith("f"):
        return word[:-1] + "ves"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


CATEGORIES: dict[str, Category] = {c.name: c for c in (
    _c("wall", 1, 1, "wall", (205, 200, 190)),
    _c("floor", 3, 2, "floor", (150, 115, 80)),
    _c("ceiling", 41, 22, "ceiling", (235, 235, 230)),
    _c("chair", 2, 5, "chair", (120, 70, 40)),
    _c("table", 4, 7, "table", (160, 110, 60)),
    _c("door", 5, 8, "door", (185, 150, 110)),
    _c("couch", 6, 6, "sofa", (70, 90, 140), "sofa"),
    _c("cabinet", 7, 3, "cabinet", (200, 190, 170), "cupboard"),
    _c("desk", 9, 14, "table", (175, 140, 95), "work desk"),
    _c("office chair", 10, 5, "chair", (40, 40, 45), "desk chair", "swivel chair"),
    _c("bed", 11, 4, "bed", (220, 220, 235)),
    _c("pillow", 13, 18, "cushion", (240, 230, 200)),
    _c("sink", 14, 34, "sink", (235, 235, 240), "washbasin"),
    _c("picture", 15, 11, "picture", (160, 60, 60), "painting", "framed picture"),
    _c("window", 16, 9, "window", (170, 200, 230)),
    _c("toilet", 17, 33, "toilet", (245, 245, 245)),
    _c("bookshelf", 18, 10, "shelving", (110, 75, 45), "bookcase"),
    _c("monitor", 19, 40, "tv_monitor", (25, 25, 30), "computer monitor", "screen"),
    _c("curtain", 21, 16, "curtain", (150, 40, 60), "drape"),
    _c("book", 22, 23, "objects", (60, 110, 160)),
    _c("armchair", 23, 5, "chair", (130, 60, 50)),
    _c("coffee table", 24, 7, "table", (95, 65, 40), "low table"),
    _c("box", 26, 29, "objects", (190, 150, 100), "cardboard box"),
    _c("refrigerator", 27, 24, "appliances", (225, 225, 225), "fridge"),
    _c("lamp", 28, 35, "lighting", (240, 210, 120), "light"),
    _c("kitchen cabinet", 29, 3, "cabinet", (170, 150, 120), "kitchen cupboard"),
    _c("towel", 31, 27, "towel", (90, 160, 170)),
    _c("clothes", 32, 21, "clothes", (80, 120, 60)),
    _c("tv", 33, 25, "tv_monitor", (20, 20, 20), "television"),
    _c("nightstand", 34, 32, "chest_of_drawers", (140, 95, 55), "bedside table"),
    _c("counter", 35, 12, "counter", (200, 195, 185), "countertop"),
    _c("dresser", 36, 17, "chest_of_drawers", (150, 100, 70), "chest of drawers"),
    _c("stool", 38, 40, "stool", (100, 60, 30)),
    _c("plant", 40, 40, "plant", (60, 130, 50), "potted plant"),
    _c("bathtub", 42, 36, "bathtub", (240, 240, 245), "tub"),
    _c("end table", 44, 7, "table", (120, 85, 55), "side table"),
    _c("dining table", 45, 7, "table", (140, 95, 60)),
    _c("keyboard", 46, 40, "objects", (50, 50, 55)),
    _c("backpack", 48, 40, "objects", (40, 60, 120), "rucksack"),
    _c("printer", 50, 40, "appliances", (210, 210, 205)),
    _c("whiteboard", 52, 30, "board_panel", (245, 245, 245), "white board"),
    _c("shower curtain", 55, 28, "curtain", (200, 220, 235)),
    _c("trash can", 56, 39, "objects", (90, 90, 95), "garbage can", "wastebasket"),
    _c("microwave", 59, 40, "appliances", (60, 60, 65), "microwave oven"),
    _c("ottoman", 67, 39, "seating", (160, 120, 90), "footstool"),
    _c("mirror", 71, 19, "mirror", (200, 210, 215)),
    _c("file cabinet", 75, 3, "cabinet", (150, 155, 160), "filing cabinet"),
    _c("laptop", 77, 40, "objects", (150, 150, 155), "notebook computer"),
    _c("radiator", 96, 39, "misc", (230, 230, 225), "heater"),
    _c("wardrobe", 99, 39, "cabinet", (175, 130, 85), "closet"),
    _c("object", 1163, 40, "objects", (128, 128, 128)),
)}

SCENE_TYPES = ("Living room / Lounge", "Bedroom / Hotel", "Office", "Kitchen", "Bathroom",
               "Conference Room")


def tsv_rows() -> list[list[str]]:
    """Rows of `scannetv2-labels.combined.tsv` (header first) for the categories used here."""
    header = ["id", "raw_category", "category", "count", "nyu40id", "eigen13id", "nyuClass",
              "nyu40class", "eigen13class", "ModelNet40", "ModelNet10", "ShapeNetCore55",
              "synsetoffset", "wnsynsetid", "wnsynsetkey", "mpcat40", "mpcat40index"]
    rows = [header]
    for cat in sorted(CATEGORIES.values(), key=lambda c: c.raw_id):
        eigen_id, eigen_class = _EIGEN13[cat.nyu40]
        nyu40class = NYU40_CLASSES[cat.nyu40 - 1]
        count = max(10, 8000 // cat.raw_id)
        rows.append([str(cat.raw_id), cat.name, cat.name, str(count), str(cat.nyu40), str(eigen_id),
                     cat.name, nyu40class, eigen_class, "", "", "", "", "", "", cat.mpcat40,
                     str(MPCAT40.index(cat.mpcat40) + 1)])
    return rows
