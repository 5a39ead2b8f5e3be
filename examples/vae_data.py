"""Data adapter of ``examples/vae.py``: the four data sets of the FFJORD paper's VAE table as
image tensors with their likelihood, read through :mod:`pyro_ffjord.datasets`."""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch

DATASETS = ("mnist", "omniglot", "freyfaces", "caltech")
# Folder of each data set under the default data root (../shared/data beside the checkout).
FOLDERS = {"mnist": "mnist", "omniglot": "omniglot", "freyfaces": "freyfaces", "caltech": "caltech101_silhouettes"}


def default_data_dir(dataset: str) -> str:
    """Where ``--data-dir`` points unless given: ``<checkout>/../shared/data/<folder>``."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", FOLDERS[dataset])


# --- data ---------------------------------------------------------------------------------------
class VAEData(NamedTuple):
    """Images as float tensors (N, C, H, W): binary data in {0, 1} (a non-binary training set
    in [0, 1] is re-binarized every batch); Frey faces as pixel values 0..255 (``categorical``)."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    likelihood: str  # "bernoulli" or "categorical"
    image_shape: tuple
    info: dict  # provenance, split and binarization, for results.json


def load(dataset: str, data_dir: str, seed: Optional[int] = None, binarization: str = "static") -> VAEData:
    """Adapter over ``pyro_ffjord.datasets``: the three splits, the likelihood and the image
    shape of ``dataset``, read from ``data_dir``. ``seed`` seeds the data set's split and/or
    static binarization (``None``: the loader's default, e.g. 123 for Frey faces as the
    reference code)."""
    from pyro_ffjord.datasets import caltech, freyfaces, mnist, omniglot

    kw = {} if seed is None else {"seed": seed}
    if dataset == "mnist":
        if mnist.amat_available(data_dir):  # the paper's data: Larochelle & Murray's binarization
            splits = mnist.load(data_dir, binarization="amat")
            info = {"source": "binarized_mnist_{train,valid,test}.amat", "binarization": "published static"}
        else:
            splits = mnist.load(data_dir, binarization=binarization, **kw)
            info = {"source": "IDX files", "binarization": binarization
                    + (f" (seed {splits.seed})" if binarization == "static" else " (re-drawn every batch)")}
        info["split"] = "50k/10k/10k (train = first 50k of the training file, valid = its last 10k, test = t10k)"
        likelihood, shape = "bernoulli", (1, 28, 28)
    elif dataset == "omniglot":
        splits = omniglot.load(data_dir, **kw)
        info = {"source": "chardata.mat", "binarization": "train re-binarized every batch, valid/test once (seeded)",
                "split": f"{len(splits.train)}/{len(splits.valid)}/{len(splits.test)} (last training images "
                         "after a seeded shuffle = valid)"}
        likelihood, shape = "bernoulli", (1, 28, 28)
    elif dataset == "freyfaces":
        splits = freyfaces.load(data_dir, **kw)
        info = {"source": "freyfaces.pkl", "split": f"1565/200/200 after a shuffle seeded with {splits.seed} "
                "(numpy RandomState, as the reference code)"}
        likelihood, shape = "categorical", (1, 28, 20)
    elif dataset == "caltech":
        splits = caltech.load(data_dir, **kw)
        info = {"source": os.path.basename(splits.source) if splits.source else None,
                "split": splits.info.get("split", splits.split), "split_kind": splits.split}
        likelihood, shape = "bernoulli", (1, 28, 28)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    train, valid, test = (_images(getattr(splits, k), shape, likelihood) for k in ("train", "valid", "test"))
    for k, v in (getattr(splits, "info", None) or {}).items():
        if is_json_plain(v):
            info.setdefault(k, v)
    info["seed"] = getattr(splits, "seed", seed)
    info["sizes"] = [len(train), len(valid), len(test)]
    return VAEData(train, valid, test, likelihood, shape, info)


def _images(x, shape, likelihood) -> torch.Tensor:
    x = torch.as_tensor(x)
    x = x.reshape(x.shape[0], *shape)
    if likelihood == "categorical":
        if x.is_floating_point() and float(x.max()) <= 1.0:
            x = torch.round(x * 255)
        return x.to(torch.float32)
    if not x.is_floating_point():
        x = x.to(torch.float32) / (255.0 if int(x.max()) > 1 else 1.0)
    return x.to(torch.float32)


def is_json_plain(v) -> bool:
    """Whether ``v`` goes into results.json as it is: a string, number, bool or ``None``, or a
    list/tuple of strings, numbers and bools (``info`` entries and command-line arguments)."""
    return isinstance(v, (str, int, float, bool, type(None))) or (
        isinstance(v, (list, tuple)) and all(isinstance(e, (str, int, float, bool)) for e in v)
    )


def unit_of(likelihood: str, image_shape) -> dict:
    """The unit results are reported in for ``likelihood``: bits/dim for the categorical
    likelihood (Frey faces), nats per image otherwise; ``nats_per_unit`` converts."""
    if likelihood == "categorical":
        dims = math.prod(image_shape)
        return {"unit": "bits/dim", "unit_note": f"-ELBO in nats per image / ({dims} ln 2), the paper's unit for "
                "Frey faces (the Sylvester/FFJORD code's bits per dimension of a 256-way categorical "
                "likelihood); *_nats fields are nats per image", "nats_per_unit": dims * math.log(2)}
    return {"unit": "nats", "unit_note": "nats per image", "nats_per_unit": 1.0}
