"""Losses of LM-EEC training (lmeec_jax.training.losses): hand-checked values, gradients, the
multimask min-selection, presence masking, and (when torch + the sam2 package's `training`
are importable) parity with the reference ``MultiStepMultiMasksAndIous``."""

import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmeec_jax.training import losses as L

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- numpy reference


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_focal(x, t, alpha=0.25, gamma=2.0):
    p = np_sigmoid(x)
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    pt = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - pt) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


def np_dice(x, t):
    p = np_sigmoid(x).reshape(-1)
    t = t.reshape(-1)
    return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


def np_frame_losses(masks, ious, obj, target, num_objects):
    """Independent float64 numpy version of one step on one frame (yaml settings)."""
    masks = np.asarray(masks, np.float64)
    target = np.asarray(target, np.float64)
    n_, m_ = masks.shape[:2]
    out = dict(loss_mask=0.0, loss_dice=0.0, loss_iou=0.0, loss_class=0.0)
    for n in range(n_):
        present = float(target[n].any())
        foc = np.array([np_focal(masks[n, m], target[n]).mean() for m in range(m_)]) / num_objects
        dic = np.array([np_dice(masks[n, m], target[n]) for m in range(m_)]) / num_objects
        act = np.array([((masks[n, m] > 0) & (target[n] > 0)).sum() / max(((masks[n, m] > 0) | (target[n] > 0)).sum(), 1)
                        for m in range(m_)])
        iou = np.abs(np.asarray(ious[n], np.float64) - act) / num_objects
        b = int(np.argmin(20 * foc + dic))
        out["loss_mask"] += foc[b] * present
        out["loss_dice"] += dic[b] * present
        out["loss_iou"] += iou.mean() * present
        x = float(obj[n, 0])
        out["loss_class"] += (max(x, 0) - x * present + math.log1p(math.exp(-abs(x)))) / num_objects
    return out


frame_losses = jax.jit(L.frame_losses, static_argnums=(4, 5))
multistep = jax.jit(L.multistep_multimask_loss, static_argnames=("cfg", "num_objects"))


# ----------------------------------------------------------------------------- hand-checked


def test_focal_hand_values():
    x = jnp.zeros((1, 2))
    t = jnp.array([[1.0, 0.0]])
    # p = 0.5: ce = ln2, (1 - p_t)^2 = 1/4; alpha_t = 0.25 for the positive, 0.75 for the negative
    per = L._focal_elementwise(x, t, 0.25, 2.0)
    np.testing.assert_allclose(per, [[0.25 * 0.25 * LN2, 0.75 * 0.25 * LN2]], rtol=1e-6)
    # non-multimask reduction: mean over axis 1, sum, / num_objects
    np.testing.assert_allclose(
        L.sigmoid_focal_loss(x, t, 2.0), (0.25 + 0.75) * 0.25 * LN2 / 2 / 2, rtol=1e-6
    )
    # gamma 0, alpha -1 is plain BCE
    np.testing.assert_allclose(L.object_score_loss(jnp.zeros((3, 1)), jnp.ones((3, 1)), 3.0), LN2, rtol=1e-6)


