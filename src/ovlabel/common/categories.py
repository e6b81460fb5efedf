"""Category lists: from a COCO ground truth, a user file, or the query list — ids are never renumbered.

A categories file is either JSON — a COCO ``categories`` list (``[{"id": 3, "name": "cat"}, …]``), a
dataset with a ``categories`` field, or a plain list of names — or text with one name per line. Plain
names get ids 1..N in file order (the file *is* the user's numbering).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class Categories:
    ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.names):
            raise ConfigError("categories need as many ids as names")
        if len(set(self.ids)) != len(self.ids):
            raise ConfigError(f"category ids are not unique: {list(self.ids)}")
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ConfigError(f"category names are not unique: {dup}")

    @classmethod
    def from_names(cls, names) -> Categories:
        names = tuple(str(n) for n in names)
        return cls(tuple(range(1, len(names) + 1)), names)

    @classmethod
    def from_coco(cls, categories: list[dict]) -> Categories:
        return cls(tuple(int(c["id"]) for c in categories), tuple(str(c["name"]) for c in categories))

    def __len__(self) -> int:
        return len(self.ids)

    def id_of(self, name: str, source: str = "") -> int:
        try:
            return self.ids[self.names.index(name)]
        except ValueError:
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}query {name!r} is not one of the categories "
                              f"({', '.join(self.names[:20])}{', …' if len(self) > 20 else ''})") from None

    def to_coco(self) -> list[dict]:
        return [{"id": i, "name": n, "supercategory": ""} for i, n in zip(self.ids, self.names)]


def load_categories(path: str | Path) -> Categories:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"categories file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"categories file {path} is not valid JSON: {e.msg} (line {e.lineno})") from None
        if isinstance(data, dict):
            data = data.get("categories")
        if not isinstance(data, list) or not data:
            raise ConfigError(f"categories file {path} must hold a non-empty list of categories or names")
        if all(isinstance(c, str) for c in data):
            return Categories.from_names(data)
        if all(isinstance(c, dict) and "id" in c and "name" in c for c in data):
            return Categories.from_coco(data)
        raise ConfigError(f"categories file {path}: entries must all be names or all be {{id, name}} objects")
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise ConfigError(f"categories file {path} lists no names")
    return Categories.from_names(names)
