"""Landmark data sets on disk (format: docs/internals.md, "Landmark data sets").

```
DIR/images/<image_id>.png   landmarks.csv: image,landmark,x,y   metadata.csv: image,image_id,patient_id
```
`image` is the path relative to DIR; x, y are continuous original-pixel coordinates (pixel
column i spans [i, i + 1)). metadata.csv is optional: without it the image id is the file stem.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ace_model.errors import InputError

LANDMARK_COLUMNS = ("image", "landmark", "x", "y")
METADATA_COLUMNS = ("image", "image_id", "patient_id")


class LandmarkFormatError(InputError):
    """A landmark data set that does not follow the documented format."""


@dataclass(frozen=True)
class LandmarkImage:
    image_id: str
    path: Path  # absolute (DIR / image)
    points: dict[str, tuple[float, float]]  # landmark name -> original-pixel (x, y)
    patient_id: str | None = None
    image: str = ""  # path relative to DIR, as written in the CSV files
    extra: dict[str, str] = field(default_factory=dict)  # further metadata columns


def read_landmark_set(root: str | Path, check_images: bool = True) -> list[LandmarkImage]:
    """Read DIR/landmarks.csv (or DIR/landmarks.json) and the optional DIR/metadata.csv, sorted by
    image path.

    Raises LandmarkFormatError (missing columns, bad numbers, duplicates) or FileNotFoundError.
    """
    root = Path(root)
    table = root / "landmarks.csv"
    if table.is_file():
        points, metadata = _read_points(table), _read_metadata(root / "metadata.csv")
    elif (root / "landmarks.json").is_file():
        table = root / "landmarks.json"
        points, metadata = _read_json(table)
    else:
        raise FileNotFoundError(
            f"{table} not found: a landmark data set is a directory with images/ and landmarks.csv "
            f"(columns {','.join(LANDMARK_COLUMNS)}) or landmarks.json; create one with `ace data phantoms`"
        )
    items = [_landmark_image(root, image, pts, metadata.get(image, {}))
             for image, pts in sorted(points.items())]
    if check_images:
        missing = [item.image for item in items if not item.path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) named in {table} do not exist, e.g. {root / missing[0]}"
            )
    return items


def _landmark_image(root: Path, image: str, points: dict[str, tuple[float, float]],
                    meta: dict[str, str]) -> LandmarkImage:
    extra = {k: v for k, v in meta.items() if k not in METADATA_COLUMNS}
    return LandmarkImage(image_id=meta.get("image_id") or Path(image).stem, path=root / image, points=points,
                         patient_id=meta.get("patient_id") or None, image=image, extra=extra)


def _read_table(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise LandmarkFormatError(
                f"{path} lacks column(s) {', '.join(missing)}: its header is {reader.fieldnames}, "
                f"expected {','.join(required)}"
            )
        return list(reader)


def _read_points(table: Path) -> dict[str, dict[str, tuple[float, float]]]:
    points: dict[str, dict[str, tuple[float, float]]] = {}
    for line, row in enumerate(_read_table(table, LANDMARK_COLUMNS), start=2):
        image, name = (row["image"] or "").strip(), (row["landmark"] or "").strip()
        if not image or not name:
            raise LandmarkFormatError(f"{table}:{line}: empty image or landmark name")
        if name in points.setdefault(image, {}):
            raise LandmarkFormatError(f"{table}:{line}: landmark {name!r} of {image} appears twice")
        where = f"{table}:{line}"
        points[image][name] = (_coordinate(row["x"], where), _coordinate(row["y"], where))
    if not points:
        raise LandmarkFormatError(f"{table} has a header but no landmark rows")
    return points


def _coordinate(text: str | None, where: str) -> float:
    try:
        value = float(text or "")
    except ValueError:
        raise LandmarkFormatError(f"{where}: coordinate {text!r} is not a number") from None
    if not math.isfinite(value):
        raise LandmarkFormatError(f"{where}: coordinate {text!r} is not finite")
    return value


def _read_json(path: Path) -> tuple[dict[str, dict[str, tuple[float, float]]], dict[str, dict[str, str]]]:
    """{"images": [{"image": "images/a.png", "image_id"?, "patient_id"?, "landmarks": {name: [x, y]}}]}"""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["images"]
        points = {str(e["image"]): _json_points(e["landmarks"], path) for e in entries}
        metadata = {str(e["image"]): {k: str(v) for k, v in e.items() if k in METADATA_COLUMNS}
                    for e in entries}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LandmarkFormatError(
            f"{path} is not a landmark file ({type(err).__name__}: {err}); expected "
            '{"images": [{"image": "images/a.png", "landmarks": {"carina": [x, y]}}]}'
        ) from None
    if not points:
        raise LandmarkFormatError(f"{path} lists no images")
    return points, metadata


def _json_points(landmarks: dict[str, list[float]], path: Path) -> dict[str, tuple[float, float]]:
    points = {}
    for name, xy in landmarks.items():
        if len(xy) != 2:
            raise LandmarkFormatError(f"{path}: landmark {name!r} must be [x, y], got {xy!r}")
        where = f"{path} ({name})"
        points[str(name)] = (_coordinate(str(xy[0]), where), _coordinate(str(xy[1]), where))
    return points


def _read_metadata(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    rows = _read_table(path, ("image",))
    return {row["image"].strip(): {k: (v or "").strip() for k, v in row.items() if k} for row in rows}


def write_landmarks_csv(path: Path, items: Iterable[tuple[str, dict[str, tuple[float, float]]]]) -> None:
    """Write (image, {landmark: (x, y)}) pairs as landmarks.csv."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(LANDMARK_COLUMNS)
        for image, points in items:
            writer.writerows((image, name, f"{x:.3f}", f"{y:.3f}") for name, (x, y) in points.items())


def write_metadata_csv(path: Path, rows: Iterable[tuple[str, str, str | None]]) -> None:
    """Write (image, image_id, patient_id) rows as metadata.csv."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(METADATA_COLUMNS)
        writer.writerows((image, image_id, patient_id or "") for image, image_id, patient_id in rows)