def test_dice_and_iou_hand_values():
    logits = jnp.array([1.0, -1.0, 1.0, -1.0]).reshape(1, 1, 2, 2)
    target = jnp.array([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
    # dice with logits 0: p = .5 everywhere, sum(p t) = 1 -> 1 - 3/5
    np.testing.assert_allclose(
        L.dice_loss(jnp.zeros((1, 1, 2, 2)), target, 1.0, loss_on_multimask=True), [[0.4]], rtol=1e-6
    )
    # IoU of (x > 0) = {0, 2} with {0, 1}: 1/3 ; L1 to 0.5 = 1/6, MSE = 1/36
    np.testing.assert_allclose(L.actual_ious(logits, target), [[1 / 3]], rtol=1e-6)
    np.testing.assert_allclose(
        L.iou_loss(logits, target, jnp.array([[0.5]]), 2.0, True, use_l1_loss=True), [[1 / 12]], rtol=1e-6
    )
    np.testing.assert_allclose(
        L.iou_loss(logits, target, jnp.array([[0.5]]), 1.0, False, use_l1_loss=False), 1 / 36, rtol=1e-6
    )
    # empty prediction and empty target: union clamped to 1 -> IoU 0
    np.testing.assert_allclose(L.actual_ious(-jnp.ones((1, 1, 2, 2)), jnp.zeros((1, 1, 2, 2))), [[0.0]])


def test_frame_losses_single_mask_hand():
    # one object, one mask, 4 pixels, all logits 0, target half foreground
    masks = jnp.zeros((1, 1, 2, 2))
    target = jnp.array([[[1, 1], [0, 0]]], jnp.uint8)
    out = L.frame_losses(masks, jnp.array([[0.3]]), jnp.array([[0.0]]), target, 1.0)
    np.testing.assert_allclose(out["loss_mask"], (2 * 0.25 + 2 * 0.75) * 0.25 * LN2 / 4, rtol=1e-6)
    np.testing.assert_allclose(out["loss_dice"], 0.4, rtol=1e-6)
    # logits 0 -> pred mask empty -> IoU 0 -> |0.3 - 0|
    np.testing.assert_allclose(out["loss_iou"], 0.3, rtol=1e-6)
    np.testing.assert_allclose(out["loss_class"], LN2, rtol=1e-6)
    total = L.reduce_loss(out)
    np.testing.assert_allclose(
        total, 20 * out["loss_mask"] + out["loss_dice"] + out["loss_iou"] + out["loss_class"], rtol=1e-6
    )


# ----------------------------------------------------------------------------- gradients


def _fd_grad(f, x, eps=1e-5):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (f(xp) - f(xm)) / (2 * eps)
    return g


def test_focal_and_dice_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 1, 3, 3)) * 2
    t = (rng.random((2, 1, 3, 3)) < 0.4).astype(np.float64)

    gf = jax.grad(lambda z: L.sigmoid_focal_loss(z, t, 2.0, loss_on_multimask=True).sum())(jnp.asarray(x, jnp.float32))
    fd = _fd_grad(lambda z: np_focal(z, t).reshape(2, 1, -1).mean(-1).sum() / 2.0, x)
    np.testing.assert_allclose(gf, fd, rtol=1e-3, atol=1e-6)

    gd = jax.grad(lambda z: L.dice_loss(z, t, 2.0, loss_on_multimask=True).sum())(jnp.asarray(x, jnp.float32))
    fd = _fd_grad(lambda z: sum(np_dice(z[i], t[i]) for i in range(2)) / 2.0, x)
    np.testing.assert_allclose(gd, fd, rtol=1e-3, atol=1e-6)

    # analytic focal gradient at logit 0, target 1: d/dx [a (1-p)^2 (-log p)] at p = 1/2
    # = a [ -2(1-p) p(1-p) (-log p) + (1-p)^2 (-(1-p)) ] = a [ -ln2/4 - 1/8 ]
    g0 = jax.grad(lambda z: L._focal_elementwise(z, 1.0, 0.25, 2.0))(0.0)
    np.testing.assert_allclose(g0, 0.25 * (-LN2 / 4 - 1 / 8), rtol=1e-6)


