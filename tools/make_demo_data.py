"""Build liera/apps/data/fashion_mnist_vtab1k.npz from Debian's dataset-fashion-mnist (run once; the result is
committed). 1,000 training images (100 per class) from the training split and 2,000 test images (200 per
class) from the test split, chosen with a fixed seed."""
import gzip
from pathlib import Path

import numpy as np

SRC = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parents[1] / "liera" / "data" / "fashion_mnist_vtab1k.npz"


def read_idx(path):
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def per_class(labels, n, rng):
    picks = [rng.permutation(np.flatnonzero(labels == c))[:n] for c in range(10)]
    return rng.permutation(np.concatenate(picks))


def main():
    rng = np.random.default_rng(20251)
    xtr, ytr = read_idx(SRC / "train-images-idx3-ubyte.gz"), read_idx(SRC / "train-labels-idx1-ubyte.gz")
    xte, yte = read_idx(SRC / "t10k-images-idx3-ubyte.gz"), read_idx(SRC / "t10k-labels-idx1-ubyte.gz")
    itr, ite = per_class(ytr, 100, rng), per_class(yte, 200, rng)
    np.savez_compressed(OUT, train_x=xtr[itr], train_y=ytr[itr], test_x=xte[ite], test_y=yte[ite],
                        train_index=itr, test_index=ite)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
