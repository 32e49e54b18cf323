"""Per-stage time of one LM-EEC frame step, JAX against the torch sam2==1.1.0 modules, same run.

    python benchmarks/profile_frame_step.py [--model lmeec_hiera_b+] [--image-size 480]
        [--repeats 5] [--chunk 8] [--skip-torch]

One object (B = 1), float32, CPU. The frame step of ``lmeec_jax.tracking.frame_step`` is cut
into its stages, each jitted on its own with the shapes it has inside a video once the
memory is full (7 source + 7 target slots, 15 object pointers):

* ``encode x2``: ``forward_image`` of the source and the target image (one call, 2 images);
* ``source memory``: ``encode_new_memory`` of the source features and mask;
* ``view expert``: memory attention of the target over the source memory (1 slot);
* ``memory expert``: memory attention over [7 source | 7 target slots | pointer tokens];
* ``MV_MoE``, ``heads`` (``forward_sam_heads``, one mask, no dense prompt), ``target memory``;
* ``track step``: the whole tracker part of a frame as the video runs it
  (``ChunkRunner.track`` over ``--chunk`` frames with full memory, divided by the chunk;
  includes the memory read/compression and write the stages above leave out);
* host: ``Transforms.image`` of the two frames (normalise + resize) and of the output
  (``Transforms.masks``: upsample + threshold) and RLE encoding.

Torch (where installed): the same stages through the modules of a random sam2==1.1.0
SAM2Base of the same size (``image_encoder`` + ``conv_s0/s1``, ``memory_encoder``,
``memory_attention``, ``_forward_sam_heads``); MV_MoE is LM-EEC's own module, not in sam2,
so it has no torch column. Calls alternate JAX / torch; the table shows median ms.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402


def _median_ms(fns: dict, repeats: int) -> dict:
    for fn in fns.values():  # warm-up (compilation)
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lmeec_hiera_b+")
    ap.add_argument("--image-size", type=int, default=480)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1, help="objects in the track-step row (the stages: 1)")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args(argv)

    from lmeec_jax.data.rle import encode_mask as rle_encode
    from lmeec_jax.inference.runner import ChunkRunner
    from lmeec_jax.inference.transforms import Transforms
    from lmeec_jax.models.config import get_config
    from lmeec_jax.models.sam2 import build_model, num_obj_ptr_slots

    S = args.image_size
    cfg = get_config(args.model, image_size=S)
    model = build_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    h = S // 16
    C, mem = cfg.d_model, cfg.mem_dim
    rng = np.random.default_rng(0)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
    n_slots, n_ptr = cfg.num_maskmem, num_obj_ptr_slots(cfg)
    k_ptr = C // mem

    def jit(f):
        g = jax.jit(lambda p, *a: f(nnx.merge(graphdef, p), *a))
        return lambda *a: jax.block_until_ready(g(params, *a))

    imgs2 = f32(2, S, S, 3)
    feat, pos = f32(1, h, h, C), f32(1, h, h, C)
    fpn0, fpn1 = f32(1, 4 * h, 4 * h, C // 8), f32(1, 2 * h, 2 * h, C // 4)
    mask = jnp.asarray((rng.random((1, S, S, 1)) > 0.5).astype(np.float32))
    hi_logits = f32(1, S, S, 1)
    src_mem1, src_pos1 = f32(1, 1, h * h, mem), f32(1, 1, h * h, mem)
    n_keys = 2 * n_slots * h * h + n_ptr * k_ptr
    memory, memory_pos = f32(1, n_keys, mem), f32(1, n_keys, mem)
    key_mask = jnp.ones((1, n_keys), bool)
    score = jnp.ones((1, 1), jnp.float32)

    jx = {
        "encode x2": jit(lambda m, x: m.forward_image(x)),
        "source memory": jit(lambda m, f, k: m.encode_new_memory(f, k * 20.0 - 10.0, None)),
        "view expert": jit(lambda m, f, p, a, b: m.attend_memory(f, p, a, b, jnp.ones((1, 1), bool))),
        "memory expert": jit(lambda m, f, p, a, b, v: m.memory_attention(
            curr=f.reshape(1, h * h, C), curr_pos=p.reshape(1, h * h, C), memory=a, memory_pos=b,
            num_obj_ptr_tokens=n_ptr * k_ptr, memory_mask=v)),
        "MV_MoE": jit(lambda m, a, b: m.MV_MoE(a, b)) if cfg.mv_moe else None,
        "heads": jit(lambda m, f, a, b: m.forward_sam_heads(f, high_res_features=[a, b], multimask_output=False,
                                                            add_dense_prompt=False)),
        "target memory": jit(lambda m, f, k, s: m.encode_new_memory(f, k, s)),
    }
    jargs = {
        "encode x2": (imgs2,), "source memory": (feat, mask), "view expert": (feat, pos, src_mem1, src_pos1),
        "memory expert": (feat, pos, memory, memory_pos, key_mask), "MV_MoE": (feat, feat),
        "heads": (feat, fpn0, fpn1), "target memory": (feat, hi_logits, score),
    }

    # torch: the same stages through sam2==1.1.0 modules
    tt = {}
    if not args.skip_torch:
        try:
            import torch
            from tests.reference import reference_model, to_nchw
        except ImportError as e:  # noqa: F841
            print(f"torch reference unavailable ({e}); JAX only")
        else:
            torch.set_num_threads(os.cpu_count())
            ref = reference_model("base_plus" if "b+" in args.model else "tiny", S)
            T = lambda x: torch.from_numpy(np.array(x))
            nchw = lambda x: to_nchw(np.asarray(x))
            seq = lambda x: T(x).reshape(1, -1, x.shape[-1]).transpose(0, 1).contiguous()  # [N, 1, C]
            t_img = nchw(imgs2)
            t_feat, t_pos, t_fpn0, t_fpn1 = nchw(feat), seq(pos), nchw(fpn0), nchw(fpn1)
            t_mask, t_hi = nchw(mask * 20.0 - 10.0), nchw(hi_logits)
            t_src = seq(src_mem1.reshape(1, h * h, mem)), seq(src_pos1.reshape(1, h * h, mem))
            t_mem, t_mem_pos = seq(memory), seq(memory_pos)
            t_curr = seq(feat.reshape(1, h * h, C))

            def tfn(f):
                def run():
                    with torch.inference_mode():
                        f()
                return run

            def t_encode():
                out = ref.image_encoder(t_img)
                ref.sam_mask_decoder.conv_s0(out["backbone_fpn"][0])
                ref.sam_mask_decoder.conv_s1(out["backbone_fpn"][1])

            tt = {
                "encode x2": tfn(t_encode),
                "source memory": tfn(lambda: ref.memory_encoder(t_feat, t_mask, skip_mask_sigmoid=True)),
                "view expert": tfn(lambda: ref.memory_attention(curr=t_curr, curr_pos=t_pos, memory=t_src[0],
                                                                memory_pos=t_src[1])),
                "memory expert": tfn(lambda: ref.memory_attention(curr=t_curr, curr_pos=t_pos, memory=t_mem,
                                                                  memory_pos=t_mem_pos,
                                                                  num_obj_ptr_tokens=n_ptr * k_ptr)),
                "heads": tfn(lambda: ref._forward_sam_heads(t_feat, high_res_features=[t_fpn0, t_fpn1],
                                                           multimask_output=False)),
                "target memory": tfn(lambda: ref.memory_encoder(t_feat, torch.sigmoid(t_hi) * 20.0 - 10.0,
                                                                skip_mask_sigmoid=True)),
            }

    rows = []
    for name, fn in jx.items():
        if fn is None:
            continue
        fns = {"jax": lambda fn=fn, a=jargs[name]: fn(*a)}
        if name in tt:
            fns["torch"] = tt[name]
        ms = _median_ms(fns, args.repeats)
        rows.append((name, ms.get("torch", float("nan")), ms["jax"]))
        print(f"  {name}: torch {rows[-1][1]:.1f} ms, jax {rows[-1][2]:.1f} ms", flush=True)

    # the whole tracker part of a frame, as a video runs it (memory full after the warm-up chunk)
    runner = ChunkRunner(model)
    K = args.chunk
    enc = runner.encode(imgs2)  # per-frame (fpn0, fpn1, fpn2, pos) of the source and the target image
    tgt_frames, src_frames = [enc[1]] * K, [enc[0][2]] * K
    B = args.batch
    src_masks = jnp.broadcast_to(mask[..., 0], (K, B) + mask.shape[1:-1])
    processed = jnp.ones((K, B), bool)

    state = runner.init_state(B)
    times = []
    for c in range(args.repeats + 1):
        ts = jnp.broadcast_to(jnp.arange(c * K, (c + 1) * K, dtype=jnp.int32)[:, None], (K, B))
        t0 = time.perf_counter()
        state, *out = runner.track(state, tgt_frames, src_frames, src_masks, processed, ts,
                                   jnp.full((B,), 1 << 20, jnp.int32))
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3 / K)
    rows.append((f"track step (per frame, {B} object{'s' * (B > 1)})", float("nan"), float(np.median(times[1:]))))
    print(f"  track step: jax {rows[-1][2]:.1f} ms/frame, B={B} (first chunk {times[0]:.0f} ms/frame, compile)")

    # host stages of a frame
    tf = Transforms(S)
    frame = (rng.random((S * 2, S * 2, 3)) * 255).astype(np.uint8)
    low = np.asarray(f32(1, 4 * h, 4 * h))
    host = {
        "host: 2 images in": lambda: (tf.image(frame), tf.image(frame)),
        "host: mask out + RLE": lambda: rle_encode(np.asarray(tf.masks(low, (S * 2, S * 2)))[0]),
    }
    for name, fn in host.items():
        rows.append((name, float("nan"), _median_ms({"x": fn}, args.repeats)["x"]))

    print(f"\n{args.model} at {S}, B=1, float32 CPU ({os.cpu_count()} cores), median ms")
    print("| stage | torch ms | jax ms | jax/torch |\n|---|---|---|---|")
    for name, t_ms, j_ms in rows:
        ratio = j_ms / t_ms if t_ms == t_ms else float("nan")
        print(f"| {name} | {t_ms:.1f} | {j_ms:.1f} | {ratio:.2f} |")
    stages = sum(j for n, _, j in rows if not n.startswith(("track", "host", "encode")))
    print(f"sum of the tracker stages (jax): {stages:.1f} ms; track step - stages: {rows[-3][2] - stages:.1f} ms "
          "(memory read/write and glue, less what fusing the stages in one scan saves)")


if __name__ == "__main__":
    main()
