"""The shared IO helpers (lmeec_jax.io), the one data error type and the overlay drawing."""

import json
import os
import pickle

import numpy as np
import pytest

from lmeec_jax.data.errors import DataError
from lmeec_jax.io import atomic_write, read_json, write_json_atomic


def test_read_json_errors_name_the_file(tmp_path):
    p = tmp_path / "x.json"
    with pytest.raises(DataError, match="GT file not found") as ei:
        read_json(p, what="GT")
    assert ei.value.path == str(p) and str(ei.value).startswith(f"{p}: ")
    p.write_text('{"a": ')
    with pytest.raises(DataError, match="invalid JSON") as ei:
        read_json(p, take="t1")
    e = ei.value
    assert e.take == "t1" and "\n" not in str(e) and str(e).endswith("(take='t1')")
    p.write_bytes(b'"\xff\xfe"')
    with pytest.raises(DataError, match="unreadable"):
        read_json(p)
    p.write_text('{"a": [1, 2]}')
    assert read_json(p) == {"a": [1, 2]}


def test_atomic_write(tmp_path):
    p = tmp_path / "out.json"
    obj = {"b": [1, 2.5, "x"], "a": None}
    write_json_atomic(p, obj, indent=1)
    assert p.read_text() == json.dumps(obj, indent=1)
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as f:
        f.write("x")
    assert os.stat(p).st_mode == os.stat(plain).st_mode  # same permissions as open(path, "w")
    with pytest.raises(RuntimeError):
        with atomic_write(p, "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert p.read_text() == json.dumps(obj, indent=1)  # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["out.json", "plain.txt"]  # no temporary left behind
    with atomic_write(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError):
        with atomic_write(p, "a"):
            pass


def test_one_data_error_type():
    from lmeec_jax.data import egoexo, images
    from lmeec_jax.data.rle import RLEError, check_rle
    from lmeec_jax.evaluation.gt import GTBuildError

    assert RLEError is DataError and GTBuildError is DataError
    assert egoexo.DataError is DataError and images.DataError is DataError
    with pytest.raises(DataError):
        check_rle({"size": [2, 2], "counts": "0"})
    e = DataError("bad", path="p.json", take="t", camera="c", frame="0", obj="o")
    assert str(e) == "p.json: bad (take='t', camera='c', frame='0', object='o')"
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is DataError and str(e2) == str(e) and e2.obj == "o"


def test_overlay():
    from lmeec_jax.evaluation.overlay import GT_COLOUR, PRED_COLOUR, mask_contour, overlay

    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    m = np.zeros((20, 30), bool)
    m[5:15, 8:20] = True
    c = mask_contour(m)
    assert c[5, 10] and c[6, 10] and not c[7, 10] and not c[10, 14] and c.sum() < m.sum()
    out = overlay(img, m, PRED_COLOUR, alpha=0.3)
    want = (0.7 * img[10, 14].astype(np.float32) + 0.3 * np.float32(PRED_COLOUR)).astype(np.uint8)
    np.testing.assert_array_equal(out[10, 14], want)
    np.testing.assert_array_equal(out[0, 0], img[0, 0])
    out = overlay(img, None, GT_COLOUR, m)
    np.testing.assert_array_equal(out[c], np.broadcast_to(np.uint8(GT_COLOUR), (int(c.sum()), 3)))
    np.testing.assert_array_equal(out[~c], img[~c])
