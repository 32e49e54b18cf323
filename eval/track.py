"""`python -m eval track`: find the objects of your source video in your target video.

    python -m eval track --checkpoint DIR|random:<config> --src SRC --tgt TGT \
        --src-masks MASKS --out OUT [--chunk K] [--dtype float32|bfloat16] [--no-overlay]

SRC and TGT are image folders (frames paired in natural-sort order of their names) or video
files (mp4 and others, decoded with PyAV: ``pip install av``), of the same length. MASKS is
a folder with one PNG per source frame, named like the source frame (``0001.jpg`` ->
``0001.png``): a binary PNG (0/255 or 0/1) is one object with id 1; an index PNG (values
1..K, DAVIS style) gives K objects. A source frame whose mask is missing or empty is skipped
for that object as LM-EEC skips it (no prediction, memory untouched).

OUT gets ``OUT/<object id>/<target frame>.png`` (0/255 at the target frame's resolution;
all 0 where skipped), ``OUT/scores.json`` (per object and frame: object score, visible,
processed) and ``OUT/overlay.mp4`` (``overlay.gif`` without PyAV): source | target side by
side, each object in its own colour (source: its mask; target: the prediction).

Exit status: 0 done; 2 bad input or model (one line naming the file and the problem).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from eval.model_args import add_model_args, load_predictor

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
OVERLAY_HEIGHT = 270
GIF_MAX_FRAMES = 300


def register(subparsers) -> None:
    p = subparsers.add_parser("track", help="track objects from your own source video into your own target video",
                              description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--src", required=True, help="source frames: an image folder or a video file")
    p.add_argument("--tgt", required=True, help="target frames: an image folder or a video file")
    p.add_argument("--src-masks", required=True, help="folder of PNG masks named like the source frames")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-overlay", action="store_true", help="do not write the overlay video")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def _blend(img: np.ndarray, masks, ids) -> np.ndarray:
    """Each object's mask filled in its colour with a white contour."""
    from lmeec_jax.evaluation.overlay import overlay

    for k, m in zip(ids, masks):
        if m is not None and m.any():
            img = overlay(img, m, PALETTE[(k - 1) % len(PALETTE)], m, (255, 255, 255), alpha=0.55)
    return img


