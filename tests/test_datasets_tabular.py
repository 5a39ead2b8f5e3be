"""pyro_ffjord.datasets.tabular and maf_tabular: small files written here in each published format
(MAF's data.npy, the converted GAS .npz, HEPMASS's CSVs, BSDS300's HDF5), built so that every
preprocessing step of MAF's code changes the result observably; missing and corrupt files;
the bundled breast-cancer table."""

from __future__ import annotations

import dataclasses
import gc
import os
import pickle
import re
import sys

import numpy as np
import pytest
import torch

from pyro_ffjord.datasets import maf_tabular, tabular
from pyro_ffjord.datasets.files import DatasetFileError, DatasetFileMissing

ZENODO = "zenodo.org/record/1161203"


def _standardised(splits, ddof=0, rows=None):
    """Assert the columns of ``rows`` (default train) have mean 0 and std 1."""
    x = splits.train if rows is None else rows
    assert torch.allclose(x.mean(0), torch.zeros(x.shape[1], dtype=x.dtype), atol=1e-5)
    assert torch.allclose(x.std(0, correction=ddof), torch.ones(x.shape[1], dtype=x.dtype), atol=1e-5)


class _System:
    """Pickles to a call of os.system that would create ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# -- POWER --------------------------------------------------------------------------------------
def _power_raw(n=200):
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(n, 8)) * [1, 1, 5, 1, 3, 3, 3, 1] + [2, 0, 240, 0, 1, 1, 6, 0]
    raw[:, 1] = 1e6 + 1e3 * np.arange(n)  # reactive power and intensity: MAF drops them; huge on purpose
    raw[:, 3] = -5e5
    raw[:, 4:7] = rng.integers(0, 4, size=(n, 3))  # sub-meterings are whole numbers (MAF adds U[0,1) noise)
    raw[:, 7] = 1000 + np.arange(n)  # time: unique per row, unchanged (zero noise), so it identifies rows
    return raw


def _maf_power(raw):
    """MAF's POWER steps, written out plainly as an oracle: in-place shuffle, np.delete, noise."""
    data = raw.copy()
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    n = len(data)
    data = np.delete(np.delete(data, 3, axis=1), 1, axis=1)
    voltage, active, metering = 0.01 * rng.rand(n, 1), 0.001 * rng.rand(n, 1), rng.rand(n, 3)
    data = data + np.concatenate([active, voltage, metering, np.zeros((n, 1))], axis=1)
    n_test = int(0.1 * n)
    test, rest = data[-n_test:], data[:-n_test]
    n_valid = int(0.1 * len(rest))
    valid, train = rest[-n_valid:], rest[:-n_valid]
    both = np.concatenate([train, valid])
    return [(a - both.mean(0)) / both.std(0) for a in (train, valid, test)]


@pytest.fixture
def power_dir(tmp_path):
    folder = tmp_path / "data" / "power"
    folder.mkdir(parents=True)
    np.save(folder / "data.npy", _power_raw())
    return folder


def test_power_matches_maf_steps_exactly(power_dir):
    got = maf_tabular.load_power(power_dir, dtype=torch.float64)
    assert got.name == "power" and got.dim == 6 and got.sizes == (162, 18, 20) == tabular.maf_split_sizes(200)
    for tensor, expected in zip((got.train, got.valid, got.test), _maf_power(_power_raw())):
        np.testing.assert_allclose(tensor.numpy(), expected, rtol=0, atol=1e-12)
    _standardised(got, rows=torch.cat([got.train, got.valid]))  # train+valid statistics, ddof=0
    assert got.train.mean(0).abs().max() > 1e-3  # ... not train alone


def test_power_drops_columns_1_and_3_and_adds_the_published_noise(power_dir):
    got = maf_tabular.load_power(power_dir, dtype=torch.float64)
    x = (torch.cat([got.train, got.valid, got.test]) * got.std + got.mean).numpy()
    rows = np.rint(x[:, 5]).astype(int) - 1000  # time identifies the raw row: its noise is exactly zero
    np.testing.assert_allclose(x[:, 5], rows + 1000, rtol=0, atol=1e-9)
    assert sorted(rows) == list(range(200)) and rows[:10].tolist() != list(range(10))  # a shuffled partition
    noise = x - _power_raw()[rows][:, [0, 2, 4, 5, 6, 7]]
    for column, bound in enumerate([0.001, 0.01, 1, 1, 1]):
        assert (noise[:, column] > -1e-9).all() and (noise[:, column] < bound + 1e-9).all()
        assert noise[:, column].max() > bound / 2  # the noise is there, at its published scale
    assert np.abs(x).max() < 1e4  # no trace of the dropped, huge columns 1 (1e6 + ...) and 3 (-5e5)


