"""pyro_ffjord.datasets.matfile: images from MATLAB files, one per row or per column, column-major
pixels, 0/1 or grey levels; each bad variable named with the file and where it is published."""

from __future__ import annotations

import numpy as np
import pytest

from pyro_ffjord.datasets.files import DatasetFileError
from pyro_ffjord.datasets.matfile import load_mat, mat_images

scipy_io = pytest.importorskip("scipy.io")
PUBLISHED = "https://example.org/images.mat"


def test_rows_and_columns_are_read_upright(tmp_path):
    img = np.zeros((3, 4, 2))
    img[:, 0, :] = 1  # the top row is set: tells the orientation
    rows = img.reshape(3, 8, order="F")
    scipy_io.savemat(str(tmp_path / "a.mat"), {"rows": rows, "cols": rows.T * 0.5})
    mat = load_mat(tmp_path / "a.mat", PUBLISHED)
    x = mat_images(tmp_path / "a.mat", mat, "rows", PUBLISHED, 3, (4, 2))
    assert x.dtype == np.uint8 and np.array_equal(x.reshape(-1, 4, 2), img)
    g = mat_images(tmp_path / "a.mat", mat, "cols", PUBLISHED, None, (4, 2), images_in_columns=True, values="unit")
    assert g.dtype == np.float32 and np.array_equal(g.reshape(-1, 4, 2), img * 0.5)
    assert g.flags.c_contiguous and x.flags.c_contiguous


@pytest.mark.parametrize(
    "variable, kwargs, message",
    [
        ("missing", {}, r"no variable 'missing' \(the file has \['cols', 'rows'\]\)"),
        ("rows", {"count": 5}, r"rows has shape \(3, 8\), expected \(5, 8\)"),
        ("cols", {"count": 5, "images_in_columns": True}, r"cols has shape \(8, 3\), expected \(8, 5\)"),
        ("cols", {"images_in_columns": True}, "cols holds values other than 0 and 1"),
        ("rows", {"values": "unit"}, r"rows holds values outside \[0, 1\]"),
    ],
)
def test_bad_variables_are_named(tmp_path, variable, kwargs, message):
    rows = np.full((3, 8), 2.0)
    scipy_io.savemat(str(tmp_path / "a.mat"), {"rows": rows, "cols": rows.T / 4})
    mat = load_mat(tmp_path / "a.mat", PUBLISHED)
    kwargs = {"count": None, "image_shape": (4, 2), **kwargs}
    with pytest.raises(DatasetFileError, match=message) as info:
        mat_images(tmp_path / "a.mat", mat, variable, PUBLISHED, **kwargs)
    assert str(tmp_path / "a.mat") in str(info.value) and PUBLISHED in str(info.value)


def test_unreadable_file_and_bad_arguments(tmp_path):
    (tmp_path / "junk.mat").write_bytes(b"MATLAB? no")
    with pytest.raises(DatasetFileError, match="cannot be read as a MATLAB file") as info:
        load_mat(tmp_path / "junk.mat", PUBLISHED)
    assert PUBLISHED in str(info.value)
    scipy_io.savemat(str(tmp_path / "s.mat"), {"s": np.array([[0.5 + 1j]])})  # complex: not a grey level
    mat = load_mat(tmp_path / "s.mat", PUBLISHED)
    with pytest.raises(DatasetFileError, match="has dtype .* expected numbers in"):
        mat_images(tmp_path / "s.mat", mat, "s", PUBLISHED, None, (1, 1), values="unit")
    with pytest.raises(ValueError, match="values='grey'"):
        mat_images(tmp_path / "s.mat", mat, "s", PUBLISHED, None, (1, 1), values="grey")
