"""Small, local datasets for the demo, the experiments and `liera finetune`. Nothing is downloaded."""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

DATA_DIR = Path(__file__).parent / "data"
DEMO_FILE = DATA_DIR / "fashion_mnist_vtab1k.npz"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageTask:
    """Images as uint8 (N, H, W) or (N, H, W, C) arrays with integer labels."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def validation_split(self, fraction: float = 0.2, seed: int = 0) -> ImageTask:
        """Carve a stratified validation split out of the training set (used as the test set of the result)."""
        rng = np.random.default_rng(seed)
        val: list[np.ndarray] = []
        for c in np.unique(self.train_y):
            idx = rng.permutation(np.flatnonzero(self.train_y == c))
            val.extend(idx[: max(1, int(round(len(idx) * fraction)))])
        mask = np.zeros(len(self.train_y), bool)
        mask[val] = True
        return ImageTask(
            f"{self.name}-val",
            self.train_x[~mask],
            self.train_y[~mask],
            self.train_x[mask],
            self.train_y[mask],
            self.classes,
        )


def fashion_mnist_1k(test_size: int = 2000) -> ImageTask:
    """VTAB-1k style Fashion-MNIST: 1,000 training images; 2,000 carried test images, or up to the full
    10,000 test images when Debian's dataset-fashion-mnist is installed."""
    data = np.load(DEMO_FILE)
    test_x, test_y = data["test_x"], data["test_y"]
    if test_size > len(test_y):
        full = DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz"
        if not full.exists():
            raise FileNotFoundError(
                f"test_size={test_size} needs Debian's dataset-fashion-mnist "
                f"(apt install dataset-fashion-mnist); the carried subset has {len(test_y)} test "
                f"images."
            )
        test_x, test_y = _read_idx(full), _read_idx(DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz")
    return ImageTask(
        "fashion-mnist-1k", data["train_x"], data["train_y"], test_x[:test_size], test_y[:test_size], FASHION_CLASSES
    )


def digits_1k(seed: int = 0) -> ImageTask:
    """scikit-learn's 8x8 digits (1,797 images): 1,000 for training, the other 797 as the test set."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).astype(np.uint8)
    idx = np.random.default_rng(seed).permutation(len(images))
    tr, te = idx[:1000], idx[1000:]
    return ImageTask("digits-1k", images[tr], d.target[tr], images[te], d.target[te], [str(i) for i in range(10)])


TEXTURE_SOURCES = (
    "brick",
    "grass",
    "gravel",
    "camera",
    "coins",
    "moon",
    "cell",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)


def textures_1k(patch: int = 24, test_per_class: int = 200, seed: int = 0) -> ImageTask:
    """Texture patches from the photographs that scikit-image ships (skimage.data): which of 10 images
    (brick, grass, gravel, camera, coins, moon, cell, Hubble deep field, IHC stain, retina) a small grey
    patch was cut from. 100 training patches per class from the top half of each image, `test_per_class`
    test patches from the bottom half (no overlap); each patch is min-max normalised (no brightness cue)
    and randomly rotated by a multiple of 90 degrees or flipped. A VTAB-1k style texture task (like DTD)."""
    try:
        from skimage import data as skdata
        from skimage.color import rgb2gray
    except ImportError as exc:
        raise UserError("the textures task needs scikit-image (pip install scikit-image, or liera[demo])") from exc
    rng = np.random.default_rng(seed)

    def cut(image: np.ndarray, rows: tuple[int, int], n: int) -> np.ndarray:
        out = np.empty((n, patch, patch), np.uint8)
        for i in range(n):
            r = rng.integers(rows[0], rows[1] - patch + 1)
            c = rng.integers(0, image.shape[1] - patch + 1)
            p = image[r : r + patch, c : c + patch]
            p = (p - p.min()) / max(float(p.max() - p.min()), 1e-6)
            p = np.rot90(p, int(rng.integers(4)))
            out[i] = np.round(255 * (p[:, ::-1] if rng.integers(2) else p))
        return out

    train_x, train_y, test_x, test_y = [], [], [], []
    for label, name in enumerate(TEXTURE_SOURCES):
        image = getattr(skdata, name)()
        image = rgb2gray(image) if image.ndim == 3 else image / 255.0
        half = image.shape[0] // 2
        train_x.append(cut(image, (0, half), 100))
        test_x.append(cut(image, (half, image.shape[0]), test_per_class))
        train_y += [label] * 100
        test_y += [label] * test_per_class
    return ImageTask(
        "textures-1k",
        np.concatenate(train_x),
        np.array(train_y),
        np.concatenate(test_x),
        np.array(test_y),
        list(TEXTURE_SOURCES),
    )


ELPV_PACKAGE, ELPV_LABELS = "elpv_dataset", "data/labels.csv"
ELPV_INSTALL = "pip install --no-deps elpv-dataset==1.0.0.post1"


def elpv_1k(train_per_class: int = 500, size: int = 64, seed: int = 0) -> ImageTask:
    """Defective or functional solar cell, from electroluminescence images: the ELPV benchmark (Buerhop-Lutz et al.
    2018, Deitsch et al. 2019), 2,624 grey 300x300 cells from 44 modules, each with an expert's defect probability
    0, 1/3, 2/3 or 1, as PyPI's elpv-dataset ships it (data licence CC BY-NC-SA 4.0; ELPV_INSTALL installs it; its
    files are read here, the package is not imported).

    Label: defective = probability >= 0.5, the benchmark's own binary task (821 defective, 1,803 functional). The
    four grades are not used as classes: the 2/3 grade has only 106 images, too few to balance, and the middle
    grades record the annotators' doubt more than a visual class. Training: `train_per_class` cells per class; test:
    the rest of the defective cells and as many functional ones, drawn at random (2 x 321 = 642 by default: chance
    is 50%, as in training). Images are downscaled to size x size by Pillow's antialiasing filter (a plain bilinear
    resize of 300 pixels to 64 would alias the thin cracks that mark a defect)."""
    from PIL import Image

    from .lmtasks import package_file  # finds the file without importing the package

    labels = package_file(ELPV_PACKAGE, ELPV_LABELS, ELPV_INSTALL)
    rows = [line.split() for line in labels.read_text().splitlines() if line.strip()]
    y = np.array([float(r[1]) >= 0.5 for r in rows], dtype=np.int64)
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in (0, 1)]
    n_test = min(len(idx) for idx in by_class) - train_per_class
    train = rng.permutation(np.concatenate([idx[:train_per_class] for idx in by_class]))
    test = rng.permutation(np.concatenate([idx[train_per_class : train_per_class + n_test] for idx in by_class]))

    def load(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), size, size), np.uint8)
        for j, i in enumerate(idx):
            with Image.open(labels.parent / rows[i][0]) as image:
                out[j] = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BILINEAR))
        return out

    return ImageTask("elpv-1k", load(train), y[train], load(test), y[test], ["functional", "defective"])


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def to_model_input(
    images: np.ndarray, resolution: int, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD
) -> torch.Tensor:
    """uint8 images (or floats in [0, 1]) -> float (N, 3, res, res), normalised with mean/std (ImageNet by
    default); grey images are repeated on 3 channels."""
    x = torch.as_tensor(np.ascontiguousarray(images)).float()
    if not (np.asarray(images).dtype.kind == "f" and x.numel() and float(x.max()) <= 1.0):
        x = x.div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    x = x[:, :3]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def load_npz_images(path: str | Path) -> ImageTask:
    """An .npz with train_x, train_y (and optionally test_x, test_y; else 20% of train is held out)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist.")
    try:
        data = np.load(path)
    except Exception as exc:
        raise ValueError(f"cannot read {str(path)!r} as .npz ({exc}).") from exc
    missing = [k for k in ("train_x", "train_y") if k not in data]
    if missing:
        raise ValueError(
            f"{str(path)!r} lacks arrays {missing}; it needs train_x (N, H, W[, C]) and train_y (N,), "
            f"and may have test_x, test_y. It has: {sorted(data.keys())}."
        )
    x, y = data["train_x"], data["train_y"].astype(np.int64)
    if len(x) == 0:
        raise ValueError(f"{str(path)!r} holds an empty training set.")
    top = int(max(y.max(), data["test_y"].max() if "test_y" in data and len(data["test_y"]) else 0))
    classes = [str(c) for c in range(top + 1)]
    if "test_x" in data and "test_y" in data:
        return ImageTask(path.stem, x, y, data["test_x"], data["test_y"].astype(np.int64), classes)
    task = ImageTask(path.stem, x, y, x[:0], y[:0], classes)
    return task.validation_split(0.2)