def test_power_determinism_dtype_and_both_folder_conventions(power_dir):
    first = tabular.load("power", power_dir)
    second = tabular.load("POWER", power_dir.parent)  # MAF's data/ folder
    assert first.train.dtype == torch.float32 and torch.equal(first.train, second.train)
    assert torch.equal(first.test, second.test) and first.source == second.source
    assert torch.equal(first.valid, maf_tabular.load_power(power_dir, torch.float64).valid.float())
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.train = first.test
    with pytest.raises(ValueError, match="float32"):
        tabular.load("power", power_dir, dtype=torch.int64)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((200, 7)), "7 columns, expected 8"),
        (np.zeros(200), "expected a 2-D table"),
        (np.zeros((200, 8), dtype=np.int64), "dtype int64"),
        (np.where(np.arange(1600).reshape(200, 8) == 77, np.nan, 1.0), "non-finite"),
        (np.zeros((5, 8)), "too few"),
    ],
)
def test_power_corrupt_arrays(tmp_path, array, match):
    np.save(tmp_path / "data.npy", array)
    with pytest.raises(DatasetFileError, match=match) as info:
        maf_tabular.load_power(tmp_path)
    assert "data.npy" in str(info.value) and ZENODO in str(info.value)


def test_npy_truncated_or_pickled_is_corrupt_and_never_unpickled(tmp_path):
    np.save(tmp_path / "data.npy", _power_raw())
    raw = (tmp_path / "data.npy").read_bytes()
    (tmp_path / "data.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetFileError, match="cannot be read"):
        maf_tabular.load_power(tmp_path)
    marker = tmp_path / "executed"
    np.save(tmp_path / "data.npy", np.array([_System(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetFileError, match="cannot be read"):
        maf_tabular.load_miniboone(tmp_path)
    assert not marker.exists()


# -- MINIBOONE ----------------------------------------------------------------------------------
def test_miniboone_split_without_shuffle_and_train_valid_statistics(tmp_path):
    raw = np.random.default_rng(2).gamma(2.0, size=(100, 43)) * np.arange(1, 44)
    np.save(tmp_path / "data.npy", raw)
    got = tabular.load("miniboone", tmp_path, dtype=torch.float64)
    assert got.dim == 43 and got.sizes == (81, 9, 10) and got.info["published"].startswith("https://zenodo")
    mean, std = raw[:90].mean(0), raw[:90].std(0)
    np.testing.assert_allclose(got.test.numpy(), (raw[90:] - mean) / std, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.train.numpy(), (raw[:81] - mean) / std, rtol=0, atol=1e-12)
    _standardised(got, rows=torch.cat([got.train, got.valid]))
    assert torch.equal(got.valid, tabular.load("miniboone", tmp_path, dtype=torch.float64).valid)
    np.save(tmp_path / "data.npy", np.random.default_rng(2).normal(size=(100, 50)))  # UCI's raw width
    with pytest.raises(DatasetFileError, match="50 columns, expected 43"):
        tabular.load("miniboone", tmp_path)


def test_clean_miniboone_raw_removes_outlier_rows_before_counting(tmp_path):
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(60, 50))
    discrete = [1, 8, 15, 22, 29, 36, 49]
    raw[:, discrete] = np.maximum(raw[:, discrete], -0.2)  # smallest value repeated: MAF drops the feature
    raw[[4, 9], 30] = raw[:, 30].min() - 1  # smallest value only twice, others unique: kept
    with_outliers = np.insert(raw, [5, 17, 17, 40, 52, 59], -999.0, axis=0)  # 6 rows: would repeat every min
    cleaned = maf_tabular.clean_miniboone_raw(with_outliers)
    kept = [j for j in range(50) if j not in discrete]
    assert cleaned.shape == (60, 43) and np.array_equal(cleaned, raw[:, kept])


# -- HEPMASS ------------------------------------------------------------------------------------
_KINDS = ["c"] * 20 + ["quirk", "clip"] + ["btag"] * 5
_ORDER = np.random.default_rng(4).permutation(27)  # scatter the discrete features among the 27
_KEPT = [j for j in range(27) if _KINDS[_ORDER[j]] in ("c", "quirk")]


def _hepmass_table(n, rng, label_first=True):
    label = np.arange(n) % 2 == 0
    cols = []
    for kind in _KINDS:
        if kind == "c":
            cols.append(rng.normal(size=n))
        elif kind == "quirk":  # two values repeat, the smallest (0) only 3 times: MAF's count keeps it
            col = rng.integers(1, 3, size=n).astype(float)
            col[np.flatnonzero(label)[:3]] = 0.0
            cols.append(col)
        elif kind == "clip":
            cols.append(np.maximum(rng.normal(size=n), -0.3))
        else:
            cols.append(rng.integers(0, 3, size=n).astype(float))
    features = np.stack(cols, axis=1)[:, _ORDER]
    features[~label] += 50.0  # background rows: far off, so keeping any would show in the statistics
    return np.column_stack([label.astype(float), features])


def _write_csv(path, table, names):
    np.savetxt(path, table, fmt="%.17g", delimiter=",", header=",".join(names), comments="")


@pytest.fixture
def hepmass_dir(tmp_path):
    rng = np.random.default_rng(5)
    names = ["# label"] + [f"f{j}" for j in range(27)]
    train, test = _hepmass_table(240, rng), _hepmass_table(80, rng)
    folder = tmp_path / "hepmass"
    folder.mkdir()
    _write_csv(folder / "1000_train.csv", train, names)
    _write_csv(folder / "1000_test.csv", np.column_stack([test, np.full(80, 1000.0)]), names + ["mass"])
    return folder, names, train, test


def test_hepmass_matches_maf_steps(hepmass_dir):
    folder, names, train, test = hepmass_dir
    got = tabular.load("hepmass", folder.parent, dtype=torch.float64)
    assert got.dim == 21 and got.sizes == (108, 12, 40)  # 120 signal rows: last 12 valid; 40 test
    signal = train[train[:, 0] == 1, 1:]
    mean, std = signal.mean(0), signal.std(0, ddof=1)
    expected_test = ((test[test[:, 0] == 1, 1:] - mean) / std)[:, _KEPT]
    np.testing.assert_allclose(got.test.numpy(), expected_test, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.valid.numpy(), ((signal[-12:] - mean) / std)[:, _KEPT], rtol=0, atol=1e-12)
    _standardised(got, ddof=1, rows=torch.cat([got.train, got.valid]))
    assert got.info["dropped"] == [f"f{j}" for j in range(27) if j not in _KEPT]
    assert f"f{list(_ORDER).index(20)}" in got.info["columns"]  # the "quirk" feature stays, as MAF counts
    assert torch.equal(got.train, tabular.load("hepmass", folder, dtype=torch.float64).train)


def test_hepmass_test_rows_one_field_short_as_pandas_reads_them(hepmass_dir):
    folder, names, train, test = hepmass_dir
    first = maf_tabular.load_hepmass(folder)
    _write_csv(folder / "1000_test.csv", test, names + ["mass"])  # header names mass, rows lack it
    assert torch.equal(maf_tabular.load_hepmass(folder).test, first.test)


@pytest.mark.parametrize("damage", ["names", "truncated", "text", "no_signal"])
def test_hepmass_corrupt_files(hepmass_dir, damage):
    folder, names, train, test = hepmass_dir
    path = folder / "1000_test.csv"
    if damage == "names":
        _write_csv(path, np.column_stack([test, np.ones(80)]), names[:1] + [f"g{j}" for j in range(27)] + ["m"])
    elif damage == "truncated":
        text = path.read_text()
        path.write_text(text[: len(text) - 40])
    elif damage == "text":
        path.write_text(path.read_text().replace("1000", "n/a", 1))
    else:
        test[:, 0] = 0
        _write_csv(path, np.column_stack([test, np.ones(80)]), names + ["mass"])
    with pytest.raises(DatasetFileError) as info:
        maf_tabular.load_hepmass(folder)
    assert "1000_test.csv" in str(info.value) and ZENODO in str(info.value)


# -- GAS ----------------------------------------------------------------------------------------
def _gas_table(n=300):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(7, n))

    def near(v):
        return v + 0.01 * rng.normal(size=n)

    columns = [("Time", np.arange(n, dtype=float)), ("TGS2602", x[0]), ("TGS2602", x[1]), ("S_a", near(x[0])),
               ("S_b", near(x[1])), ("Meth", 10 * x[2]), ("S_c", x[2]), ("S_c2", near(x[2])), ("S_d", x[3]),
               ("S_d2", near(x[3])), ("S_e", x[4]), ("S_e2", near(x[4])), ("S_e3", near(x[4])), ("S_f", x[5]),
               ("S_neg", near(-x[5])), ("S_g", 3 + 2 * x[6]), ("Eth", x[6])]
    return [c for c, _ in columns], np.stack([v for _, v in columns], axis=1)


def _write_gas(folder, names, values):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "ethylene_CO.npz", values=values, columns=np.array(names))


def test_gas_drops_named_and_correlated_columns_like_pandas(tmp_path):
    names, values = _gas_table()
    _write_gas(tmp_path / "gas", names, values)
    got = tabular.load("gas", tmp_path, dtype=torch.float64)
    kept = ["S_a", "S_b", "S_c2", "S_d2", "S_e3", "S_f", "S_neg", "S_g"]  # anti-correlated S_neg stays
    assert got.dim == 8 and got.info["columns"] == kept and got.sizes == (243, 27, 30)
    # both columns named TGS2602 go (drop by name), though the second correlates only with S_b
    assert got.info["correlated_dropped"] == ["TGS2602", "S_c", "S_d", "S_e", "S_e2"]
    chosen = values[:, [names.index(c) for c in kept]]
    expected = (chosen - chosen.mean(0)) / chosen.std(0, ddof=1)  # all rows, ddof=1, then split in order
    np.testing.assert_allclose(torch.cat([got.train, got.valid, got.test]).numpy(), expected, rtol=0, atol=1e-12)
    assert torch.equal(got.test, tabular.load("gas", tmp_path / "gas", dtype=torch.float64).test)


def test_gas_pickle_without_conversion_names_the_command_and_is_never_opened(tmp_path):
    marker = tmp_path / "executed"
    folder = tmp_path / "gas"
    folder.mkdir()
    (folder / "ethylene_CO.pickle").write_bytes(pickle.dumps(_System(marker)))
    for data_dir in (tmp_path, folder):
        with pytest.raises(DatasetFileMissing) as info:
            maf_tabular.load_gas(data_dir)
        message = str(info.value)
        assert str(folder / "ethylene_CO.pickle") in message and maf_tabular.gas_conversion_command(folder) in message
    assert not marker.exists()
    command = maf_tabular.gas_conversion_command(folder)
    code = re.fullmatch(r'cd (\S+) && python -c "(.*)"', command)
    assert code and code.group(1) == str(folder)
    compile(code.group(2), "<conversion>", "exec")  # the command's Python is valid as printed
    assert "pd.read_pickle('ethylene_CO.pickle')" in code.group(2) and "np.savez('ethylene_CO.npz'" in code.group(2)


def test_gas_nothing_there_names_both_files_and_zenodo(tmp_path):
    with pytest.raises(DatasetFileMissing) as info:
        tabular.load("gas", tmp_path)
    message = str(info.value)
    assert "ethylene_CO.npz" in message and "gas/ethylene_CO.pickle" in message and ZENODO in message
    assert "python -c" in message and isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("damage", ["object", "no_meth", "nan", "truncated", "npy", "columns"])
def test_gas_corrupt_archives(tmp_path, damage):
    names, values = _gas_table()
    marker = tmp_path / "executed"
    path = tmp_path / "ethylene_CO.npz"
    if damage == "object":
        np.savez(path, values=np.array([_System(marker)], dtype=object), columns=np.array(names))
    elif damage == "no_meth":
        _write_gas(tmp_path, [c.replace("Meth", "Methane") for c in names], values)
    elif damage == "nan":
        values[7, 3] = np.nan
        _write_gas(tmp_path, names, values)
    elif damage == "truncated":
        _write_gas(tmp_path, names, values)
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "npy":
        with open(path, "wb") as handle:
            np.save(handle, values)
    else:
        _write_gas(tmp_path, names[:-1], values)
    with pytest.raises(DatasetFileError) as info:
        maf_tabular.load_gas(tmp_path)
    assert "ethylene_CO.npz" in str(info.value) and ZENODO in str(info.value)
    assert not marker.exists()
    del info
    gc.collect()  # a file left open by the failed read would warn now, inside this test (filterwarnings=error)


# -- BSDS300 ------------------------------------------------------------------------------------
def _write_bsds(path, sizes=(("train", 50), ("validation", 10), ("test", 20)), width=63):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(7)
    stored = {key: rng.normal(size=(n, width)).astype(np.float32) for key, n in sizes}
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        for key, array in stored.items():
            handle.create_dataset(key, data=array)
    return stored


def test_bsds300_reads_the_stored_splits_unchanged(tmp_path):
    stored = _write_bsds(tmp_path / "BSDS300" / "BSDS300.hdf5")
    got = tabular.load("bsds300", tmp_path)
    assert got.dim == 63 and got.sizes == (50, 10, 20) and got.mean is None and got.std is None
    assert np.array_equal(got.train.numpy(), stored["train"]) and np.array_equal(got.test.numpy(), stored["test"])
    assert np.array_equal(got.valid.numpy(), stored["validation"])
    assert torch.equal(tabular.load("bsds300", tmp_path / "BSDS300", dtype=torch.float64).valid, got.valid.double())


@pytest.mark.parametrize("damage", ["width", "missing", "not_hdf5", "truncated"])
def test_bsds300_corrupt_files(tmp_path, damage):
    path = tmp_path / "BSDS300.hdf5"
    if damage == "width":
        _write_bsds(path, width=64)
    elif damage == "missing":
        _write_bsds(path, sizes=(("train", 50), ("test", 20)))
    else:
        _write_bsds(path)
        data = path.read_bytes()
        path.write_bytes(b"this is not HDF5" * 10 if damage == "not_hdf5" else data[: len(data) // 2])
    with pytest.raises(DatasetFileError) as info:
        maf_tabular.load_bsds300(tmp_path)
    assert "BSDS300.hdf5" in str(info.value) and ZENODO in str(info.value)


def test_bsds300_without_h5py_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "BSDS300.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(ImportError, match="pip install h5py"):
        maf_tabular.load_bsds300(tmp_path)


# -- every MAF set: missing files ---------------------------------------------------------------
@pytest.mark.parametrize(
    "name, filename", [("power", "data.npy"), ("gas", "ethylene_CO.npz"), ("hepmass", "1000_train.csv"),
                       ("miniboone", "data.npy"), ("bsds300", "BSDS300.hdf5")])
def test_missing_files_name_the_file_the_folder_and_zenodo(tmp_path, name, filename):
    with pytest.raises(DatasetFileMissing) as info:
        tabular.load(name, tmp_path)
    message = str(info.value)
    assert filename in message and str(tmp_path) in message and ZENODO in message
    assert isinstance(info.value, FileNotFoundError)


def test_hepmass_test_file_missing_is_named(hepmass_dir):
    folder = hepmass_dir[0]
    (folder / "1000_test.csv").unlink()
    with pytest.raises(DatasetFileMissing, match=r"1000_test\.csv.*zenodo\.org/record/1161203"):
        tabular.load("hepmass", folder)


def test_load_dispatch_errors():
    with pytest.raises(ValueError, match="unknown tabular data set 'cifar'.*power, gas"):
        tabular.load("cifar", ".")
    with pytest.raises(ValueError, match="pass data_dir"):
        tabular.load("gas")


# -- breast_cancer (bundled with scikit-learn) --------------------------------------------------
def test_breast_cancer_split_normalisation_and_determinism():
    from sklearn.datasets import load_breast_cancer

    got = tabular.load("breast_cancer")
    assert got.name == "breast_cancer" and got.dim == 30 and got.sizes == (462, 51, 56)
    assert got.train.dtype == torch.float32
    _standardised(got)  # training rows' statistics only
    assert (got.test.mean(0).abs() > 1e-3).any()
    again = tabular.load_breast_cancer(dtype=torch.float64)
    assert torch.equal(again.train.float(), got.train) and torch.equal(again.test.float(), got.test)
    rows = np.round((torch.cat([again.train, again.valid, again.test]) * again.std + again.mean).numpy(), 8)
    original = np.round(load_breast_cancer().data, 8)
    assert np.array_equal(rows[np.lexsort(rows.T)], original[np.lexsort(original.T)])  # a partition of the rows
    other = tabular.load_breast_cancer(seed=7)
    assert not torch.equal(other.test, got.test)
