"""COCO RLE / LZ-String helpers (lmeec_jax.data.rle)."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from lmeec_jax.data.rle import (
    RLEError,
    check_rle,
    compress_counts,
    counts_to_runs,
    decode_rle,
    decompress_counts,
    encode_mask,
    relation_entry_to_rle,
    rle_area,
    rle_to_relation_entry,
    runs_to_counts,
)


def _masks():
    rng = np.random.default_rng(0)
    out = [np.zeros((5, 7), np.uint8), np.ones((5, 7), np.uint8), np.eye(6, dtype=np.uint8)]
    for _ in range(40):
        h, w = rng.integers(1, 50, 2)
        out.append((rng.random((h, w)) < rng.random()).astype(np.uint8))
    big = np.zeros((270, 480), np.uint8)
    big[100:200, 37:301] = 1
    out.append(big)
    return out


def test_encode_decode_round_trip():
    for m in _masks():
        rle = encode_mask(m)
        assert rle["size"] == list(m.shape) and isinstance(rle["counts"], str)
        d = decode_rle(rle)
        assert d.dtype == np.uint8 and d.shape == m.shape
        np.testing.assert_array_equal(d, m)
        assert rle_area(rle) == int(m.sum())
        # pycocotools reads our encoding and agrees
        np.testing.assert_array_equal(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}), m)


def test_encode_accepts_bool_and_nonzero():
    m = np.array([[0, 3], [True, 0]])
    np.testing.assert_array_equal(decode_rle(encode_mask(m)), [[0, 1], [1, 0]])
    np.testing.assert_array_equal(decode_rle(encode_mask(m.astype(bool))), [[0, 1], [1, 0]])


def test_runs_codec_matches_pycocotools():
    rng = np.random.default_rng(1)
    for _ in range(50):
        runs = [int(v) for v in rng.integers(0, 5000, rng.integers(1, 30))]
        h, w = 1, sum(runs)
        if w == 0:
            continue
        coco = mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)
        assert runs_to_counts(runs) == coco["counts"].decode()
        assert counts_to_runs(coco["counts"].decode()) == runs


def test_uncompressed_counts_decode():
    # column-major runs: 2 zeros, 3 ones, 1 zero over a 2x3 mask
    m = decode_rle({"size": [2, 3], "counts": [2, 3, 1]})
    np.testing.assert_array_equal(m, [[0, 1, 1], [0, 1, 0]])


@pytest.mark.parametrize(
    "rle, words",
    [
        ("abc", "COCO RLE object"),
        ({"size": [2, 2]}, "'counts'"),
        ({"counts": "4"}, "'size'"),
        ({"size": [2], "counts": "4"}, "[height, width]"),
        ({"size": [2, -1], "counts": "4"}, "non-negative"),
        ({"size": [2, 2], "counts": "4~"}, "invalid character"),
        ({"size": [2, 2], "counts": "1l"}, "ends in the middle"),  # 'l' = 0x3c: continuation bit set
        ({"size": [2, 2], "counts": "3"}, "cover 3 pixels but size 2x2 has 4"),
        ({"size": [2, 2], "counts": 5}, "must be a string"),
        ({"size": [2, 2], "counts": [1, -3]}, "not a non-negative integer"),
    ],
)
def test_bad_rle_messages(rle, words):
    with pytest.raises(RLEError) as e:
        decode_rle(rle)
    assert isinstance(e.value, ValueError)
    assert words in str(e.value)


def test_negative_run_detected():
    # from the 4th value on, a value is a delta to the value two places earlier:
    # runs 1, 6, 1 then delta -7 ('I' = 48 + (-7 & 0x1f), sign bit set) -> 6 - 7 = -1
    counts = runs_to_counts([1, 6, 1]) + "I"
    with pytest.raises(RLEError, match="run 3 of the RLE counts is negative"):
        check_rle({"size": [1, 7], "counts": counts})


def test_expect_size():
    rle = encode_mask(np.zeros((270, 480), np.uint8))
    assert check_rle(rle, expect_size=(270, 480))[0] == (270, 480)
    with pytest.raises(RLEError, match="mask is 270x480, expected 480x480"):
        decode_rle(rle, expect_size=(480, 480))


def test_lzstring_round_trip_and_relation_entries():
    for m in _masks()[:10] + _masks()[-1:]:
        rle = encode_mask(m)
        enc = compress_counts(rle["counts"])
        assert isinstance(enc, str) and enc != rle["counts"]
        assert decompress_counts(enc) == rle["counts"]
        entry = rle_to_relation_entry(rle)
        assert entry["width"] == m.shape[1] and entry["height"] == m.shape[0]
        back = relation_entry_to_rle(entry)
        assert back == rle
        np.testing.assert_array_equal(decode_rle(back), m)


def test_lzstring_errors():
    for bad in ["", "!!!!", "zzzz"]:
        with pytest.raises(RLEError):
            decompress_counts(bad)
    with pytest.raises(RLEError, match="lacks"):
        relation_entry_to_rle({"width": 3, "encodedMask": "x"})
    # valid LZ-String, but the counts do not fit the stated size
    entry = rle_to_relation_entry(encode_mask(np.ones((4, 4), np.uint8)))
    entry["width"] = 5
    with pytest.raises(RLEError, match="cover 16 pixels"):
        relation_entry_to_rle(entry)
