"""Run the actual LM-EEC PyTorch reference (a read-only checkout) on CPU, in float32.

This script is meant to run in its own process (``tests/test_lmeec_reference.py`` starts it):
the LM-EEC repository ships its own ``sam2`` package, which clashes with the PyPI
``sam2==1.1.0`` the other parity tests import. Nothing in the checkout is modified; instead:

* the checkout goes first on ``sys.path`` so ``import sam2`` is LM-EEC's package;
* third-party modules it imports but never uses on this path are replaced by stubs when
  they are not installed (``timm.models.layers.trunc_normal_`` -> torch's,
  ``matplotlib.pyplot``, ``sklearn.cluster.KMeans``);
* its hard-coded ``.to("cuda")`` (``sam2_base.py`` 982 and 1648 on the inference path) is
  redirected to the CPU by wrapping ``torch.Tensor.to``.

Usage (by the test): ``python driver.py build --ref REF --out ref.pt --seed S --image-size N``
writes a randomly initialised LM-EEC state dict; ``python driver.py run --ref REF --ckpt ref.pt
--data DIR --out out.npz`` runs ``propagate_in_video`` on the clip in DIR (``src/``, ``tgt/``
JPEG folders, ``masks.npz`` with the source masks and frame names) exactly as
``tools/correspondence_inference.py::vos_inference`` drives it, and saves per frame the
images and source masks the reference saw, its low-res logits, object scores, binary
output masks and bank sizes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import types

import numpy as np


def _stub_missing_modules():
    import torch

    def have(name):
        try:
            importlib.import_module(name)
            return True
        except Exception:
            return False

    if not have("timm.models.layers"):
        for n in ("timm", "timm.models", "timm.models.layers"):
            sys.modules[n] = types.ModuleType(n)
        sys.modules["timm.models.layers"].trunc_normal_ = torch.nn.init.trunc_normal_
    if not have("matplotlib.pyplot"):
        for n in ("matplotlib", "matplotlib.pyplot"):
            sys.modules[n] = types.ModuleType(n)
    if not have("sklearn.cluster"):
        for n in ("sklearn", "sklearn.cluster"):
            sys.modules[n] = types.ModuleType(n)

        class KMeans:  # only used by the never-called _cluster_selection path
            def __init__(self, *a, **k):
                raise RuntimeError("sklearn stub: KMeans is not available")

        sys.modules["sklearn.cluster"].KMeans = KMeans
    if not have("networkx"):
        sys.modules["networkx"] = types.ModuleType("networkx")


def _cuda_means_cpu():
    import torch

    orig_to = torch.Tensor.to

    def is_cuda(d):
        return (isinstance(d, str) and d.startswith("cuda")) or (isinstance(d, torch.device) and d.type == "cuda")

    def to(self, *args, **kwargs):
        args = tuple("cpu" if is_cuda(a) else a for a in args)
        if is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return orig_to(self, *args, **kwargs)

    torch.Tensor.to = to


def setup_reference(ref: str) -> str:
    """Put the checkout first on ``sys.path`` (its ``sam2`` package replaces any other), stub the
    missing unused modules, map cuda to the CPU; returns the checkout's absolute path.
    Shared with ``train_driver.py``."""
    ref = os.path.abspath(ref)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.getcwd()]
    sys.path.insert(0, ref)
    for k in [k for k in sys.modules if k == "sam2" or k.startswith("sam2.")]:
        del sys.modules[k]
    import torch

    torch.set_num_threads(int(os.environ.get("LMEEC_REF_THREADS", "2")))
    _stub_missing_modules()
    _cuda_means_cpu()
    import sam2

    assert os.path.dirname(os.path.abspath(sam2.__file__)) == os.path.join(ref, "sam2"), sam2.__file__
    return ref


def _import_reference(ref: str):
    setup_reference(ref)
    from sam2.build_sam import build_sam2_video_predictor_ego

    return build_sam2_video_predictor_ego


def randomize_(module, seed: int = 0):
    """Same as ``tests/reference.py::randomize_`` (copied: that module imports PyPI sam2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.dtype.is_floating_point:
                continue
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                val = r / np.sqrt(max(fan_in, 1))
            elif name.endswith("weight") or name.endswith("gamma"):
                val = 1.0 + 0.1 * r
            else:
                val = 0.1 * r
            p.copy_(val.to(p.dtype))
    return module


def build(args, build_fn):
    predictor = build_fn(
        config_file=args.config,
        ckpt_path=args.ckpt,
        device="cpu",
        mode="eval",
        # tools/correspondence_inference.py: apply_postprocessing=False, non_overlap_masks=true
        apply_postprocessing=False,
        hydra_overrides_extra=[f"++model.image_size={args.image_size}", "++model.non_overlap_masks=true"],
    )
    return predictor.eval()


def cmd_build(args, build_fn):
    import torch

    args.ckpt = None
    model = build(args, build_fn)
    randomize_(model, args.seed)
    # Random weights give object scores that barely depend on the frame: widen their spread
    # and set the bias so that most frames have the object and a few do not.
    head = model.sam_mask_decoder.pred_obj_score_head.layers[-1]
    with torch.no_grad():
        head.weight.mul_(args.obj_weight_scale)
        head.bias.fill_(args.obj_bias)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"model": sd}, args.out)
    print(f"wrote {args.out}: {len(sd)} tensors")


