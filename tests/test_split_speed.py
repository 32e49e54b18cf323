"""The take scheduler of the split runner (:func:`lmeec_jax.inference.split.run_take`) without a
model: each (camera, frame) of a take goes through the encoder once, for every object, every
camera pair and both directions; features are held per chunk, not per video; every object of
a pair runs in one batch with its own frame indices (a step outside its list is not one of
its frames). A recording stand-in for the :class:`ChunkRunner` makes this fast: the real
model's bits are checked in ``tests/test_predict.py`` and by the byte-identity of
``eval predict`` before and after (``benchmarks/bench_split.py`` checks (a) == (b)).
"""

import os

import numpy as np
import pytest

from lmeec_jax.data import egoexo
from lmeec_jax.data.synthetic import make_synthetic_split
from lmeec_jax.inference import split as P
from lmeec_jax.inference.runner import ChunkOut

S = 16  # the stand-in's image size
CHUNK = 3


class RecordingRunner:
    """Encode/track stand-in: features carry (camera-frame id) so each use can be traced."""

    image_size = S
    out_size = 8
    compiled: set

    def __init__(self):
        self.compiled = set()
        self.encoded = []  # image checksums, one per encoded image
        self.calls = []  # (B, ts [K, B], processed [K, B], tgt ids, src ids) per track call

    def encode(self, images):
        assert images.shape == (2, S, S, 3)
        ids = [float(np.float64(im.sum())) for im in images]
        self.encoded += ids
        return tuple((np.full(1, i), np.full(1, i), np.full(1, i), np.full(1, i)) for i in ids)

    def init_state(self, batch):
        return {"B": batch}

    def track(self, state, tgt, src, masks, processed, ts, num_frames):
        K, B = processed.shape
        assert len(tgt) == len(src) == K and masks.shape == (K, B, S, S) and num_frames.shape == (B,)
        self.compiled.add((K, B))
        self.calls.append((B, np.array(ts), np.array(processed), [float(t[0][0]) for t in tgt],
                           [float(s[0]) for s in src]))
        return state, np.zeros((K, B, 4, 4), np.float32), np.zeros((K, B), np.float32), processed

    def postprocess(self, low, scores, processed, official_hw):
        K, B = processed.shape
        m = np.zeros((K, B, self.out_size, self.out_size), bool)
        return ChunkOut(low, m, np.zeros((K, B) + tuple(official_hw), bool), np.full((K, B), 0.5, np.float32),
                        processed)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("sched")
    d = str(root / "split")
    takes = make_synthetic_split(d, 1, seed=7, n_frames=7, n_exo=2, workers=1)
    return d, takes[0]


def _records(split_dir, take, directions, frames="official"):
    return [r for d in directions for r in egoexo.list_take_videos(split_dir, take, d, frames=frames)]


@pytest.mark.parametrize("directions", [("ego2exo",), ("exo2ego",), ("ego2exo", "exo2ego")])
def test_each_camera_frame_encoded_once(split, directions):
    split_dir, take = split
    ann = egoexo.load_annotation(os.path.join(split_dir, take), take)
    recs = _records(split_dir, take, directions)
    batches = P.group_pairs(recs, 8, exact=False)
    needed = {(c, f) for b in batches for f in b.frames for c in (b.src_cam, b.tgt_cam)}
    runner = RecordingRunner()
    stats = P.TakeStats()
    done = []
    P.run_take(runner, split_dir, take, ann, batches, chunk=CHUNK, max_objects=8, stats=stats, on_done=done.append)
    # once per (camera, frame): the two views' frames and every pair and direction share them
    steps = sum(-(-len(b.frames) // CHUNK) for b in batches)
    assert len(needed) <= stats.frames_encoded <= len(needed) + steps  # + at most one padding image a step
    real = [i for i in runner.encoded if i != 0.0]
    assert len(real) == len(set(real)) == len(needed)
    assert stats.encoder_calls == stats.frames_encoded // 2
    videos_frames = sum(len(r.frames) for r in recs)
    assert stats.frames_encoded < 2 * videos_frames  # the reference encodes 2 images per video-frame
    # bounded: features of the pending chunks only (not of the videos)
    assert stats.features_peak <= len(batches) * 2 * CHUNK
    assert len(done) == len(batches) and all(r.error is None for r in done)
    # one batch per camera pair (and direction)
    pairs = {(r.direction, r.src_cam, r.tgt_cam) for r in recs}
    assert len(batches) == len(pairs)


def test_per_object_frame_indices(split):
    """Steps of the union list: an object's index counts only its own frames; steps outside
    its list are not processed for it (no memory write), and its length is its own list's."""
    split_dir, take = split
    ann = egoexo.load_annotation(os.path.join(split_dir, take), take)
    recs = _records(split_dir, take, ("ego2exo",), frames="official")
    batch = max(P.group_pairs(recs, 8, exact=False), key=lambda b: len(b.records))
    # make the lists differ: drop some frames from the objects' lists
    cut = []
    for j, r in enumerate(batch.records):
        keep = tuple(f for i, f in enumerate(r.frames) if (i + j) % 3 != 1)
        cut.append(egoexo.VideoRecord(r.take, r.src_cam, r.tgt_cam, r.obj, keep, r.direction,
                                      tuple(f for f in r.src_missing if f in keep)))
    (batch,) = P.group_pairs(cut, 8, exact=False)
    assert len(set(r.frames for r in batch.records)) > 1
    runner = RecordingRunner()
    (res,) = P.run_take(runner, split_dir, take, ann, [batch], chunk=CHUNK, max_objects=8)
    ts = np.concatenate([c[1] for c in runner.calls])[:len(batch.frames)]
    proc = np.concatenate([c[2] for c in runner.calls])[:len(batch.frames)]
    for j, r in enumerate(batch.records):
        view = egoexo.ViewMasks(ann, take, r.obj, r.src_cam)
        for u, f in enumerate(batch.frames):
            if f in r.frames:
                assert ts[u, j] == r.frames.index(f)
            else:
                assert not proc[u, j]
        predicted = {f for u, f in enumerate(batch.frames) if proc[u, j]}
        assert predicted <= set(r.frames)
        assert predicted == {f for f in r.frames if f in view and view.get(f).any()}
        assert set(res.objects[j].masks) == predicted
    assert not proc[:, len(batch.records):].any()  # padding objects


def test_corrupt_frame_fails_only_its_users(split, tmp_path):
    import shutil

    split_dir, take = split
    d = str(tmp_path / "split")
    shutil.copytree(split_dir, d)
    ann = egoexo.load_annotation(os.path.join(d, take), take)
    recs = _records(d, take, ("ego2exo", "exo2ego"))
    cams = sorted({r.tgt_cam for r in recs if r.direction == "ego2exo"})
    bad_cam = cams[-1]
    f = egoexo.camera_frames(os.path.join(d, take, bad_cam))[-1]
    with open(os.path.join(d, take, bad_cam, f + ".jpg"), "wb") as fp:
        fp.write(b"not a jpeg")
    batches = P.group_pairs(recs, 8, exact=False)
    res = P.run_take(RecordingRunner(), d, take, ann, batches, chunk=CHUNK, max_objects=8)
    for b, r in zip(batches, res):
        uses = bad_cam in (b.src_cam, b.tgt_cam) and f in b.frames
        assert (r.error is not None) == uses, b.pair
        if uses:
            assert r.error.camera == bad_cam and r.error.frame == f
