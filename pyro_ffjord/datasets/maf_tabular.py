"""The five tabular data sets of the FFJORD paper's density table, read from MAF's published files
and preprocessed exactly as MAF's code does (Papamakarios et al. 2017, ``datasets/*.py``; the
FFJORD reference code reads them with the same code). Nothing is downloaded.

Files: ``data.tar.gz`` at https://zenodo.org/record/1161203 unpacks to ``data/power/data.npy``,
``data/gas/ethylene_CO.pickle``, ``data/hepmass/1000_{train,test}.csv``,
``data/miniboone/data.npy`` and ``data/BSDS300/BSDS300.hdf5``. ``data_dir`` is either the data
set's own folder (``data/power``) or that ``data/`` folder. Every reader returns a
:class:`~pyro_ffjord.datasets.tabular.TabularSplits`, float32 by default (MAF casts to float32;
the steps below run in float64). No checksums of these files are known to this package; a file
of the wrong shape, dtype or with non-finite values raises :class:`DatasetFileError`. Below,
"MAF's split" is :func:`~pyro_ffjord.datasets.tabular.maf_split_sizes`: the last
``int(0.1 * N)`` rows are test, then the last ``int(0.1 * rest)`` of the remaining rows valid.

POWER (:func:`load_power`, 6-D): ``data.npy`` holds 2,049,280 x 8 float columns: global active
power, global reactive power, voltage, global intensity, sub-meterings 1-3, time. As MAF's
code does: (1) one ``numpy.random.RandomState(42)`` (legacy generator: the same stream in every
numpy version) shuffles the rows; (2) columns 1 and 3 (reactive power, intensity) are dropped;
(3) the same generator, continuing, draws uniform noise in this order: ``0.01 * U`` for voltage,
``0.001 * U`` for active power, ``U`` for each sub-metering (``rand(N, 3)``), none for time,
added to those columns; (4) MAF's split, no further shuffle; (5) normalised by the mean and
standard deviation (``ddof=0``) of train and valid together. The shuffle is done as
``RandomState(42).permutation(N)``, which makes the same row order and leaves the generator in
the same state as MAF's in-place ``shuffle`` (both draw the same Fisher-Yates swaps).

GAS (:func:`load_gas`, 8-D): MAF publishes a pandas DataFrame pickle (a 25% sample of UCI's
ethylene-CO recordings: time, two gas concentrations named "Meth" and "Eth", 16 sensors).
Unpickling runs whatever the file names, and a DataFrame pickle names pandas internals (frame,
block manager, index classes, block-rebuilding helpers) that differ between pandas versions: a
restricted unpickler would either need pandas and trust its ``__setstate__`` code, or re-create
its block format for a file we cannot test against. So this package never unpickles it: once,
on your machine, with pandas, convert it to ``ethylene_CO.npz`` (values and column names,
read back with ``allow_pickle=False``) by the command :func:`gas_conversion_command` gives::

    cd data/gas && python -c "import numpy as np, pandas as pd; d = pd.read_pickle('ethylene_CO.pickle'); \\
np.savez('ethylene_CO.npz', values=d.to_numpy(dtype='float64'), columns=np.array([str(c) for c in d.columns]))"

(that command unpickles the file, as MAF's and FFJORD's code do: run it only on the file from
the zenodo record). Then, as MAF's code does: (1) the columns named "Meth", "Eth" and "Time" are
dropped (by name: every column of that name, as ``DataFrame.drop``); (2) while some column has
a Pearson correlation above 0.98 (signed: strong anti-correlation stays) with another column,
over all rows, the first such column is dropped, again by name (if two columns share the name,
both go), and the correlations are recomputed; (3) the whole table, future test rows included,
is normalised by its mean and standard deviation with ``ddof=1`` (pandas' default); (4) MAF's
split, without shuffling. Correlations and statistics are numpy's (MAF used pandas'): they agree
up to float64 rounding.

HEPMASS (:func:`load_hepmass`, 21-D): ``1000_train.csv``/``1000_test.csv`` (a header line, then
comma-separated numbers; column 0 is the class label; MAF took the first 10% of UCI's files).
As MAF's code does: (1) only signal rows (label == 1) are kept in both files, and the label
column is dropped; (2) the test file's last column is dropped (MAF: "the data set is messed up":
its header names one column more than the training file; pandas fills it with NaN when the rows
lack it, so the reader accepts rows with or without that field); (3) both files are normalised
by the training file's signal rows' mean and standard deviation (``ddof=1``), the rows that
become valid included; (4) every feature whose *smallest* value occurs more than 5 times in the
normalised training data is dropped from both (MAF's code calls them features with too many
re-occurring values, but it counts only the smallest value: it sorts the value counts by value
and takes the first; reproduced as coded; 6 of the 27 go); (5) valid is the last
``int(0.1 * N)`` training rows; test is the test file's rows.

MINIBOONE (:func:`load_miniboone`, 43-D): ``data.npy`` (36,488 x 43) was already cleaned by MAF
before publishing (the steps are a comment in MAF's code, reproduced by
:func:`clean_miniboone_raw` for UCI's 50-feature table: rows whose first feature is below -100,
the -999 placeholders, are removed, then features whose smallest value occurs more than 5 times).
As MAF's code does: MAF's split without shuffling, normalised by the mean and standard deviation
(``ddof=0``) of train and valid together.

BSDS300 (:func:`load_bsds300`, 63-D): ``BSDS300.hdf5`` holds the data sets ``train``
(1,000,000 x 63), ``validation`` (50,000) and ``test`` (250,000): 8x8 natural-image patches
without the 64th pixel (MAF's display code rebuilds it as minus the sum of the others). As MAF's
code does: read as stored, no further processing. Needs h5py (``pip install h5py``, or the
``tabular`` extra).

Example::

    power = load_power("data")                   # data/power/data.npy
    power.sizes, power.dim                       # ((1659917, 184435, 204928), 6)
    gas = load_gas("data/gas", dtype=torch.float64)
"""

