"""Constants of the ego-exo correspondence task and its scoring protocols, defined once.

Used by the data readers, inference, the metrics and validation; this module imports
nothing, so any layer may use it.
"""

from __future__ import annotations

__all__ = ["EVAL_SIZE", "DIRECTIONS", "TASK_KEYS", "check_direction", "is_ego_camera"]

# Evaluation size, in pixels. Official protocol: the long side of the masks that are
# scored (the target GT is resized to it keeping the aspect ratio: 480x480 for an aria
# target, 270x480 for an exo one). LM-EEC's protocol: the side of the square masks it
# scores, which is also the side of the per-frame prediction masks the reference writes
# (its image_size, 480 for LM-EEC).
EVAL_SIZE = 480

# Transfer directions: source view -> target view.
DIRECTIONS = ("ego2exo", "exo2ego")

# Key of each direction in the prediction and GT JSON files.
TASK_KEYS = {"ego2exo": "ego-exo", "exo2ego": "exo-ego"}


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return direction


def is_ego_camera(cam: str) -> bool:
    """EgoExo4D's convention: the egocentric camera is the one whose name contains ``aria``."""
    return "aria" in cam
