"""One LM-EEC training step against the *actual* LM-EEC PyTorch training code.

``tests/test_train.py`` checks our training forward against our own oracle
(``tests/train_oracle.py``); this test runs the reference: ``training/model/sam2.py``
``SAM2Train.forward`` + ``training/loss_fns.py`` ``MultiStepMultiMasksAndIous`` + the trainer's
step (``training/trainer.py``: backward, ``GradientClipper``, AdamW built by
``training/optimizer.py::construct_optimizer`` with the layer-decay modifier), all configured
from LM-EEC's EgoExo finetune yaml (``sam2.1_hiera_b+_EgoExo_finetune.yaml``: no point / box
prompts, no initial conditioning frame, ``num_frames: 8``, the loss weights 20/1/1/1, lr
5e-6 / 3e-6, weight decay 0.1, layer decay 0.9, clip 0.1), with these test changes: the SAM 2.1
tiny trunk and neck, ``image_size`` 256, Hiera drop path and memory-attention dropout 0,
random weights (``tests/lmeec_ref/driver.py::randomize_``, object-score head widened so that
most frames have the object), float32 without autocast (the recipe's bf16 is not compared),
and a synthetic batch of two 8-frame two-view clips fed directly as tensors (no data
augmentation; one empty source mask, two frames without the object in the target view).

Ours: the same weights through the strict loader into ``get_config("sam2.1_hiera_t",
image_size=256, mv_moe=True, dropout=0, drop path 0)``, ``lmeec_jax.training.forward.clip_forward``
+ ``lmeec_jax.training.losses`` (via the trainer's ``_loss_and_metrics``) for outputs and
gradients, and ``lmeec_jax.training.trainer.make_train_step`` with
``lmeec_jax.training.optim.make_optimizer`` and the ``lmeec_hiera_b+_egoexo`` recipe (its
``optim`` and ``loss`` sections) for the step.

Compared: per-frame high-res logits, IoU predictions, object scores; each loss term and the
total (summed over frames, and per frame); the gradient of every parameter tensor; which
parameters get no gradient in the reference (``grad is None``: AdamW skips them) against the
recipe's ``frozen_patterns``; each parameter's lr and weight decay; the parameters after one
optimizer step and the step's update.

The reference runs in a subprocess (``tests/lmeec_ref/train_driver.py``, stubs for unused
imports, cuda mapped to CPU), see ``tests/test_lmeec_reference.py``. Skipped when no LM-EEC
checkout is found (``LMEEC_REF``, default ``/tmp/ref/juneyeeHu+LM-EEC``). Slow: a few minutes
on a CPU (tiny Hiera on 32 images at 256, forward and backward, on both sides, plus two XLA
compilations).
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_lmeec_reference import _reference_dir

DRIVER = Path(__file__).parent / "lmeec_ref" / "train_driver.py"
RECIPE = "lmeec_hiera_b+_egoexo"

B, T, S = 2, 8, 128
SEED = 0
# object-score head's last layer (as tests/test_lmeec_reference.py): objects predicted present
# on most frames (mask gradients flow) but not all (the -1024 fill, no_obj_ptr, no_obj_embed_spatial)
OBJ_WEIGHT_SCALE, OBJ_BIAS = 10.0, 3.5
EMPTY_SRC = ((1, 5),)  # (clip, frame) with an empty source mask (training encodes it anyway)
EMPTY_TGT = ((0, 3), (1, 6))  # object absent from the target view: only the object-score loss counts

pytestmark = pytest.mark.slow


def make_batch(seed=SEED):
    """Smooth random 'normalised' images and moving elliptic masks, ``[B, T, ...]``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:S, :S].astype(np.float32) / S

    def image():
        img = np.zeros((S, S, 3), np.float32)
        for _ in range(6):
            fy, fx = rng.uniform(0.5, 6.0, 2)
            ph = rng.uniform(0, 2 * np.pi)
            amp = rng.standard_normal(3).astype(np.float32) * 0.6
            img += amp * np.sin(2 * np.pi * (fy * yy + fx * xx) + ph)[..., None]
        return img + 0.1 * rng.standard_normal((S, S, 3)).astype(np.float32)

    def ellipse(cy, cx, ry, rx):
        return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0).astype(np.uint8)

    src = np.stack([np.stack([image() for _ in range(T)]) for _ in range(B)])
    tgt = np.stack([np.stack([image() for _ in range(T)]) for _ in range(B)])
    sm = np.zeros((B, T, S, S), np.uint8)
    tm = np.zeros((B, T, S, S), np.uint8)
    for b in range(B):
        c0 = rng.uniform(0.3, 0.7, 4)
        for t in range(T):
            if (b, t) not in EMPTY_SRC:
                sm[b, t] = ellipse(c0[0] + 0.02 * t, c0[1] - 0.015 * t, 0.12 + 0.005 * t, 0.18)
            if (b, t) not in EMPTY_TGT:
                tm[b, t] = ellipse(c0[2] - 0.01 * t, c0[3] + 0.02 * t, 0.15, 0.1 + 0.004 * t)
    return {"src_images": src, "tgt_images": tgt, "src_masks": sm, "tgt_masks": tm}


