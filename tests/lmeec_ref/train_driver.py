"""Run one LM-EEC *training* step of the actual PyTorch reference (read-only checkout) on CPU, f32.

Started in its own process by ``tests/test_train_reference.py`` (LM-EEC's ``sam2`` package
clashes with the PyPI one); the environment set-up (checkout first on ``sys.path``, stubs for
unused third-party modules, ``cuda`` mapped to the CPU) is ``driver.setup_reference``. The
training code imports a few more packages that it does not use on this path; they are
stubbed when missing: ``tensordict.tensorclass`` (-> a dataclass; only the batch containers
of ``training/utils/data_utils.py`` use it, and we pass our own batch object),
``torch.utils.tensorboard`` (logger only) and ``fvcore.common.param_scheduler`` (the two
schedulers of the recipe: ``CosineParamScheduler`` and ``ConstantParamScheduler`` with
fvcore's formulas; only their value at ``where = 0`` is used here).

What it does, with the EgoExo finetune yaml (``sam2/configs/sam2.1_training/
sam2.1_hiera_b+_EgoExo_finetune.yaml``) as the source of every setting except these test
changes: the SAM 2.1 *tiny* trunk and neck (``sam2/configs/sam2.1/sam2.1_hiera_t.yaml``) in
place of base-plus, ``image_size`` = ``--image-size``, drop path 0 and memory-attention
dropout 0; random weights (``driver.randomize_``, object-score head widened as in
``driver.py``), saved for the test.

1. ``SAM2Train`` built by hydra from the yaml's ``trainer.model`` (``_convert_="all"``, as
   ``Trainer._setup_components``), in training mode; the optimizer built by
   ``training.optimizer.construct_optimizer`` from ``trainer.optim`` (AdamW, lr / weight decay
   schedulers, layer decay modifier), the loss by hydra from ``trainer.loss.all``, the clipper
   from ``trainer.optim.gradient_clip``.
2. ``Trainer._step`` / ``_run_step`` / ``train_epoch`` on one batch, without autocast (f32):
   ``outputs = model(batch, 0)``; ``loss = loss_fn(outputs, batch.exo_masks)`` (plus the
   affinity term if any output has one: the driver records that none does);
   ``core_loss.backward()``; ``optim.step_schedulers(where=0, step=0)``; ``gradient_clipper``;
   ``optimizer.step()``.
3. Saves per frame the high-res multimask logits the loss sees
   (``multistep_pred_multimasks_high_res``), low-res logits, IoU predictions and object
   scores; the loss terms (total and per frame); every parameter's gradient before clipping
   (and which parameters have ``grad is None``); the total grad norm; each parameter's lr and
   weight decay in the optimizer; the parameters after the step.

Usage: ``python train_driver.py --ref REF --batch batch.npz --out DIR [--image-size 256]``;
``batch.npz`` holds ``src_images``/``tgt_images`` ``[B, T, S, S, 3]`` float32 (already
normalised) and ``src_masks``/``tgt_masks`` ``[B, T, S, S]`` uint8; DIR receives
``init.npz`` (the random state dict), ``grads.npz``, ``after.npz`` (parameters after the
step), ``outputs.npz`` and ``info.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import types

import numpy as np

from driver import randomize_, setup_reference  # noqa: E402  (this directory is sys.path[0])

FINETUNE_YAML = "sam2/configs/sam2.1_training/sam2.1_hiera_b+_EgoExo_finetune.yaml"
TINY_YAML = "sam2/configs/sam2.1/sam2.1_hiera_t.yaml"


def _have(name):
    import importlib

    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


def _stub_training_imports():
    import dataclasses

    if not _have("tensordict"):
        m = types.ModuleType("tensordict")
        m.tensorclass = lambda cls=None, **kw: dataclasses.dataclass(cls) if cls is not None else dataclasses.dataclass
        sys.modules["tensordict"] = m
    if not _have("torch.utils.tensorboard"):
        m = types.ModuleType("torch.utils.tensorboard")

        class SummaryWriter:  # the logger is never constructed here
            def __init__(self, *a, **k):
                raise RuntimeError("tensorboard stub")

        m.SummaryWriter = SummaryWriter
        sys.modules["torch.utils.tensorboard"] = m
    if not _have("fvcore.common.param_scheduler"):
        mods = {n: types.ModuleType(n) for n in ("fvcore", "fvcore.common", "fvcore.common.param_scheduler")}

        class ConstantParamScheduler:
            def __init__(self, value):
                self._value = value

            def __call__(self, where):
                return self._value

        class CosineParamScheduler:  # fvcore: end + (start - end) * (1 + cos(pi * where)) / 2
            def __init__(self, start_value, end_value):
                self._start_value, self._end_value = start_value, end_value

            def __call__(self, where):
                return self._end_value + 0.5 * (self._start_value - self._end_value) * (1 + math.cos(math.pi * where))

        ps = mods["fvcore.common.param_scheduler"]
        ps.ConstantParamScheduler, ps.CosineParamScheduler = ConstantParamScheduler, CosineParamScheduler
        mods["fvcore"].common = mods["fvcore.common"]
        mods["fvcore.common"].param_scheduler = ps
        sys.modules.update(mods)


class Batch:
    """The fields of ``EgoExoBatchedVideoDatapoint`` that ``SAM2Train.forward`` and the
    trainer's ``_step`` read: frame-major ``[T, B, ...]`` images and masks, one object per clip."""

    dict_key = "all"

    def __init__(self, src_images, tgt_images, src_masks, tgt_masks):
        import torch

        to_tbchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 4, 2, 3)))
        self.ego_img_batch = to_tbchw(src_images)  # [T, B, 3, S, S]
        self.exo_img_batch = to_tbchw(tgt_images)
        self.ego_masks = torch.from_numpy(np.ascontiguousarray(src_masks.transpose(1, 0, 2, 3)) > 0)  # [T, B, S, S] bool
        self.exo_masks = torch.from_numpy(np.ascontiguousarray(tgt_masks.transpose(1, 0, 2, 3)) > 0)
        T, B = self.ego_masks.shape[:2]
        # data_utils.egoexo_collate_fn: obj_to_frame_idx[t, b] = (t, video b)
        self.ego_obj_to_frame_idx = torch.stack(
            [torch.stack([torch.tensor([t, b], dtype=torch.int) for b in range(B)]) for t in range(T)])
        self.exo_obj_to_frame_idx = self.ego_obj_to_frame_idx

    @property
    def num_frames(self):
        return self.ego_img_batch.shape[0]

    @property
    def flat_obj_to_img_idx(self):  # data_utils: video_idx * num_frames + frame_idx
        frame_idx, video_idx = self.ego_obj_to_frame_idx.unbind(dim=-1)
        return video_idx * self.num_frames + frame_idx

    @property
    def flat_img_batch(self):  # data_utils: [(B*T), C, H, W] per view, video-major
        return self.ego_img_batch.transpose(0, 1).flatten(0, 1), self.exo_img_batch.transpose(0, 1).flatten(0, 1)