def load_image_folder(path: str | Path, resolution: int = 64) -> ImageTask:
    """root/<class>/<image> (and optionally root/train/<class>, root/test/<class>), read with Pillow."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist.")
    splits = {"train": root / "train", "test": root / "test"} if (root / "train").is_dir() else {"train": root}
    classes = sorted(p.name for p in splits["train"].iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"image folder {str(root)!r} has no class sub-folders (expected root/<class>/<image>).")
    if "test" in splits:
        extra = sorted({p.name for p in splits["test"].iterdir() if p.is_dir()} - set(classes))
        if extra:
            raise ValueError(f"test classes {extra} have no training folder under {str(splits['train'])!r}.")
    arrays = {}
    for split, folder in splits.items():
        xs, ys = [], []
        for label, cls in enumerate(classes):
            for f in sorted((folder / cls).glob("*")):
                if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"):
                    continue
                try:
                    img = Image.open(f).convert("RGB").resize((resolution, resolution))
                except Exception as exc:
                    raise ValueError(f"cannot read image {str(f)!r}: {exc}") from exc
                xs.append(np.asarray(img))
                ys.append(label)
        if not xs:
            raise ValueError(f"no images found under {str(folder)!r}.")
        arrays[split] = (np.stack(xs), np.array(ys))
    if "test" in arrays:
        return ImageTask(root.name, *arrays["train"], *arrays["test"], classes)
    x, y = arrays["train"]
    return ImageTask(root.name, x, y, x[:0], y[:0], classes).validation_split(0.2)


def _is_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


@dataclass
class TextTask:
    name: str
    train_text: list[str]
    train_y: np.ndarray
    test_text: list[str]
    test_y: np.ndarray
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_text_table(
    path: str | Path, text_column: str = "text", label_column: str = "label", test_fraction: float = 0.2, seed: int = 0
) -> TextTask:
    """CSV or JSONL with a text and a label column; a stratified test split is held out."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist.")
    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
    except (ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"cannot read {str(path)!r} as {path.suffix or 'CSV'}: {exc}") from exc
    if not rows:
        raise ValueError(f"{str(path)!r} holds no rows.")
    for column in (text_column, label_column):
        if column not in rows[0]:
            raise ValueError(
                f"column {column!r} does not exist in {str(path)!r}; columns: {sorted(rows[0])}. "
                f"Pass --text-column / --label-column."
            )
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or r.get(text_column) is None or r.get(label_column) in (None, ""):
            raise ValueError(f"row {i + 1} of {str(path)!r} lacks a value for {text_column!r} or {label_column!r}.")
    labels = sorted(
        {str(r[label_column]) for r in rows}, key=lambda v: (0, float(v), v) if _is_number(v) else (1, 0.0, v)
    )  # "2" before "10"
    y = np.array([labels.index(str(r[label_column])) for r in rows])
    text = [str(r[text_column]) for r in rows]
    rng = np.random.default_rng(seed)
    test = np.zeros(len(rows), bool)
    for c in range(len(labels)):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(len(idx) * test_fraction)]] = True
    pick = lambda m: [t for t, k in zip(text, m, strict=True) if k]  # noqa: E731
    return TextTask(path.stem, pick(~test), y[~test], pick(test), y[test], labels)
