"""The one error type of the data / IO layer.

:class:`DataError` (a ``ValueError``) is raised for every bad input: a missing or
malformed file, a corrupt image, a mask that is not a valid RLE, a processed split that
cannot give a GT file. Its message names the file and, when known, the take / camera /
frame / object it belongs to: ``"<path>: <problem> (take='…', camera='…', …)"``.
``lmeec_jax.data.rle.RLEError`` and ``lmeec_jax.evaluation.gt.GTBuildError`` are other
names of this class.
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input data: names the file, the problem and where it belongs."""

    def __init__(
        self,
        problem: str,
        *,
        path: Optional[str] = None,
        take: Optional[str] = None,
        camera: Optional[str] = None,
        frame: Optional[str] = None,
        obj: Optional[str] = None,
    ):
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        self.take = take
        self.camera = camera
        self.frame = frame
        self.obj = obj
        super().__init__(self._format())

    def _format(self) -> str:
        where = [
            f"{k}={v!r}"
            for k, v in (("take", self.take), ("camera", self.camera), ("frame", self.frame), ("object", self.obj))
            if v is not None
        ]
        head = f"{self.path}: " if self.path else ""
        tail = f" ({', '.join(where)})" if where else ""
        return f"{head}{self.problem}{tail}"

    def with_context(self, **kw) -> "DataError":
        """A copy with missing context fields filled in from ``kw``."""
        fields = dict(path=self.path, take=self.take, camera=self.camera, frame=self.frame, obj=self.obj)
        for k, v in kw.items():
            if fields.get(k) is None:
                fields[k] = v
        return DataError(self.problem, **fields)

    def __reduce__(self):  # picklable across grain / multiprocessing workers
        return (_rebuild_data_error, (self.problem, self.path, self.take, self.camera, self.frame, self.obj))


def _rebuild_data_error(problem, path, take, camera, frame, obj):
    return DataError(problem, path=path, take=take, camera=camera, frame=frame, obj=obj)
