"""Data for `liera finetune`: loading an image folder, .npz, CSV/JSONL table or built-in set, and checking it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import data as D
from ..data import ImageTask, TextTask
from .constants import BUILTIN_DATA, IMAGE_SUFFIXES, TEXT_SUFFIXES


# ====================================================================== data
@dataclass
class _Data:
    kind: str  # "image" | "text"
    task: ImageTask | TextTask
    source: str


def load_data(data: str, *, resolution: int = 64, text_column: str = "text", label_column: str = "label") -> _Data:
    if data in BUILTIN_DATA:
        images = D.fashion_mnist_1k() if data == "fashion-1k" else D.digits_1k()
        return _Data("image", images, data)
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(
            f"--data {data!r} does not exist; pass an image folder (root/<class>/<image>), "
            f"an .npz, a .csv or .jsonl file, or a built-in data set: {', '.join(BUILTIN_DATA)}."
        )
    suffix = path.suffix.lower()
    if path.is_dir():
        return _Data("image", D.load_image_folder(path, resolution), str(path))
    if suffix in IMAGE_SUFFIXES:
        return _Data("image", D.load_npz_images(path), str(path))
    if suffix in TEXT_SUFFIXES:
        try:
            task = D.load_text_table(path, text_column, label_column)
        except OSError as exc:
            raise ValueError(f"cannot read {str(path)!r}: {exc}") from exc
        return _Data("text", task, str(path))
    raise ValueError(
        f"--data {data!r}: unknown file type {suffix or '(none)'}; use an image folder, an .npz "
        f"(train_x, train_y[, test_x, test_y]) or a text table (.csv, .jsonl)."
    )


def check_task(d: _Data) -> None:
    task = d.task
    if len(task.train_y) == 0:
        raise ValueError(f"data {d.source!r} has an empty training set; add examples.")
    if isinstance(task, ImageTask):  # the same test as d.kind == "image"
        labels = np.concatenate([np.asarray(task.train_y).ravel(), np.asarray(task.test_y).ravel()])
        if labels.size and (labels.min() < 0 or not np.issubdtype(labels.dtype, np.integer)):
            raise ValueError(f"data {d.source!r}: labels must be integers >= 0, got min {labels.min()!r}.")
        n = int(labels.max()) + 1
        if n > task.num_classes:
            task.classes = [str(c) for c in range(n)]  # test labels beyond the training labels
        if len(task.train_x) != len(task.train_y) or len(task.test_x) != len(task.test_y):
            raise ValueError(
                f"data {d.source!r}: images and labels differ in number "
                f"({len(task.train_x)} vs {len(task.train_y)} train, {len(task.test_x)} vs "
                f"{len(task.test_y)} test)."
            )
    if len(np.unique(task.train_y)) < 2:
        raise ValueError(
            f"data {d.source!r}: the training set has only one class ({task.classes}); "
            f"classification needs at least two."
        )