from __future__ import annotations

import shlex
import warnings
import zipfile
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np
import torch

from .files import DatasetFileError, DatasetFileMissing, PathLike, corrupt
from .tabular import (ZENODO, TabularSplits, check_dtype, check_table, find_data_file, make_splits, split_tail,
                      standardise)

POWER_SEED = 42
POWER_KEPT = [0, 2, 4, 5, 6, 7]  # of the 8 raw columns, after dropping 3 (intensity) and 1 (reactive power)
GAS_DROPPED = ("Meth", "Eth", "Time")
GAS_CORRELATION = 0.98
GAS_NPZ, GAS_PICKLE = "ethylene_CO.npz", "ethylene_CO.pickle"
SMALLEST_VALUE_REPEATS = 5
MINIBOONE_OUTLIER = -100.0
NPZ_IO_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile)


def published(subfolder: str, name: str) -> str:
    """Where a file is published, for error messages."""
    return f"{ZENODO} (data.tar.gz, MAF's preprocessed data: data/{subfolder}/{name})"


def load_numpy(path: Path, where: str, members: Tuple[str, ...] = ()) -> Tuple[Any, ...]:
    """The array of a ``.npy`` file (no ``members``) or the named arrays of an ``.npz`` archive,
    loaded without pickles (an object array is refused, never unpickled). The file is opened
    here, not by numpy, so that it is closed even when the archive is damaged (``numpy.load``
    leaves its own handle open when the zip directory cannot be read)."""
    kind = ".npz archive" if members else ".npy file"
    try:
        with open(path, "rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            if isinstance(loaded, np.ndarray) != (not members):
                loaded = None  # the other format: reported below, outside this try
            elif members:
                with loaded:
                    loaded = tuple(loaded[name] for name in members)
            else:
                loaded = (loaded,)
    except NPZ_IO_ERRORS as exc:
        raise corrupt(path, f"cannot be read as a {kind} ({type(exc).__name__}: {exc})", where) from None
    if loaded is None:
        raise corrupt(path, f"is not a {kind}" + (f" with arrays {list(members)}" if members else ""), where)
    return loaded


def smallest_value_count(column: np.ndarray) -> int:
    """How often the column's smallest value occurs (MAF's test for a discrete feature)."""
    return int(np.count_nonzero(column == column.min()))


def without_repeated_minimum(x: np.ndarray) -> List[int]:
    """Indices of the columns whose smallest value occurs at most 5 times (the kept features)."""
    return [j for j in range(x.shape[1]) if smallest_value_count(x[:, j]) <= SMALLEST_VALUE_REPEATS]


# -- POWER --------------------------------------------------------------------------------------
def load_power(data_dir: PathLike, dtype: torch.dtype = torch.float32) -> TabularSplits:
    """POWER (6-D) from ``power/data.npy``, preprocessed as MAF's code does (module docstring)."""
    check_dtype(dtype)
    where = published("power", "data.npy")
    path = find_data_file(data_dir, "data.npy", "power", where)
    raw = check_table(load_numpy(path, where)[0], path, where, columns=8)
    rng = np.random.RandomState(POWER_SEED)
    data = raw[rng.permutation(len(raw))][:, POWER_KEPT]
    n = len(data)
    voltage = 0.01 * rng.rand(n, 1)  # drawn first: the draw order fixes which noise each column gets
    active = 0.001 * rng.rand(n, 1)
    metering = rng.rand(n, 3)
    data = data + np.hstack((active, voltage, metering, np.zeros((n, 1))))
    train, valid, test = split_tail(data, path, where)
    fit = data[:len(train) + len(valid)]
    mean, std = fit.mean(axis=0), fit.std(axis=0)
    arrays = tuple(standardise(a, mean, std, path, where) for a in (train, valid, test))
    return make_splits("power", arrays, dtype, path, where, mean, std, seed=POWER_SEED,
                       steps="RandomState(42) shuffle; drop columns 3, 1; uniform noise; split; train+valid stats")


# -- GAS ----------------------------------------------------------------------------------------
def gas_conversion_command(folder: PathLike = "data/gas") -> str:
    """The one-line shell command that converts MAF's ``ethylene_CO.pickle`` in ``folder`` to
    the ``ethylene_CO.npz`` that :func:`load_gas` reads (run it where pandas is installed)."""
    code = ("import numpy as np, pandas as pd; d = pd.read_pickle('ethylene_CO.pickle'); "
            "np.savez('ethylene_CO.npz', values=d.to_numpy(dtype='float64'), "
            "columns=np.array([str(c) for c in d.columns]))")
    return f"cd {shlex.quote(str(folder))} && python -c \"{code}\""


def find_gas(data_dir: PathLike) -> Path:
    """The converted ``ethylene_CO.npz``; if only the pickle is there, say how to convert it."""
    where = published("gas", GAS_PICKLE)
    try:
        return find_data_file(data_dir, GAS_NPZ, "gas", where)
    except DatasetFileMissing as missing:
        for folder in (Path(data_dir), Path(data_dir) / "gas"):
            if (folder / GAS_PICKLE).is_file():
                raise DatasetFileMissing(
                    f"found {folder / GAS_PICKLE} but not its conversion {GAS_NPZ}: this package never unpickles "
                    f"a downloaded file (unpickling can run any code). Convert it once, where pandas is "
                    f"installed, with: {gas_conversion_command(folder)}"
                ) from None
        folder = Path(data_dir) if Path(data_dir).name == "gas" else Path(data_dir) / "gas"
        raise DatasetFileMissing(
            f"{missing}. The archive holds gas/{GAS_PICKLE}: convert it once, where pandas is installed, "
            f"with: {gas_conversion_command(folder)}"
        ) from None


def read_gas(path: Path, where: str) -> Tuple[np.ndarray, List[str]]:
    """Values and column names from the converted ``.npz`` (no pickles admitted)."""
    values, columns = load_numpy(path, where, ("values", "columns"))
    values = check_table(values, path, where, what="'values'")
    if columns.dtype.kind != "U" or columns.shape != (values.shape[1],):
        raise corrupt(path, f"'columns' is {columns.dtype} {columns.shape}, expected {values.shape[1]} names", where)
    return values, columns.tolist()


def drop_named(x: np.ndarray, names: List[str], name: str) -> Tuple[np.ndarray, List[str]]:
    """Every column called ``name`` removed (``DataFrame.drop`` by label removes all of them)."""
    kept = [j for j, c in enumerate(names) if c != name]
    return x[:, kept], [names[j] for j in kept]


def correlated_counts(x: np.ndarray) -> np.ndarray:
    """Per column: how many columns, itself included, it correlates with above 0.98."""
    with np.errstate(divide="ignore", invalid="ignore"):  # a constant column: NaN, never above
        corr = np.atleast_2d(np.corrcoef(x, rowvar=False))
    return (corr > GAS_CORRELATION).sum(axis=1)


def load_gas(data_dir: PathLike, dtype: torch.dtype = torch.float32) -> TabularSplits:
    """GAS (8-D) from ``gas/ethylene_CO.npz`` (the converted pickle), preprocessed as MAF's code
    does (module docstring)."""
    check_dtype(dtype)
    path = find_gas(data_dir)
    where = published("gas", GAS_PICKLE)
    data, names = read_gas(path, where)
    for name in GAS_DROPPED:
        if name not in names:
            raise corrupt(path, f"has no column named {name!r} (MAF's code drops it); columns: {names}", where)
        data, names = drop_named(data, names, name)
    dropped = []
    counts = correlated_counts(data)
    while data.shape[1] and (counts > 1).any():
        first = int(np.flatnonzero(counts > 1)[0])
        dropped.append(names[first])
        data, names = drop_named(data, names, names[first])
        counts = correlated_counts(data) if data.shape[1] else counts[:0]
    mean, std = data.mean(axis=0), data.std(axis=0, ddof=1)
    data = standardise(data, mean, std, path, where)
    arrays = split_tail(data, path, where)
    return make_splits("gas", arrays, dtype, path, where, mean, std, columns=names, correlated_dropped=dropped,
                       steps="drop Meth, Eth, Time; drop correlated (>0.98) by name; all-rows stats ddof=1; split")


# -- HEPMASS ------------------------------------------------------------------------------------
def read_csv(path: Path, where: str) -> Tuple[List[str], np.ndarray]:
    """Header names and the numbers of a comma-separated file with one header line."""
    try:
        with open(path, encoding="latin-1") as handle:
            names = handle.readline().rstrip("\r\n").split(",")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": reported below as no rows
            table = np.loadtxt(path, delimiter=",", skiprows=1, comments=None, dtype=np.float64, ndmin=2)
    except (ValueError, OSError) as exc:
        raise corrupt(path, f"cannot be read as comma-separated numbers ({exc})", where) from None
    return names, check_table(table, path, where, what="the table")


def load_hepmass(data_dir: PathLike, dtype: torch.dtype = torch.float32) -> TabularSplits:
    """HEPMASS (21-D) from ``hepmass/1000_train.csv`` and ``1000_test.csv``, preprocessed as
    MAF's code does (module docstring)."""
    check_dtype(dtype)
    where = published("hepmass", "1000_train.csv and 1000_test.csv")
    train_path = find_data_file(data_dir, "1000_train.csv", "hepmass", where)
    test_path = find_data_file(train_path.parent, "1000_test.csv", "hepmass", where)
    train_names, train_table = read_csv(train_path, where)
    test_names, test_table = read_csv(test_path, where)
    if train_table.shape[1] != len(train_names) or train_table.shape[1] < 2:
        raise corrupt(train_path, f"{train_table.shape[1]} columns under {len(train_names)} names", where)
    if test_table.shape[1] not in (len(test_names), len(test_names) - 1):
        raise corrupt(test_path, f"{test_table.shape[1]} columns under {len(test_names)} names", where)
    names = train_names[1:]
    if test_names[1:-1] != names:
        raise corrupt(test_path, f"without its label and last column it has columns {test_names[1:-1]}, "
                                 f"the training file {names}", where)
    train = train_table[train_table[:, 0] == 1, 1:]
    test = test_table[test_table[:, 0] == 1, 1:len(test_names) - 1]
    if len(train) == 0 or len(test) == 0:
        raise corrupt(train_path if len(train) == 0 else test_path, "has no signal rows (label 1)", where)
    mean, std = train.mean(axis=0), train.std(axis=0, ddof=1)
    train, test = standardise(train, mean, std, train_path, where), standardise(test, mean, std, train_path, where)
    kept = without_repeated_minimum(train)
    train, test = train[:, kept], test[:, kept]
    n_valid = int(0.1 * len(train))
    if n_valid < 1:
        raise corrupt(train_path, f"{len(train)} signal rows are too few to set 10% aside for validation", where)
    arrays = (train[:len(train) - n_valid], train[len(train) - n_valid:], test)
    return make_splits("hepmass", arrays, dtype, train_path, where, mean[kept], std[kept],
                       columns=[names[j] for j in kept], dropped=[n for j, n in enumerate(names) if j not in kept],
                       steps="signal rows; drop label (and test's last column); train stats ddof=1; "
                             "drop features whose smallest value repeats > 5 times; last 10% of train valid")


# -- MINIBOONE ----------------------------------------------------------------------------------
def clean_miniboone_raw(raw: np.ndarray) -> np.ndarray:
    """The cleaning MAF applied before publishing ``miniboone/data.npy`` (a comment in MAF's code),
    for UCI's raw table: rows whose first feature is below -100 removed, then features whose
    smallest value occurs more than 5 times. :func:`load_miniboone` does not redo it."""
    rows = raw[~(raw[:, 0] < MINIBOONE_OUTLIER)]
    return rows[:, without_repeated_minimum(rows)]


def load_miniboone(data_dir: PathLike, dtype: torch.dtype = torch.float32) -> TabularSplits:
    """MINIBOONE (43-D) from ``miniboone/data.npy``, split and normalised as MAF's code does."""
    check_dtype(dtype)
    where = published("miniboone", "data.npy")
    path = find_data_file(data_dir, "data.npy", "miniboone", where)
    data = check_table(load_numpy(path, where)[0], path, where, columns=43)
    train, valid, test = split_tail(data, path, where)
    fit = data[:len(train) + len(valid)]
    mean, std = fit.mean(axis=0), fit.std(axis=0)
    arrays = tuple(standardise(a, mean, std, path, where) for a in (train, valid, test))
    return make_splits("miniboone", arrays, dtype, path, where, mean, std,
                       steps="split (no shuffle); train+valid stats ddof=0")


# -- BSDS300 ------------------------------------------------------------------------------------
def import_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise ImportError("reading BSDS300.hdf5 needs h5py: pip install h5py "
                          "(or pip install 'pyro-ffjord[tabular]')") from None
    return h5py


def load_bsds300(data_dir: PathLike, dtype: torch.dtype = torch.float32) -> TabularSplits:
    """BSDS300 (63-D) from ``BSDS300/BSDS300.hdf5``, its three splits as stored (MAF's code)."""
    check_dtype(dtype)
    where = published("BSDS300", "BSDS300.hdf5")
    path = find_data_file(data_dir, "BSDS300.hdf5", "BSDS300", where)
    h5py = import_h5py()
    arrays = []
    try:
        with h5py.File(path, "r") as handle:
            for key in ("train", "validation", "test"):
                node = handle.get(key)
                if not isinstance(node, h5py.Dataset):
                    raise corrupt(path, f"has no data set {key!r} (holds {sorted(handle)})", where)
                arrays.append(check_table(node[()], path, where, columns=63, what=f"data set {key!r}"))
    except DatasetFileError:  # ours, raised above (DatasetFileError is a ValueError too)
        raise
    except (OSError, KeyError, ValueError) as exc:  # h5py's errors for a damaged or foreign file
        raise corrupt(path, f"cannot be read as HDF5 ({type(exc).__name__}: {exc})", where) from None
    return make_splits("bsds300", tuple(arrays), dtype, path, where, steps="the stored splits, unchanged")