def _run_reference(ref, root: Path, batch) -> dict:
    np.savez(root / "batch.npz", **batch)
    out = root / "ref"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the driver sets its own sys.path (LM-EEC's sam2 and training first)
    env.setdefault("LMEEC_REF_THREADS", "2")
    r = subprocess.run([sys.executable, str(DRIVER), "--ref", ref, "--batch", str(root / "batch.npz"),
                        "--out", str(out), "--image-size", str(S), "--seed", str(SEED),
                        "--obj-weight-scale", str(OBJ_WEIGHT_SCALE), "--obj-bias", str(OBJ_BIAS)],
                       capture_output=True, text=True, env=env, timeout=3600, cwd=str(DRIVER.parent))
    if r.returncode != 0:
        raise AssertionError(f"reference train driver failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    print(r.stdout.strip())
    with open(out / "info.json") as f:
        info = json.load(f)
    return {"info": info, "init": dict(np.load(out / "init.npz")), "grads": dict(np.load(out / "grads.npz")),
            "after": dict(np.load(out / "after.npz")), "outputs": dict(np.load(out / "outputs.npz"))}


def _run_ours(init_sd, batch) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lmeec_jax.models.config import get_config
    from lmeec_jax.models.sam2 import build_model
    from lmeec_jax.models.weights import load_state_dict, to_state_dict
    from lmeec_jax.training import config as C
    from lmeec_jax.training import forward as LT
    from lmeec_jax.training.optim import make_optimizer, param_rules
    from lmeec_jax.training.trainer import BATCH_KEYS, _loss_and_metrics, make_train_step

    jax.config.update("jax_default_matmul_precision", "highest")
    recipe = C.load_config(RECIPE)
    cfg = get_config("sam2.1_hiera_t", image_size=S, mv_moe=True, dynamic_multimask_via_stability=False,
                     dropout=0.0, trunk={"drop_path_rate": 0.0})
    model = build_model(cfg, abstract=True)
    assert load_state_dict(model, init_sd) == []  # strict: every tensor used
    model.train()
    graphdef, params, rngs, rest = LT.split_model(model)
    fcfg = LT.TrainForwardConfig(dtype="float32", deterministic=True)
    jb = {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}
    clip = LT.ClipBatch(*(jb[k] for k in BATCH_KEYS))

    def loss_fn(p):  # what make_train_step differentiates
        out, _ = LT.clip_forward(graphdef, p, rngs, rest, clip, fcfg)
        losses, _ = _loss_and_metrics(out, clip.tgt_masks, recipe.loss)
        return losses["core_loss"], (out, losses)

    (_, (out, losses)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

    import optax

    # the optimizer of the recipe, preceded by an identity transform whose state keeps the
    # gradients the train step hands to the optimizer (the step's own compilation)
    keep = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), lambda u, s, p=None: (u, u))
    tx = optax.chain(keep, make_optimizer(params, recipe.optim, total_steps=1000))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rest": rest}
    step = jax.jit(make_train_step(graphdef, tx, fcfg, recipe.loss, recipe.train.seed))
    new_state, metrics = step(state, jb, rngs)

    as_torch = lambda p: to_state_dict(nnx.merge(graphdef, p, rngs, rest))  # torch names and layouts
    # per-frame loss terms (the same loss on one frame at a time)
    from lmeec_jax.training.losses import multistep_multimask_loss

    per_frame = []
    for t in range(T):
        lt = multistep_multimask_loss(out.high_res_logits[t:t + 1, None], out.ious[t:t + 1, None],
                                      out.object_score_logits[t:t + 1, None],
                                      jnp.swapaxes(clip.tgt_masks, 0, 1)[t:t + 1], recipe.loss, num_objects=B)
        per_frame.append({k: float(v) for k, v in lt.items()})
    return {
        "high_res": np.asarray(out.high_res_logits[:, :, 0]), "low_res": np.asarray(out.low_res_logits[:, :, 0]),
        "ious": np.asarray(out.ious[:, :, 0]), "scores": np.asarray(out.object_score_logits[:, :, 0]),
        "losses": {k: float(v) for k, v in losses.items()}, "per_frame": per_frame,
        "grads": as_torch(grads), "after": as_torch(new_state["params"]),
        "step_grads": as_torch(new_state["opt_state"][0]),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "rules": param_rules(params, recipe.optim), "frozen_patterns": recipe.optim.frozen_patterns,
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    ref = _reference_dir()
    root = tmp_path_factory.mktemp("train_ref")
    batch = make_batch()
    refo = _run_reference(ref, root, batch)
    ours = _run_ours(refo["init"], batch)
    return {"ref": refo, "ours": ours, "batch": batch}


def _rel(a, b):
    """max |a - b| / max |a| (a: the reference), float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = np.abs(a).max()
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(b).max())


def test_outputs_match(run):
    """Per-frame high-res / low-res logits, IoU predictions and object scores."""
    ro, ours = run["ref"]["outputs"], run["ours"]
    np.testing.assert_array_equal(ro["pred_high_res"], ro["high_res"])
    scores = ro["scores"]
    print("object scores (ref) per frame x clip:\n", np.array2string(scores, precision=3))
    # meaningful: objects present on most frames, absent on some, no score within noise of 0
    assert 0.5 < (scores > 0).mean() < 1, scores
    assert np.abs(scores).min() > 1e-2
    present = scores > 0  # frames with real logits (the others are the -1024 fill on both sides)
    assert np.array_equal(present, ours["scores"] > 0)
    report = []
    worst = {}
    for key in ("high_res", "low_res"):
        r, o = ro[key], ours[key]
        assert np.all(r[~present] == -1024.0) and np.all(o[~present] == -1024.0)
        scale = np.abs(r[present]).max()
        err = np.abs(r.astype(np.float64) - o).max(axis=(-1, -2))  # [T, B]
        worst[key] = (err.max(), err.max() / scale)
        report.append(f"{key}: max |err| {err.max():.3e} of max |logit| {scale:.3g} -> rel {err.max() / scale:.3e}; "
                      f"per frame {np.array2string(err.max(1), precision=2)}")
    for key in ("ious", "scores"):
        err = np.abs(ro[key].astype(np.float64) - ours[key])
        worst[key] = (err.max(), err.max() / np.abs(ro[key]).max())
        report.append(f"{key}: max |err| {err.max():.3e} (rel {worst[key][1]:.3e})")
    print("\n".join(report))
    assert worst["high_res"][1] < 1e-4, worst
    assert worst["low_res"][1] < 1e-4, worst
    assert worst["ious"][0] < 1e-5, worst
    assert worst["scores"][1] < 1e-4, worst


def test_losses_match(run):
    """Each loss term (summed over frames) and the total, and every frame's terms."""
    rl, ol = run["ref"]["info"]["losses"], run["ours"]["losses"]
    keys = ("loss_mask", "loss_dice", "loss_iou", "loss_class", "core_loss")
    lines = [f"{k:10s} ref {rl[k]:.8f} ours {ol[k]:.8f} rel err {abs(rl[k] - ol[k]) / abs(rl[k]):.2e}" for k in keys]
    print("\n".join(lines))
    print(f"train step metrics (ours): {run['ours']['metrics']}")
    for k in keys:
        assert abs(rl[k] - ol[k]) <= 2e-5 * abs(rl[k]), (k, rl[k], ol[k])
    # the train step's reported loss is the same number
    assert abs(run["ours"]["metrics"]["loss"] - rl["core_loss"]) <= 2e-5 * rl["core_loss"]
    # per frame: the reference's _forward on one frame vs ours on one frame
    for t, (rf, of) in enumerate(zip(run["ref"]["info"]["per_frame"], run["ours"]["per_frame"])):
        for k in keys:
            assert abs(rf[k] - of[k]) <= 2e-5 * max(abs(rf[k]), 1e-3), (t, k, rf[k], of[k])
    # the empty-target frames contribute only the object-score term
    for b, t in EMPTY_TGT:
        assert run["batch"]["tgt_masks"][b, t].sum() == 0


# Attention key biases of the SAM decoder's transformer: softmax is invariant to adding q.b to
# every logit of a row, so their gradient is 0 in exact arithmetic (both sides: rounding noise).
ZERO_GRAD_IN_EXACT_ARITHMETIC = "sam_mask_decoder.transformer.*k_proj.bias"


def test_gradients_match(run):
    """The gradient of every parameter tensor; parameters without a gradient."""
    rg, og = run["ref"]["grads"], run["ours"]["grads"]
    info = run["ref"]["info"]
    names = list(info["param_shapes"])
    no_grad = set(info["no_grad"])
    assert set(rg) == set(names) - no_grad
    gmax = max(float(np.abs(v).max()) for v in rg.values())
    errs, norm_errs, exact_zero = {}, {}, []
    for n in rg:
        assert og[n].shape == rg[n].shape, (n, og[n].shape, rg[n].shape)
        if fnmatch.fnmatchcase(n, ZERO_GRAD_IN_EXACT_ARITHMETIC):
            exact_zero.append(n)
            assert max(np.abs(rg[n]).max(), np.abs(og[n]).max()) < 1e-7 * gmax, n
            continue
        errs[n] = _rel(rg[n], og[n])
        if np.any(rg[n]):  # all-zero reference gradients: checked below (ours all zero too)
            d = rg[n].astype(np.float64) - og[n]
            norm_errs[n] = float(np.linalg.norm(d) / np.linalg.norm(rg[n].astype(np.float64)))
    worst = sorted(errs.items(), key=lambda kv: -kv[1])
    ref_zero = sorted(n for n in rg if not np.any(rg[n]))
    our_zero = sorted(n for n in names if not np.any(og[n]))
    e = np.array(list(errs.values()))
    print(f"{len(rg)} tensors with a gradient, {len(no_grad)} without (reference grad None): {sorted(no_grad)}")
    print(f"all-zero gradients: reference {ref_zero}; ours {our_zero}")
    print(f"max |g| over all tensors {gmax:.4g}; zero in exact arithmetic (|g| < 1e-7 max on both sides): {exact_zero}")
    print(f"per-tensor max|d|/max|g_ref|: median {np.median(e):.2e}, 90% {np.percentile(e, 90):.2e}, "
          f"99% {np.percentile(e, 99):.2e}, max {e.max():.2e}; worst norm-relative {max(norm_errs.values()):.2e}")
    for n, v in worst[:8]:
        print(f"  {v:.3e}  {n}  (max |g| {np.abs(rg[n]).max():.3e}, norm-relative {norm_errs[n]:.2e})")
    print(f"grad norm: ref {info['grad_norm']:.6e} ours {run['ours']['metrics']['grad_norm']:.6e}")
    # tensors the reference leaves without gradient: ours are exactly zero, and the recipe
    # freezes exactly those (AdamW skips a grad-None parameter: no update, no weight decay)
    for n in no_grad:
        assert not np.any(og[n]), n
    frozen = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in run["ours"]["frozen_patterns"])}
    assert frozen == no_grad, (sorted(frozen - no_grad), sorted(no_grad - frozen))
    assert set(our_zero) == set(ref_zero) | no_grad, (sorted(set(our_zero) ^ (set(ref_zero) | no_grad)))
    # Typical agreement ~1e-5. A ReLU input within float noise of 0 (measured: MV_MoE.conv1.0,
    # one channel at one position with |x| = 3e-8 of the activations' scale) flips the ReLU on
    # one side and moves that channel's weight gradient by ~1e-3 of the tensor's max; the
    # decoder's token self-attention q/k gradients are tiny (1e-3 of their neighbours') and
    # carry ~1e-3 relative noise. A wrong term gives errors of order 1.
    assert np.median(e) < 2e-5 and np.percentile(e, 90) < 1e-4, (np.median(e), np.percentile(e, 90))
    assert worst[0][1] < 3e-3, worst[:5]
    assert max(norm_errs.values()) < 2e-3
    assert abs(info["grad_norm"] - run["ours"]["metrics"]["grad_norm"]) <= 1e-4 * info["grad_norm"]


