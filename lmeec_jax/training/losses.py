"""Training losses of LM-EEC (SAM 2's ``MultiStepMultiMasksAndIous``), in JAX.

Everything is computed in float32 whatever the dtype of the inputs.

Shapes (one frame, one prediction step):

* ``masks``      ``[N, M, H, W]`` high-resolution mask logits (N objects, M masks each);
* ``ious``       ``[N, M]`` predicted IoUs (the IoU head's output, after its sigmoid);
* ``obj_logits`` ``[N, 1]`` object-score logits;
* ``target``     ``[N, H, W]`` ground-truth masks (any dtype, ``> 0`` / ``!= 0`` is foreground;
  the reference casts its uint8 0/1 masks to float, so targets are used as ``float(target)``).

The reference semantics (``training/loss_fns.py`` with the LM-EEC finetune yaml):

* every per-object term is divided by ``num_objects`` (the number of objects in the batch,
  ``targets.shape[1]``, clamped to >= 1) and then *summed* over objects, prediction steps and
  frames (frames are summed, not averaged);
* focal and dice losses are computed for each of the M masks; with ``M > 1`` the mask with the
  smallest ``20 * focal + 1 * dice`` is the only one that counts;
* the IoU loss is L1 (``iou_use_l1_loss``) between the predicted IoU and the actual IoU of
  ``mask > 0`` with the target; with ``supervise_all_iou`` it is averaged over all M masks,
  otherwise taken on the selected mask. The actual IoU carries no gradient;
* focal, dice and IoU terms are multiplied by ``target_obj`` = "the target mask has any
  foreground pixel", i.e. they only count on frames where the object is present;
* the object-score loss is a plain BCE-with-logits (focal with ``gamma = 0`` and ``alpha < 0``)
  against ``target_obj``, counted on every frame;
* ``core_loss = 20 * loss_mask + 1 * loss_dice + 1 * loss_iou + 1 * loss_class``.

(The reference trainer also adds ``0.0004 * focal(high_res_affinity)`` when the mask decoder
returns an affinity map; LM-EEC's decoder always returns ``None`` there, so it is not ported.)

Multi-device note: the reference all-reduces ``num_objects`` and divides by the world size, i.e.
it normalises by the *per-GPU* object count and DDP averages the gradients over GPUs. Computing
the loss once over the global batch with ``num_objects`` = global object count gives the same
gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp

__all__ = [
    "LossConfig",
    "sigmoid_focal_loss",
    "dice_loss",
    "iou_loss",
    "actual_ious",
    "object_score_loss",
    "frame_losses",
    "multistep_multimask_loss",
    "reduce_loss",
]

LOSS_KEYS = ("loss_mask", "loss_dice", "loss_iou", "loss_class")


@dataclass(frozen=True)
class LossConfig:
    """Weights and switches of ``MultiStepMultiMasksAndIous`` (LM-EEC finetune yaml values)."""

    weight_mask: float = 20.0  # focal
    weight_dice: float = 1.0
    weight_iou: float = 1.0
    weight_class: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    supervise_all_iou: bool = True
    iou_use_l1_loss: bool = True
    pred_obj_scores: bool = True
    focal_alpha_obj_score: float = -1.0
    focal_gamma_obj_score: float = 0.0

    @property
    def weights(self) -> dict:
        return {
            "loss_mask": self.weight_mask,
            "loss_dice": self.weight_dice,
            "loss_iou": self.weight_iou,
            "loss_class": self.weight_class,
        }


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


def _modulating_power(x, gamma: float):
    """``x ** gamma`` with a finite gradient at x = 0 (gamma is a python number)."""
    gamma = float(gamma)
    if gamma == 0.0:
        return jnp.ones_like(x)
    if gamma.is_integer() and gamma > 0:
        return jax.lax.integer_pow(x, int(gamma))
    return jnp.power(x, gamma)


def _focal_elementwise(logits, targets, alpha: float, gamma: float):
    """Per-element sigmoid focal loss (RetinaNet), float32."""
    x = _f32(logits)
    t = _f32(targets)
    prob = jax.nn.sigmoid(x)
    # binary_cross_entropy_with_logits; softplus (logaddexp) keeps the exact gradient
    # sigmoid(x) - t at x = 0, where max/abs formulations pick a wrong subgradient
    ce = jax.nn.softplus(x) - x * t
    p_t = prob * t + (1.0 - prob) * (1.0 - t)
    loss = ce * _modulating_power(1.0 - p_t, gamma)
    if alpha >= 0:
        alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
        loss = alpha_t * loss
    return loss


def sigmoid_focal_loss(
    logits,
    targets,
    num_objects,
    alpha: float = 0.25,
    gamma: float = 2.0,
    loss_on_multimask: bool = False,
):
    """Sigmoid focal loss.

    ``loss_on_multimask=True``: inputs ``[N, M, H, W]`` -> ``[N, M]`` (spatial mean / num_objects).
    Otherwise inputs ``[N, D...]`` -> scalar: mean over axis 1, sum over everything left,
    divided by ``num_objects`` (the reference's ``loss.mean(1).sum() / num_objects``).
    """
    loss = _focal_elementwise(logits, targets, alpha, gamma)
    if loss_on_multimask:
        if loss.ndim != 4:
            raise ValueError(f"multimask focal loss expects [N, M, H, W], got {loss.shape}")
        return loss.reshape(loss.shape[0], loss.shape[1], -1).mean(-1) / num_objects
    return loss.mean(axis=1).sum() / num_objects


def dice_loss(logits, targets, num_objects, loss_on_multimask: bool = False):
    """DICE loss ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` with ``p = sigmoid(logits)``.

    ``loss_on_multimask=True``: ``[N, M, H, W]`` -> ``[N, M]`` divided by num_objects.
    Otherwise ``[N, ...]`` -> scalar: per-object losses summed, divided by num_objects.
    """
    p = jax.nn.sigmoid(_f32(logits))
    t = _f32(targets)
    if loss_on_multimask:
        if p.ndim != 4:
            raise ValueError(f"multimask dice loss expects [N, M, H, W], got {p.shape}")
        p = p.reshape(p.shape[0], p.shape[1], -1)
        t = t.reshape(t.shape[0], t.shape[1], -1)
    else:
        p = p.reshape(p.shape[0], -1)
        t = t.reshape(t.shape[0], -1)
    numerator = 2.0 * (p * t).sum(-1)
    denominator = p.sum(-1) + t.sum(-1)
    loss = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    if loss_on_multimask:
        return loss / num_objects
    return loss.sum() / num_objects


def actual_ious(logits, targets):
    """IoU of ``logits > 0`` with ``targets > 0`` per ``[N, M]``; union clamped to >= 1. No gradient."""
    pred = _f32(logits) > 0
    gt = _f32(targets) > 0
    n, m = pred.shape[:2]
    pred = pred.reshape(n, m, -1)
    gt = jnp.broadcast_to(gt.reshape(gt.shape[0], gt.shape[1], -1), pred.shape)
    inter = jnp.sum(pred & gt, axis=-1).astype(jnp.float32)
    union = jnp.sum(pred | gt, axis=-1).astype(jnp.float32)
    return jax.lax.stop_gradient(inter / jnp.maximum(union, 1.0))


def iou_loss(
    logits,
    targets,
    pred_ious,
    num_objects,
    loss_on_multimask: bool = False,
    use_l1_loss: bool = False,
):
    """L1 (or MSE) between predicted and actual IoUs. ``[N, M, H, W]`` masks, ``[N, M]`` ious."""
    if jnp.ndim(logits) != 4 or jnp.ndim(targets) != 4:
        raise ValueError("iou_loss expects 4-D masks and targets")
    true_iou = actual_ious(logits, targets)
    diff = _f32(pred_ious) - true_iou
    loss = jnp.abs(diff) if use_l1_loss else diff * diff
    if loss_on_multimask:
        return loss / num_objects
    return loss.sum() / num_objects


def object_score_loss(obj_logits, target_obj, num_objects, alpha: float = -1.0, gamma: float = 0.0):
    """Object-score loss: focal with the yaml's ``gamma 0, alpha -1`` = BCE with logits.

    ``[N, 1]`` logits and targets -> scalar ``mean(1).sum() / num_objects``.
    """
    return sigmoid_focal_loss(obj_logits, target_obj, num_objects, alpha=alpha, gamma=gamma)


def frame_losses(masks, ious, obj_logits, target, num_objects, cfg: LossConfig = LossConfig()) -> dict:
    """Un-weighted losses of one prediction step on one frame (``_update_losses``).

    masks ``[N, M, H, W]`` logits, ious ``[N, M]``, obj_logits ``[N, 1]``, target ``[N, H, W]``.
    Returns ``{"loss_mask", "loss_dice", "loss_iou", "loss_class"}`` scalars (float32), already
    divided by ``num_objects``.
    """
    masks = _f32(masks)
    n, m = masks.shape[:2]
    target_masks = jnp.broadcast_to(_f32(target)[:, None], masks.shape)

    loss_multimask = sigmoid_focal_loss(
        masks, target_masks, num_objects, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma,
        loss_on_multimask=True,
    )
    loss_multidice = dice_loss(masks, target_masks, num_objects, loss_on_multimask=True)
    if cfg.pred_obj_scores:
        target_obj = jnp.any(target_masks[:, 0].reshape(n, -1) > 0, axis=-1)[:, None].astype(jnp.float32)
        loss_class = object_score_loss(
            obj_logits, target_obj, num_objects,
            alpha=cfg.focal_alpha_obj_score, gamma=cfg.focal_gamma_obj_score,
        )
    else:
        target_obj = jnp.ones((n, 1), jnp.float32)
        loss_class = jnp.zeros((), jnp.float32)
    loss_multiiou = iou_loss(
        masks, target_masks, ious, num_objects, loss_on_multimask=True,
        use_l1_loss=cfg.iou_use_l1_loss,
    )

    if m > 1:
        combo = loss_multimask * cfg.weight_mask + loss_multidice * cfg.weight_dice
        best = jnp.argmin(combo, axis=-1)  # first minimum on ties, as torch.argmin
        pick = lambda x: jnp.take_along_axis(x, best[:, None], axis=1)
        loss_mask = pick(loss_multimask)
        loss_dice = pick(loss_multidice)
        if cfg.supervise_all_iou:
            loss_iou = loss_multiiou.mean(axis=-1, keepdims=True)
        else:
            loss_iou = pick(loss_multiiou)
    else:
        loss_mask, loss_dice, loss_iou = loss_multimask, loss_multidice, loss_multiiou

    return {
        "loss_mask": (loss_mask * target_obj).sum(),
        "loss_dice": (loss_dice * target_obj).sum(),
        "loss_iou": (loss_iou * target_obj).sum(),
        "loss_class": jnp.asarray(loss_class, jnp.float32),
    }


def reduce_loss(losses: dict, cfg: LossConfig = LossConfig()):
    """``core_loss``: the weighted sum of the four losses (zero weights skipped)."""
    total = jnp.zeros((), jnp.float32)
    for k, w in cfg.weights.items():
        if w != 0:
            total = total + losses[k] * w
    return total


def multistep_multimask_loss(
    masks,
    ious,
    obj_logits,
    targets,
    cfg: LossConfig = LossConfig(),
    num_objects: Optional[float] = None,
    valid=None,
) -> dict:
    """``MultiStepMultiMasksAndIous`` over a clip.

    masks ``[T, S, N, M, H, W]`` high-res logits (T frames, S prediction steps per frame —
    LM-EEC has S = 1 —, N objects, M masks), ious ``[T, S, N, M]``, obj_logits ``[T, S, N, 1]``,
    targets ``[T, N, H, W]``. ``valid``: optional ``[T, S]`` boolean, steps/frames that exist
    (padding slots of a fixed-size scan are given False and contribute nothing).
    ``num_objects``: defaults to ``N`` (clamped to >= 1).

    Returns the four losses summed over frames and steps plus ``core_loss``.
    """
    masks = _f32(masks)
    if masks.ndim != 6:
        raise ValueError(f"masks must be [T, S, N, M, H, W], got {masks.shape}")
    t_, s_ = masks.shape[:2]
    if num_objects is None:
        num_objects = targets.shape[1]
    if isinstance(num_objects, (int, float)):
        num_objects = max(float(num_objects), 1.0)
    else:  # a traced count (e.g. summed over devices)
        num_objects = jnp.maximum(jnp.asarray(num_objects, jnp.float32), 1.0)

    def per_frame(m_t, i_t, o_t, tgt_t):
        per_step = jax.vmap(lambda m, i, o: frame_losses(m, i, o, tgt_t, num_objects, cfg))
        return per_step(m_t, i_t, o_t)

    per = jax.vmap(per_frame)(masks, _f32(ious), _f32(obj_logits), targets)  # each [T, S]
    if valid is None:
        valid = jnp.ones((t_, s_), bool)
    w = jnp.asarray(valid).astype(jnp.float32)
    out = {k: jnp.sum(jnp.where(w > 0, per[k], 0.0)) for k in LOSS_KEYS}
    out["core_loss"] = reduce_loss(out, cfg)
    return out
