"""Frames and masks of your own videos: image folders, video files, arrays; PNG mask folders.

* a frame sequence is a folder of images (``.jpg .jpeg .png .bmp .webp``, in natural-sort
  order of their names), a video file (``.mp4 .mov .avi .mkv .webm``, decoded with PyAV:
  ``pip install av``), or a sequence of images (uint8 HxWx3 arrays or PIL images);
* a mask folder holds one PNG per source frame, named like the frame (``0001.jpg`` ->
  ``0001.png``): a binary PNG (0/255 or 0/1) is object 1, an index PNG (values 0..K,
  DAVIS style, palette or grey) gives objects 1..K. A frame without a PNG has no mask.

Bad input raises :class:`~lmeec_jax.data.errors.DataError` naming the file and the problem.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from lmeec_jax.data.egoexo import natsorted
from lmeec_jax.data.errors import DataError

__all__ = ["IMAGE_EXTS", "VIDEO_EXTS", "FrameSequence", "open_frames", "MaskFolder"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


@dataclass
class FrameSequence:
    """``names[i]`` (frame stems) and ``get(i)`` -> RGB PIL image; ``source`` for messages."""

    names: List[str]
    get: Callable[[int], Image.Image]
    source: str
    size: Optional[Tuple[int, int]] = None  # (H, W) of the first frame, once read

    def __len__(self) -> int:
        return len(self.names)

    def iter(self) -> Iterator[Image.Image]:
        for i in range(len(self.names)):
            yield self.get(i)


def _image_folder(path: str) -> FrameSequence:
    names = natsorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
    if not names:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTS)}) in the folder", path=path)

    def get(i: int) -> Image.Image:
        p = os.path.join(path, names[i])
        try:
            with Image.open(p) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise DataError(f"unreadable image ({e.__class__.__name__}: {e})", path=p) from None

    return FrameSequence([os.path.splitext(n)[0] for n in names], get, path)


def _video_file(path: str) -> FrameSequence:
    """Frames decoded on demand, in order (random access re-decodes from the start)."""
    try:
        import av
    except ImportError:
        raise DataError("reading video files needs PyAV: pip install av", path=path) from None
    try:
        with av.open(path) as c:
            stream = c.streams.video[0]
            n = sum(1 for _ in c.decode(stream))
    except (av.error.FFmpegError, IndexError, OSError) as e:  # type: ignore[attr-defined]
        raise DataError(f"unreadable video ({e.__class__.__name__}: {e})", path=path) from None
    if n == 0:
        raise DataError("the video has no frames", path=path)
    state = {"it": None, "next": 0, "container": None}
    lock = threading.Lock()

    def get(i: int) -> Image.Image:
        with lock:
            return _get(i)

    def _get(i: int) -> Image.Image:
        if state["it"] is None or i < state["next"]:
            if state["container"] is not None:
                state["container"].close()
            state["container"] = av.open(path)
            state["it"] = state["container"].decode(state["container"].streams.video[0])
            state["next"] = 0
        try:
            while True:
                frame = next(state["it"])
                state["next"] += 1
                if state["next"] - 1 == i:
                    return frame.to_image().convert("RGB")
        except StopIteration:
            raise DataError(f"frame {i} could not be decoded", path=path) from None

    width = len(str(n - 1))
    return FrameSequence([f"{i:0{max(width, 5)}d}" for i in range(n)], get, path)


def _arrays(frames: Sequence) -> FrameSequence:
    def get(i: int) -> Image.Image:
        x = frames[i]
        if isinstance(x, Image.Image):
            return x.convert("RGB")
        a = np.asarray(x)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise DataError(f"frame {i}: expected an HxWx3 image, got shape {a.shape}")
        if a.dtype != np.uint8:
            raise DataError(f"frame {i}: expected uint8 pixels, got {a.dtype}")
        return Image.fromarray(a)

    return FrameSequence([f"{i:05d}" for i in range(len(frames))], get, "<arrays>")


def open_frames(frames) -> FrameSequence:
    """A frame sequence from a folder, a video file or a sequence of images."""
    if isinstance(frames, FrameSequence):
        return frames
    if isinstance(frames, (str, os.PathLike)):
        path = os.fspath(frames)
        if os.path.isdir(path):
            return _image_folder(path)
        if os.path.isfile(path):
            if path.lower().endswith(VIDEO_EXTS):
                return _video_file(path)
            raise DataError(f"not a folder or a video file ({', '.join(VIDEO_EXTS)})", path=path)
        raise DataError("no such file or folder", path=path)
    return _arrays(frames)


def _read_png(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L", "1", "I", "I;16"):
                a = np.asarray(im)
            else:  # RGB(A): a binary mask saved in colour
                a = np.asarray(im.convert("L"))
    except (OSError, ValueError) as e:
        raise DataError(f"unreadable mask ({e.__class__.__name__}: {e})", path=path) from None
    if a.ndim != 2:
        raise DataError(f"expected a single-channel mask, got shape {a.shape}", path=path)
    if a.dtype == bool:
        return a.astype(np.int32)
    if set(np.unique(a).tolist()) <= {0, 255}:  # binary 0/255 -> object 1
        return (a == 255).astype(np.int32)
    return a.astype(np.int32)


class MaskFolder:
    """One PNG per source frame, named like the frame (see the module doc).

    ``ids``: the object ids found in any PNG (sorted); ``get(i)`` -> int index mask of frame
    ``i`` (or None where no PNG exists). The folder is scanned once up front (every PNG read,
    nothing kept) and read again frame by frame, so memory does not grow with the video.
    """

    def __init__(self, folder, names: Sequence[str]):
        self.folder = os.fspath(folder)
        if not os.path.isdir(self.folder):
            raise DataError("no such mask folder", path=self.folder)
        files = {os.path.splitext(f)[0]: f for f in os.listdir(self.folder) if f.lower().endswith(".png")}
        self.paths: List[Optional[str]] = [os.path.join(self.folder, files[n]) if n in files else None for n in names]
        if not any(self.paths):
            raise DataError(f"no mask PNG named like a source frame (e.g. {names[0]}.png)" if names else
                            "no source frames", path=self.folder)
        ids: set = set()
        for p in self.paths:
            if p is not None:
                ids.update(int(v) for v in np.unique(_read_png(p)) if v > 0)
        if not ids:
            raise DataError("every mask PNG is empty (no object pixels)", path=self.folder)
        self.ids = sorted(ids)

    def get(self, i: int) -> Optional[np.ndarray]:
        p = self.paths[i]
        return None if p is None else _read_png(p)

    def where(self, i: int) -> str:
        return self.paths[i] or self.folder