def _torch_adamw_step(init, grads, lr_wd, no_grad, max_norm):
    """The reference's optimizer step (``GradientClipper`` = ``clip_grad_norm_``, then
    ``torch.optim.AdamW`` with the reference's per-parameter lr / weight decay) applied to
    *our* gradients: separates the optimizer's arithmetic from the gradients' float noise."""
    import torch

    params = {n: torch.nn.Parameter(torch.from_numpy(np.array(init[n], np.float32))) for n in lr_wd}
    for n, p in params.items():
        if n not in no_grad:
            p.grad = torch.from_numpy(np.array(grads[n], np.float32))
    groups = {}
    for n, (lr, wd) in lr_wd.items():
        groups.setdefault((lr, wd), []).append(params[n])
    opt = torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()])
    torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm=max_norm, norm_type=2)
    opt.step()
    return {n: p.detach().numpy() for n, p in params.items()}


def test_optimizer_step_matches(run):
    """lr and weight decay of every parameter; parameters after one AdamW step (clip 0.1)."""
    info, rules = run["ref"]["info"], run["ours"]["rules"]
    no_grad = set(info["no_grad"])
    for n, (lr, wd) in info["lr_wd"].items():
        r = rules[n]
        if n in no_grad:
            assert r.lr_group == "frozen", n
            continue
        assert r.lr_start == pytest.approx(lr, rel=1e-9), (n, r.lr_start, lr)
        assert r.weight_decay == wd, (n, r.weight_decay, wd)
    init, ra, oa = run["ref"]["init"], run["ref"]["after"], run["ours"]["after"]
    # (a) torch AdamW on our gradients vs our step: the optimizer's arithmetic
    sg, og = run["ours"]["step_grads"], run["ours"]["grads"]
    print("train step's gradients vs the separate value_and_grad (two compilations): max rel "
          f"{max(_rel(og[n], sg[n]) for n in info['lr_wd'] if n not in no_grad and np.any(og[n])):.2e}")
    ta = _torch_adamw_step(init, sg, info["lr_wd"], no_grad, max_norm=0.1)
    # (b) the reference's step vs ours: includes the gradients' float noise, which Adam's first
    # step g / (|g| + eps) amplifies where the clipped |g| is near eps = 1e-8
    p_err, u_err, u_err_same_grads, frac_big = {}, {}, {}, {}
    for n in ra:
        p_err[n] = _rel(ra[n], oa[n])
        du_ref = ra[n].astype(np.float64) - init[n]
        du_our = oa[n].astype(np.float64) - init[n]
        if n in no_grad:
            assert not np.any(du_ref) and not np.any(du_our), n  # untouched on both sides
            continue
        lr = info["lr_wd"][n][0]
        d = np.abs(du_ref - du_our) / lr  # in units of the step's lr (a first Adam step moves ~1 lr)
        u_err[n] = float(d.max())
        frac_big[n] = float((d > 0.1).mean())
        # float32 parameters resolve an update only to their ulp (up to ~0.08 lr for |p| ~ 1 at
        # the smallest layer-decayed lr), and torch rounds p three times (decay factor 1 - lr*wd
        # in f32, p * factor, p - step) where we round once: the error beyond 3 ulp, in units of lr
        ulp = np.spacing(np.maximum(np.abs(oa[n]), np.abs(ta[n])).astype(np.float32)).astype(np.float64)
        dd = np.abs((ta[n].astype(np.float64) - init[n]) - du_our)
        u_err_same_grads[n] = float(np.maximum(dd - 3 * ulp, 0).max() / lr)
    wp = sorted(p_err.items(), key=lambda kv: -kv[1])
    wu = sorted(u_err.items(), key=lambda kv: -kv[1])
    ws = sorted(u_err_same_grads.items(), key=lambda kv: -kv[1])
    n_el = sum(np.size(ra[n]) for n in frac_big)
    big = sum(frac_big[n] * np.size(ra[n]) for n in frac_big) / n_el
    print(f"post-step params vs reference: max rel err {wp[0][1]:.3e} ({wp[0][0]})")
    print(f"update vs torch AdamW on our grads: max (|du - du_torch| - 3 ulp(p)) / lr {ws[0][1]:.3e} ({ws[0][0]})")
    print(f"update vs reference: max |du_ref - du_ours| / lr {wu[0][1]:.3e}; elements off by > 0.1 lr: {big:.2e}")
    for n, e in wu[:6]:
        print(f"  {e:.3e}  {n}")
    assert ws[0][1] < 1e-2, ws[:5]
    assert wp[0][1] < 1e-4, wp[:5]
    assert big < 1e-3, big