def test_iou_loss_gradient_only_reaches_predicted_iou():
    masks = jnp.array([1.0, -1.0, 1.0, -1.0]).reshape(1, 1, 2, 2)
    target = jnp.array([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
    gm, gi = jax.grad(lambda m, i: L.iou_loss(m, target, i, 1.0, False, True), argnums=(0, 1))(
        masks, jnp.array([[0.5]])
    )
    np.testing.assert_array_equal(gm, 0.0)
    np.testing.assert_allclose(gi, [[1.0]])  # sign(0.5 - 1/3)


def test_object_score_gradient_is_bce():
    x = jnp.array([[0.7], [-1.2]])
    t = jnp.array([[1.0], [0.0]])
    g = jax.grad(lambda z: L.object_score_loss(z, t, 2.0))(x)
    np.testing.assert_allclose(g, (np_sigmoid(np.asarray(x)) - np.asarray(t)) / 2.0, rtol=1e-5)


# ----------------------------------------------------------------------------- combination


def _perfect_logits(target, scale=3.0):
    return (2.0 * np.asarray(target, np.float32) - 1.0) * scale


def test_multimask_picks_min_focal_plus_dice():
    rng = np.random.default_rng(1)
    target = np.zeros((2, 6, 6), np.uint8)
    target[0, 1:4, 1:5] = 1
    target[1, 2:6, 0:3] = 1
    masks = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    masks[0, 2] = _perfect_logits(target[0])  # object 0: mask 2 is best
    masks[1, 1] = _perfect_logits(target[1])  # object 1: mask 1 is best
    ious = rng.random((2, 3)).astype(np.float32)
    obj = np.array([[2.0], [-1.0]], np.float32)

    out = frame_losses(masks, ious, obj, target, 2.0, L.LossConfig())
    best = [2, 1]
    foc = np.array([[np_focal(masks[n, m].astype(np.float64), target[n]).mean() for m in range(3)] for n in range(2)]) / 2
    dic = np.array([[np_dice(masks[n, m].astype(np.float64), target[n].astype(np.float64)) for m in range(3)] for n in range(2)]) / 2
    assert list(np.argmin(20 * foc + dic, axis=1)) == best
    np.testing.assert_allclose(out["loss_mask"], sum(foc[n, best[n]] for n in range(2)), rtol=1e-5)
    np.testing.assert_allclose(out["loss_dice"], sum(dic[n, best[n]] for n in range(2)), rtol=1e-5)
    # supervise_all_iou: the mean over all 3 masks of |pred - actual|
    act = np.array([[((masks[n, m] > 0) & (target[n] > 0)).sum() / max(((masks[n, m] > 0) | (target[n] > 0)).sum(), 1)
                     for m in range(3)] for n in range(2)])
    np.testing.assert_allclose(out["loss_iou"], (np.abs(ious - act).mean(1) / 2).sum(), rtol=1e-5)
    # without supervise_all_iou: only the selected mask's IoU error
    out2 = frame_losses(masks, ious, obj, target, 2.0, L.LossConfig(supervise_all_iou=False))
    np.testing.assert_allclose(out2["loss_iou"], sum(abs(ious[n, best[n]] - act[n, best[n]]) / 2 for n in range(2)), rtol=1e-5)

    # gradient flows only into the selected mask channels
    g = jax.jit(jax.grad(lambda m: L.frame_losses(m, ious, obj, target, 2.0)["loss_mask"]))(jnp.asarray(masks))
    g = np.abs(np.asarray(g)).reshape(2, 3, -1).sum(-1)
    assert g[0, 2] > 0 and g[1, 1] > 0
    assert g[0, 0] == g[0, 1] == g[1, 0] == g[1, 2] == 0


def test_absent_object_counts_only_in_class_loss():
    target = np.zeros((2, 4, 4), np.uint8)
    target[0, :2, :2] = 1  # object 1 absent on this frame
    rng = np.random.default_rng(2)
    masks = rng.normal(size=(2, 1, 4, 4)).astype(np.float32)
    ious = rng.random((2, 1)).astype(np.float32)
    obj = rng.normal(size=(2, 1)).astype(np.float32)
    out = frame_losses(masks, ious, obj, target, 2.0, L.LossConfig())
    only0 = np_frame_losses(masks[:1], ious[:1], obj[:1], target[:1], 2.0)
    for k in ("loss_mask", "loss_dice", "loss_iou"):
        np.testing.assert_allclose(out[k], only0[k], rtol=1e-5)
    bce = lambda x, t: max(x, 0) - x * t + math.log1p(math.exp(-abs(x)))
    np.testing.assert_allclose(out["loss_class"], (bce(obj[0, 0], 1) + bce(obj[1, 0], 0)) / 2, rtol=1e-5)
    # masks of the absent object get no gradient from focal/dice/iou
    g = jax.jit(jax.grad(lambda m: L.reduce_loss(L.frame_losses(m, ious, obj, target, 2.0))))(jnp.asarray(masks))
    assert np.all(np.asarray(g)[1] == 0) and np.any(np.asarray(g)[0] != 0)


def test_multistep_sums_frames_and_steps_and_normalises_by_objects():
    rng = np.random.default_rng(3)
    T, S, N, M, H, W = 3, 2, 2, 1, 5, 5
    masks = rng.normal(size=(T, S, N, M, H, W)).astype(np.float32)
    ious = rng.random((T, S, N, M)).astype(np.float32)
    obj = rng.normal(size=(T, S, N, 1)).astype(np.float32)
    targets = (rng.random((T, N, H, W)) < 0.3).astype(np.uint8)
    targets[1, 0] = 0
    out = multistep(masks, ious, obj, targets)
    exp = {k: 0.0 for k in L.LOSS_KEYS}
    for t in range(T):
        for s in range(S):
            fl = np_frame_losses(masks[t, s], ious[t, s], obj[t, s], targets[t], N)
            for k in exp:
                exp[k] += fl[k]
    for k in exp:
        np.testing.assert_allclose(out[k], exp[k], rtol=1e-5)
    np.testing.assert_allclose(out["core_loss"], 20 * exp["loss_mask"] + exp["loss_dice"] + exp["loss_iou"] + exp["loss_class"], rtol=1e-5)
    # num_objects divides every term
    out4 = multistep(masks, ious, obj, targets, num_objects=4)
    np.testing.assert_allclose(out4["core_loss"], out["core_loss"] / 2, rtol=1e-5)
    # invalid (padding) steps contribute nothing, even if they hold NaN
    valid = np.ones((T, S), bool)
    valid[:, 1] = False
    masks_nan = masks.copy()
    masks_nan[:, 1] = np.nan
    outv = multistep(masks_nan, ious, obj, targets, valid=valid)
    ref1 = multistep(masks[:, :1], ious[:, :1], obj[:, :1], targets)
    np.testing.assert_allclose(outv["core_loss"], ref1["core_loss"], rtol=1e-6)
    g = jax.jit(jax.grad(lambda m: L.multistep_multimask_loss(m, ious, obj, targets, valid=valid)["core_loss"]))(jnp.asarray(masks_nan))
    assert np.all(np.isfinite(np.asarray(g)[:, 0]))


def test_float32_whatever_the_input_dtype():
    rng = np.random.default_rng(4)
    masks = rng.normal(size=(1, 1, 2, 3, 4, 4)).astype(np.float32)
    ious = rng.random((1, 1, 2, 3)).astype(np.float32)
    obj = rng.normal(size=(1, 1, 2, 1)).astype(np.float32)
    targets = (rng.random((1, 2, 4, 4)) < 0.5).astype(np.uint8)
    out16 = multistep(jnp.asarray(masks, jnp.bfloat16), jnp.asarray(ious, jnp.bfloat16),
                      jnp.asarray(obj, jnp.bfloat16), targets)
    for v in out16.values():
        assert v.dtype == jnp.float32
    ref = multistep(
        np.asarray(jnp.asarray(masks, jnp.bfloat16).astype(jnp.float32)),
        np.asarray(jnp.asarray(ious, jnp.bfloat16).astype(jnp.float32)),
        np.asarray(jnp.asarray(obj, jnp.bfloat16).astype(jnp.float32)), targets)
    np.testing.assert_allclose(out16["core_loss"], ref["core_loss"], rtol=1e-6)


# ----------------------------------------------------------------------------- reference parity


def _reference_loss_cls():
    torch = pytest.importorskip("torch")
    if "training.trainer" not in sys.modules:  # avoid the trainer's heavy imports (tensordict...)
        stub = types.ModuleType("training.trainer")
        stub.CORE_LOSS_KEY = "core_loss"
        sys.modules["training.trainer"] = stub
    try:
        from training.loss_fns import MultiStepMultiMasksAndIous
    except Exception as e:  # pragma: no cover
        pytest.skip(f"reference training.loss_fns not importable: {e}")
    return torch, MultiStepMultiMasksAndIous


@pytest.mark.parametrize("M,S", [(1, 1), (3, 2)])
def test_parity_with_reference_multistep_loss(M, S):
    torch, Ref = _reference_loss_cls()
    ref = Ref(
        weight_dict={"loss_mask": 20, "loss_dice": 1, "loss_iou": 1, "loss_class": 1},
        supervise_all_iou=True, iou_use_l1_loss=True, pred_obj_scores=True,
        focal_gamma_obj_score=0.0, focal_alpha_obj_score=-1.0,
    )
    rng = np.random.default_rng(5 + M)
    T, N, H, W = 3, 3, 8, 8
    masks = (rng.normal(size=(T, S, N, M, H, W)) * 3).astype(np.float32)
    masks[0, 0, 1] = -1024.0  # NO_OBJ_SCORE logits
    ious = rng.random((T, S, N, M)).astype(np.float32)
    obj = rng.normal(size=(T, S, N, 1)).astype(np.float32)
    targets = (rng.random((T, N, H, W)) < 0.3).astype(np.uint8)
    targets[0, 1] = 0
    targets[2, 2] = 0

    tm = torch.tensor(masks, requires_grad=True)
    ti = torch.tensor(ious, requires_grad=True)
    to = torch.tensor(obj, requires_grad=True)
    outs = [
        {
            "multistep_pred_multimasks_high_res": [tm[t, s] for s in range(S)],
            "multistep_pred_ious": [ti[t, s] for s in range(S)],
            "multistep_object_score_logits": [to[t, s] for s in range(S)],
        }
        for t in range(T)
    ]
    r = ref(outs, torch.tensor(targets))
    r["core_loss"].backward()

    def f(m, i, o):
        return L.multistep_multimask_loss(m, i, o, targets)

    out = jax.jit(f)(masks, ious, obj)
    for k in ("loss_mask", "loss_dice", "loss_iou", "loss_class", "core_loss"):
        np.testing.assert_allclose(out[k], float(r[k].detach()), rtol=2e-5, atol=1e-7, err_msg=k)
    gm, gi, go = jax.jit(jax.grad(lambda *a: f(*a)["core_loss"], argnums=(0, 1, 2)))(
        jnp.asarray(masks), jnp.asarray(ious), jnp.asarray(obj)
    )
    np.testing.assert_allclose(gm, tm.grad.numpy(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(gi, ti.grad.numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(go, to.grad.numpy(), rtol=1e-5, atol=1e-8)