def cmd_run(args, build_fn):
    import torch

    predictor = build(args, build_fn)  # the reference loads args.ckpt with strict=False ...
    sd = torch.load(args.ckpt, map_location="cpu", weights_only=True)["model"]
    predictor.load_state_dict(sd, strict=True)  # ... so load it again strictly (raises on a mismatch)
    predictor.eval()

    data = np.load(os.path.join(args.data, "masks.npz"))
    names = [str(n) for n in data["names"]]
    masks = data["masks"]  # [T, H, W] bool, the source view's GT
    # I 225-238: only non-empty source masks enter ego_masks (get_per_obj_mask keeps value 255)
    ego_masks = {n: masks[i] for i, n in enumerate(names) if masks[i].any()}

    captured = {}
    started = []
    orig_track_step = predictor.track_step

    def track_step(*a, **k):
        started.append(k["frame_idx"])
        out = orig_track_step(*a, **k)
        t = k["frame_idx"]
        captured[t] = {
            "src_mask": k["ego_gt_masks"][0, 0].detach().numpy().copy(),
            "n_bank_before": -1 if k["ego_memories"] is None else len(k["ego_memories"]),
            "n_bank": len(out[2]),
            "n_processed_before": len(k["exo_output_dict"]["non_cond_frame_outputs"]),
        }
        return out

    predictor.track_step = track_step

    error, error_frame = "", -1
    with torch.inference_mode():
        state = predictor.init_state(
            ego_video_path=os.path.join(args.data, "src"), exo_video_path=os.path.join(args.data, "tgt"),
            video_frames=names, async_loading_frames=False,
        )
        video_masks = {}
        try:
            for t, obj_ids, video_res_masks in predictor.propagate_in_video(state, ego_masks, names):
                video_masks[t] = (video_res_masks[0, 0] > 0.0).numpy()  # I 324-327: score_thresh 0
        except Exception as e:  # noqa: BLE001 (recorded for the test, which expects it or not)
            if not args.allow_error:
                raise
            error, error_frame = f"{type(e).__name__}: {e}", started[-1]
            print(f"reference raised at frame {error_frame}: {error}")

    T = len(names)
    S = predictor.image_size
    h = S // 4
    out = {
        "src_images": state["ego_images"].numpy().transpose(0, 2, 3, 1),
        "tgt_images": state["exo_images"].numpy().transpose(0, 2, 3, 1),
        "processed": np.zeros(T, bool),
        "low_res": np.zeros((T, h, h), np.float32),
        "score": np.zeros(T, np.float32),
        "mask": np.zeros((T, S, S), bool),
        "src_mask": np.zeros((T, S, S), np.float32),
        "n_bank": np.full(T, -1, np.int64),
        "n_processed_before": np.full(T, -1, np.int64),
        "error": np.array(error),
        "error_frame": np.array(error_frame),
    }
    for t, o in state["exo_output_dict"]["non_cond_frame_outputs"].items():
        out["processed"][t] = True
        out["low_res"][t] = o["pred_masks"][0, 0].float().numpy()
        out["score"][t] = float(o["object_score_logits"][0, 0])
        out["mask"][t] = video_masks[t]
        out["src_mask"][t] = captured[t]["src_mask"]
        out["n_bank"][t] = captured[t]["n_bank"]
        out["n_processed_before"][t] = captured[t]["n_processed_before"]
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}: {int(out['processed'].sum())} processed frames of {T}")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["build", "run"])
    p.add_argument("--ref", required=True, help="LM-EEC checkout (read only)")
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--config", default="configs/sam2.1/sam2.1_hiera_t.yaml")
    p.add_argument("--image-size", type=int, default=480)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-error", action="store_true", help="record an exception of the reference instead of failing")
    p.add_argument("--obj-weight-scale", type=float, default=1.0, help="scale of the object-score head's last weight")
    p.add_argument("--obj-bias", type=float, default=0.0, help="value of the object-score head's last bias")
    args = p.parse_args(argv)
    build_fn = _import_reference(args.ref)
    {"build": cmd_build, "run": cmd_run}[args.cmd](args, build_fn)


if __name__ == "__main__":
    main()