def load_recipe(ref: str, image_size: int):
    """The finetune yaml with the test's changes (tiny trunk/neck, image size, no dropout)."""
    from omegaconf import OmegaConf
    from training.utils.train_utils import register_omegaconf_resolvers

    register_omegaconf_resolvers()
    cfg = OmegaConf.load(os.path.join(ref, FINETUNE_YAML))
    tiny = OmegaConf.load(os.path.join(ref, TINY_YAML))
    cfg.scratch.resolution = image_size
    m = cfg.trainer.model
    m.image_encoder.trunk = tiny.model.image_encoder.trunk
    m.image_encoder.trunk.drop_path_rate = 0.0
    m.image_encoder.neck.backbone_channel_list = tiny.model.image_encoder.neck.backbone_channel_list
    layer = m.memory_attention.layer
    layer.dropout = 0.0
    layer.self_attention.dropout = 0.0
    layer.cross_attention.dropout = 0.0
    return cfg


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ref", required=True, help="LM-EEC checkout (read only)")
    p.add_argument("--batch", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--obj-weight-scale", type=float, default=1.0)
    p.add_argument("--obj-bias", type=float, default=0.0)
    args = p.parse_args(argv)

    # torch.optim's first param group imports torch._dynamo, which calls find_spec on many
    # optional packages and fails on a stub module (no __spec__): import it before the stubs
    import torch._dynamo  # noqa: F401

    ref = setup_reference(args.ref)
    _stub_training_imports()
    import torch
    from hydra.utils import instantiate

    from training.model.sam2 import SAM2Train
    from training.optimizer import construct_optimizer

    torch.manual_seed(args.seed)
    cfg = load_recipe(ref, args.image_size)
    tc = cfg.trainer
    model = instantiate(tc.model, _convert_="all")
    assert type(model) is SAM2Train, type(model)
    randomize_(model, args.seed)
    head = model.sam_mask_decoder.pred_obj_score_head.layers[-1]
    with torch.no_grad():
        head.weight.mul_(args.obj_weight_scale)
        head.bias.fill_(args.obj_bias)
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, "init.npz"),
             **{k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    model.train()

    optim = construct_optimizer(model, tc.optim.optimizer, tc.optim.options, tc.optim.param_group_modifiers)
    loss_fn = instantiate(tc.loss, _convert_="all")["all"]
    clipper = instantiate(tc.optim.gradient_clip)

    data = np.load(args.batch)
    batch = Batch(data["src_images"], data["tgt_images"], data["src_masks"], data["tgt_masks"])

    # Trainer._run_step / _step (amp off: float32 on the CPU)
    optim.zero_grad(set_to_none=True)
    outputs = model(batch, 0)
    losses = loss_fn(outputs, batch.exo_masks)
    affinities = [o["high_res_affinity"] for o in outputs if o["high_res_affinity"] is not None]
    assert not affinities, "LM-EEC's decoder returned a high_res_affinity: the trainer would add a loss term"
    core = losses["core_loss"]
    per_frame = [loss_fn._forward(o, t, float(batch.exo_masks.shape[1])) for o, t in zip(outputs, batch.exo_masks)]
    core.backward()

    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    no_grad = [n for n in names if params[n].grad is None]
    grads = {n: params[n].grad.detach().numpy().copy() for n in names if params[n].grad is not None}
    grad_norm = float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(params[n].grad) for n in names if params[n].grad is not None])))

    # Trainer.train_epoch: schedulers at where = 0, clip, optimizer step (GradScaler disabled)
    optim.step_schedulers(0.0, step=0)
    clipper(model=model)
    groups = {}
    for g in optim.optimizer.param_groups:
        for q in g["params"]:
            groups[id(q)] = (float(g["lr"]), float(g["weight_decay"]))
    optim.optimizer.step()

    lr_wd = {n: groups[id(params[n])] for n in names}
    np.savez(os.path.join(args.out, "grads.npz"), **grads)
    np.savez(os.path.join(args.out, "after.npz"), **{n: params[n].detach().numpy().copy() for n in names})
    f = lambda x: x.detach().float().numpy()
    np.savez(
        os.path.join(args.out, "outputs.npz"),
        high_res=np.stack([f(o["multistep_pred_multimasks_high_res"][0][:, 0]) for o in outputs]),  # [T, B, S, S]
        low_res=np.stack([f(o["multistep_pred_multimasks"][0][:, 0]) for o in outputs]),
        ious=np.stack([f(o["multistep_pred_ious"][0][:, 0]) for o in outputs]),  # [T, B]
        scores=np.stack([f(o["multistep_object_score_logits"][0][:, 0]) for o in outputs]),
        # the frame's pred_masks_high_res (what its memory was encoded from) = the loss's logits
        pred_high_res=np.stack([f(o["pred_masks_high_res"][:, 0]) for o in outputs]),
    )
    info = {
        "losses": {k: float(v) for k, v in losses.items()},
        "per_frame": [{k: float(v) for k, v in d.items()} for d in per_frame],
        "no_grad": no_grad,
        "grad_norm": grad_norm,
        "lr_wd": lr_wd,
        "num_params": len(names),
        "param_shapes": {n: list(params[n].shape) for n in names},
    }
    with open(os.path.join(args.out, "info.json"), "w") as fh:
        json.dump(info, fh)
    print(f"reference step done: core_loss {float(core):.6f}, grad norm {grad_norm:.4e}, "
          f"{len(no_grad)} parameters without a gradient")


if __name__ == "__main__":
    main()