class _OverlayWriter:
    """Source | target side by side, written frame by frame (mp4 with PyAV, else a GIF of at
    most GIF_MAX_FRAMES evenly spaced frames)."""

    def __init__(self, out_dir: str, n_frames: int):
        self.out_dir = out_dir
        self.n = n_frames
        try:
            import av  # noqa: F401  (PyAV present: write mp4)

            self.kind = "mp4"
        except ImportError:
            self.kind = "gif"
        self.path = os.path.join(out_dir, f"overlay.{self.kind}")
        self.tmp = os.path.join(out_dir, f".overlay.tmp.{self.kind}")
        self.frames = []
        self.stride = max(1, -(-n_frames // GIF_MAX_FRAMES))
        self.container = self.stream = None

    @staticmethod
    def _fit(img: np.ndarray) -> np.ndarray:
        from PIL import Image

        h, w = img.shape[:2]
        W = max(2, int(round(w * OVERLAY_HEIGHT / h)) // 2 * 2)
        return np.asarray(Image.fromarray(img).resize((W, OVERLAY_HEIGHT)))

    def add(self, i: int, src: np.ndarray, tgt: np.ndarray) -> None:
        frame = np.concatenate([self._fit(src), np.full((OVERLAY_HEIGHT, 4, 3), 255, np.uint8), self._fit(tgt)], 1)
        if self.kind == "mp4":
            import av

            if self.container is None:
                self.container = av.open(self.tmp, "w", format="mp4")
                self.stream = self.container.add_stream("mpeg4", rate=10)
                self.stream.width, self.stream.height = frame.shape[1], frame.shape[0]
                self.stream.pix_fmt = "yuv420p"
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            for pkt in self.stream.encode(vf):
                self.container.mux(pkt)
        elif i % self.stride == 0:
            self.frames.append(frame)

    def close(self) -> str:
        if self.kind == "mp4":
            if self.container is None:
                return ""
            for pkt in self.stream.encode():
                self.container.mux(pkt)
            self.container.close()
        else:
            from PIL import Image

            if not self.frames:
                return ""
            ims = [Image.fromarray(f) for f in self.frames]
            ims[0].save(self.tmp, format="GIF", save_all=True, append_images=ims[1:], duration=100, loop=0)
        os.replace(self.tmp, self.path)
        return self.path


def main(args) -> int:
    from PIL import Image

    from lmeec_jax.data.errors import DataError
    from lmeec_jax.data.media import open_frames
    from lmeec_jax.io import atomic_write, write_json_atomic

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return fail(f"{args.out}: --out exists and is not a folder")
    try:
        src, tgt = open_frames(args.src), open_frames(args.tgt)
        if len(src) != len(tgt):
            return fail(f"{args.src} has {len(src)} frames and {args.tgt} has {len(tgt)}: source and target "
                        "frames must pair up one to one")
    except DataError as e:
        return fail(str(e))
    predictor, err = load_predictor(args)
    if err:
        return fail(err)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        return fail(f"{args.out}: cannot create the output folder: {e.strerror or e}")

    scores: dict = {}
    overlay = None if args.no_overlay else _OverlayWriter(args.out, len(tgt))
    bar = None
    try:
        frames = predictor.track(src, tgt, args.src_masks, keep_images=overlay is not None)
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(tgt), desc="track", unit="frame", dynamic_ncols=True)
        ids = None
        for fr in frames:
            if ids is None:
                ids = fr.object_ids
                print(f"tracking {len(ids)} object(s) {list(ids)} over {len(tgt)} frames "
                      f"({predictor.cfg.name}, {args.dtype})", file=sys.stderr if bar else sys.stdout, flush=True)
                for k in ids:
                    os.makedirs(os.path.join(args.out, str(k)), exist_ok=True)
                    scores[str(k)] = {}
            for j, k in enumerate(ids):
                with atomic_write(os.path.join(args.out, str(k), fr.name + ".png"), "wb") as fh:
                    Image.fromarray(fr.masks[j].astype(np.uint8) * 255).save(fh, format="PNG")
                s = fr.object_scores[j]
                scores[str(k)][fr.name] = {"object_score": None if np.isnan(s) else round(float(s), 6),
                                           "visible": bool(fr.visible[j]), "processed": bool(fr.processed[j])}
            if overlay is not None:
                src_masks = _source_masks(args.src_masks, src, fr.index, ids)
                overlay.add(fr.index, _blend(np.asarray(fr.src_image), src_masks, ids),
                            _blend(np.asarray(fr.tgt_image), list(fr.masks), ids))
            if bar is not None:
                bar.update(1)
    except DataError as e:
        return fail(str(e))
    except OSError as e:
        return fail(f"{args.out}: cannot write the outputs: {e.strerror or e}")
    finally:
        if bar is not None:
            bar.close()
    ov = overlay.close() if overlay is not None else ""
    write_json_atomic(os.path.join(args.out, "scores.json"),
                      {"checkpoint": args.checkpoint, "source": os.path.abspath(args.src),
                       "target": os.path.abspath(args.tgt), "objects": [int(k) for k in (ids or ())],
                       "frames": list(tgt.names), "scores": scores}, indent=1)
    n_vis = {k: sum(v["visible"] for v in d.values()) for k, d in scores.items()}
    print(f"wrote {args.out}/<object>/<frame>.png for objects {sorted(scores, key=int)}; visible frames per object: "
          f"{json.dumps(n_vis)}; scores.json" + (f"; {ov}" if ov else ""))
    return 0


_MASK_CACHE: dict = {}


def _source_masks(folder, src, i, ids):
    from lmeec_jax.data.media import MaskFolder

    key = (folder, id(src))
    if key not in _MASK_CACHE:
        _MASK_CACHE.clear()
        _MASK_CACHE[key] = MaskFolder(folder, src.names)
    m = _MASK_CACHE[key].get(i)
    return [None if m is None else m == k for k in ids]
