"""Training: config parsing, the training forward, the train step (masks, data parallelism),
the input pipeline, checkpoints (resume, atomic saves) and NaN handling.

Everything runs the nano model at 64 px on short clips; compiled train steps are shared
through a persistent compilation cache in the session's temporary directory. The default
suite keeps the resume test (one train-step compilation, minutes on a loaded 2-core CPU);
the other compiling tests are marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmeec_jax.training import config as C

REPO = Path(__file__).resolve().parents[1]
S = 64  # image size of the test model
T = 4  # frames per clip


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from lmeec_jax.data.synthetic import make_synthetic_split

    root = tmp_path_factory.mktemp("synth")
    make_synthetic_split(root / "train", 2, seed=3, n_frames=10, workers=1, raw_masks=False)
    return root / "train"


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def _cfg(train_dir, jax_cache, **over) -> C.Config:
    d = {
        "name": "test",
        "model": {"name": "lmeec_hiera_nano", "seed": 0, "drop_path_rate": 0.1,
                  "overrides": {"image_size": S, "memory_attention_layers": 1, "fuser_layers": 1}},
        "data": {"train_dir": str(train_dir), "num_frames": T, "workers": 0, "threads": 1, "prefetch": 2,
                 "preresize": 128},
        "optim": {"base_lr": 1e-3, "vision_lr": 1e-3, "layer_decay": None, "clip_max_norm": 1.0},
        "train": {"batch_size": 2, "steps": 4, "log_every": 1, "ckpt_every": 2, "keep": 5, "log_data": True,
                  "async_checkpointing": False},
        "eval": {"final": False},
        "runtime": {"progress": False, "compilation_cache": jax_cache},
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in over.items()]
    return C.from_dict(C.Config, C.apply_overrides(d, overrides, C.Config))


def _tiny_model(**over):
    from lmeec_jax.models.config import get_config
    from lmeec_jax.models.sam2 import build_model

    kw = dict(image_size=S, memory_attention_layers=1, fuser_layers=1)
    kw.update(over)
    return build_model(get_config("lmeec_hiera_nano", **kw), seed=0)


def _batch(B, T_, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.standard_normal((B, T_, S, S, 3)).astype(np.float32)
    tgt = rng.standard_normal((B, T_, S, S, 3)).astype(np.float32)
    sm = np.zeros((B, T_, S, S), np.uint8)
    tm = np.zeros((B, T_, S, S), np.uint8)
    for b in range(B):
        for t in range(T_):
            y, x = rng.integers(0, S // 2, size=2)
            sm[b, t, y:y + S // 4, x:x + S // 4] = 1
            if t != 1:  # one frame without the object in the target view
                y, x = rng.integers(0, S // 2, size=2)
                tm[b, t, y:y + S // 5, x:x + S // 5] = 1
    return {"src_images": src, "tgt_images": tgt, "src_masks": sm, "tgt_masks": tm}


# ----------------------------------------------------------------------------- config


def test_config_files_load_and_overrides():
    tiny = C.load_config(None)
    assert tiny.name == "synthetic_tiny" and tiny.data.synthetic.enabled
    full = C.load_config("lmeec_hiera_b+_egoexo", ["model.init_from=/x/sam2.1_b+"])
    assert full.model.name == "lmeec_hiera_b+" and full.model.init_from == "/x/sam2.1_b+"
    assert full.optim.base_lr == 5e-6 and full.optim.vision_lr == 3e-6 and full.optim.layer_decay == 0.9
    assert full.optim.clip_max_norm == 0.1 and full.optim.weight_decay == 0.1
    assert full.train.batch_size == 8 and full.train.epochs == 60 and full.data.num_frames == 8
    assert full.model.dtype == "bfloat16" and full.model.drop_path_rate == 0.1

    cfg = C.load_config(None, ["train.steps=7", "optim.base_lr=1e-4", "model.overrides={image_size: 64}",
                               "data.augment.hflip_p=0.0", "eval.max_videos=null", "model.fresh=[MV_MoE., foo]"])
    assert cfg.train.steps == 7 and cfg.optim.base_lr == 1e-4
    assert cfg.model.overrides == {"image_size": 64} and cfg.data.augment["hflip_p"] == 0.0
    assert cfg.eval.max_videos is None and cfg.model.fresh == ("MV_MoE.", "foo")
    assert C.parse_override("a.b= [1, 2]") == (["a", "b"], [1, 2])
    for bad in (["train.nope=1"], ["nokey"], ["train.steps=abc"], ["train.log_data=3"], ["=1"]):
        with pytest.raises(C.ConfigError):
            C.load_config(None, bad)


def test_cli_rejects_bad_override(capsys):
    from train.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--set", "train.not_a_key=1"])
    assert e.value.code == 2
    assert "unknown config key train.not_a_key" in capsys.readouterr().err


def test_resolved_config_roundtrip(tmp_path):
    cfg = C.load_config(None, ["train.steps=3"])
    C.save_config(cfg, tmp_path / "c.yaml")
    assert C.load_config(tmp_path / "c.yaml") == cfg


# ----------------------------------------------------------------------------- forward


@pytest.mark.slow
def test_scan_equals_unrolled_reference_structure():
    """The fixed-slot scan (masked window / pointer slots) equals the compact-list loop.

    num_maskmem=3 (2 window slots) and 4 frames so that the window slides (frame 3 sees
    frames 1-2 in the window but the pointers of frames 0-2)."""
    from lmeec_jax.training import forward as LT

    model = _tiny_model(num_maskmem=3)
    b = model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias
    b.set_value(b.get_value() + 3.0)  # object present: masks and pointers matter
    g, p, r, rest = LT.split_model(model)
    batch = LT.ClipBatch(*(_batch(2, T)[k] for k in ("src_images", "tgt_images", "src_masks", "tgt_masks")))
    from tests.train_oracle import clip_unrolled

    outs = []
    fcfg = LT.TrainForwardConfig(deterministic=True)
    for fwd in (LT.clip_forward, clip_unrolled):
        f = jax.jit(lambda p, r, rest, b: fwd(g, p, r, rest, b, fcfg)[0])
        outs.append(f(p, r, rest, batch))
    for a, b_ in zip(*outs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=2e-5, rtol=1e-5)
    assert outs[0].high_res_logits.shape == (T, 2, 1, S, S)


def _count_matmuls(jaxpr, counts):
    import jax.extend.core as jc

    for e in jaxpr.eqns:
        if e.primitive.name in ("dot_general", "conv_general_dilated"):
            counts[tuple(str(v.aval.dtype) for v in e.invars[:2])] += 1
        for v in e.params.values():
            for x in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(x, jc.ClosedJaxpr):
                    _count_matmuls(x.jaxpr, counts)
                elif isinstance(x, jc.Jaxpr):
                    _count_matmuls(x, counts)
    return counts


def test_bfloat16_compute_float32_outputs():
    """dtype=bfloat16: (nearly) every matmul / conv of the training forward runs in bf16
    (image encoder, attention, SAM heads, memory encoder); parameters, mask logits, IoU and
    object scores stay float32. Checked on the jaxpr (no compilation)."""
    import collections

    from lmeec_jax.training import forward as LT

    model = _tiny_model()
    model.train()
    g, p, r, rest = LT.split_model(model)
    b = LT.ClipBatch(*(jnp.asarray(_batch(2, T)[k]) for k in ("src_images", "tgt_images", "src_masks", "tgt_masks")))
    jp = jax.make_jaxpr(lambda p, r: LT.clip_forward(g, p, r, rest, b, LT.TrainForwardConfig(dtype="bfloat16")))(p, r)
    counts = _count_matmuls(jp.jaxpr, collections.Counter())
    total = sum(counts.values())
    assert counts[("bfloat16", "bfloat16")] >= 0.85 * total, counts
    assert all(str(v.aval.dtype) in ("float32", "key<fry>", "uint32") for v in jp.jaxpr.outvars)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))


@pytest.mark.slow  # ~5 min of gradient compiles on 2 cores (default-suite budget); make test-all runs it
def test_rematerialisation_same_values_and_gradients_less_memory():
    """remat_blocks + remat_frames (each Hiera block and each frame under jax.checkpoint,
    the image encoder run one frame at a time) gives the same outputs and parameter
    gradients as the plain forward, needs less temporary memory in the compiled gradient,
    and in training mode (drop path / dropout on) still advances the RNG streams."""
    from lmeec_jax.training import forward as LT

    model = _tiny_model()
    g, p, r, rest = LT.split_model(model)
    batch = LT.ClipBatch(*(jnp.asarray(_batch(2, T, seed=4)[k])
                           for k in ("src_images", "tgt_images", "src_masks", "tgt_masks")))
    w = jax.random.normal(jax.random.key(0), (T, 2, 1, S, S))

    def make(fcfg):
        def loss(p, r):
            o, r2 = LT.clip_forward(g, p, r, rest, batch, fcfg)
            return jnp.sum(o.high_res_logits * w) / w.size + jnp.sum(o.ious) + jnp.sum(o.object_score_logits), (o, r2)

        return jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(p, r).compile()

    plain = make(LT.TrainForwardConfig(deterministic=True))
    remat = make(LT.TrainForwardConfig(deterministic=True, remat_blocks=True, remat_frames=True))
    temp = [f.memory_analysis().temp_size_in_bytes for f in (plain, remat)]
    print("temp bytes plain / remat:", temp)
    assert temp[1] < temp[0], temp
    (l0, (o0, _)), g0 = plain(p, r)
    (l1, (o1, _)), g1 = remat(p, r)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    for a, b_ in zip(o0, o1):
        np.testing.assert_allclose(np.asarray(b_), np.asarray(a), atol=1e-4, rtol=1e-4)
    flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    scale = max(float(jnp.max(jnp.abs(x))) for x in flat0)
    err = max(float(jnp.max(jnp.abs(a - b_))) for a, b_ in zip(flat0, flat1))
    print("max |grad| error", err, "of max |grad|", scale)
    assert err <= 1e-4 * scale, (err, scale)

    model.train()
    g, p, r, rest = LT.split_model(model)
    fcfg = LT.TrainForwardConfig(remat_blocks=True, remat_frames=True)
    o, r2 = jax.jit(lambda p, r: LT.clip_forward(g, p, r, rest, batch, fcfg))(p, r)
    assert all(np.isfinite(np.asarray(x)).all() for x in o)
    counts = lambda st: [int(x) for x in jax.tree.leaves(st) if not LT._is_key(x)]
    assert counts(r2) != counts(r)


# ----------------------------------------------------------------------------- train step


@pytest.mark.slow
def test_one_step_lr_and_weight_decay_masks():
    """Through the real jitted train step: per-parameter lr (groups, layer decay, pos_embed
    override), frozen parameters, weight decay only where it belongs."""
    import optax

    from lmeec_jax.training.losses import LossConfig
    from lmeec_jax.training import forward as LT
    from lmeec_jax.training.optim import OptimConfig, make_optimizer, param_name
    from lmeec_jax.training.trainer import make_train_step

    model = _tiny_model()
    model.train()
    g, params, rngs, rest = LT.split_model(model)
    base, vision, wd, ld = 1e-3, 4e-3, 0.5, 0.5
    ocfg = OptimConfig(base_lr=base, vision_lr=vision, weight_decay=wd, layer_decay=ld, clip_max_norm=None,
                       frozen_patterns=("obj_ptr_tpos_proj.*",))
    tx = make_optimizer(params, ocfg, total_steps=1)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rest": rest}
    before = {param_name(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    step = jax.jit(make_train_step(g, tx, LT.TrainForwardConfig(), LossConfig(), seed=0))
    new, metrics = step(state, {k: jnp.asarray(v) for k, v in _batch(2, T).items()}, rngs)
    assert np.isfinite(float(metrics["loss"]))
    after = {param_name(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(new["params"])}
    n_blocks = len(model.image_encoder.trunk.blocks)

    def adam_ratio(name, lr, decayed=True):
        # first Adam step: update = lr * (g/(|g|+eps) + wd*p), |g/(|g|+eps)| = 1 where g != 0
        d = -(after[name] - before[name]) / lr - (wd * before[name] if decayed else 0.0)
        return float(np.median(np.abs(d)))

    L = n_blocks + 1
    # trunk block i has layer id i+1 -> lr * ld ** (L - i - 1)
    for i in (0, n_blocks - 1):
        assert adam_ratio(f"image_encoder.trunk.blocks.{i}.mlp.layers.0.weight", vision * ld ** (L - i - 1)) == \
            pytest.approx(1.0, abs=0.02)
    assert adam_ratio("image_encoder.trunk.patch_embed.proj.weight", vision * ld ** L) == pytest.approx(1.0, abs=0.02)
    assert adam_ratio("image_encoder.trunk.pos_embed", vision) == pytest.approx(1.0, abs=0.02)  # override 1.0
    assert adam_ratio("image_encoder.neck.convs.0.conv.weight", vision) == pytest.approx(1.0, abs=0.02)
    assert adam_ratio("sam_mask_decoder.iou_prediction_head.layers.0.weight", base) == pytest.approx(1.0, abs=0.02)
    # biases and torch LayerNorm parameters: no weight decay
    assert adam_ratio("sam_mask_decoder.iou_prediction_head.layers.0.bias", base, decayed=False) == \
        pytest.approx(1.0, abs=0.02)
    # frozen: untouched
    for n in ("obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias"):
        np.testing.assert_array_equal(after[n], before[n])
    # no gradient in LM-EEC training (dense mask prompt unused): only weight decay moves a weight
    w = "sam_prompt_encoder.mask_downscaling.0.weight"
    np.testing.assert_allclose(after[w], before[w] * (1 - base * wd), rtol=1e-6)
    np.testing.assert_array_equal(after["sam_prompt_encoder.mask_downscaling.0.bias"],
                                  before["sam_prompt_encoder.mask_downscaling.0.bias"])


@pytest.mark.slow
def test_data_parallel_step_equals_single_device(tmp_path):
    """One train step on a 2-device mesh (forced host devices) equals the 1-device step."""
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from lmeec_jax.training.losses import LossConfig
        from lmeec_jax.training import forward as LT
        from lmeec_jax.training.optim import OptimConfig, make_optimizer
        from lmeec_jax.training.trainer import make_train_step, make_mesh, BATCH_KEYS
        from tests.test_train import _tiny_model, _batch
        assert jax.device_count() == 2
        model = _tiny_model(); model.train()
        g, params, rngs, rest = LT.split_model(model)
        tx = make_optimizer(params, OptimConfig(base_lr=1e-3, vision_lr=1e-3, layer_decay=0.9), total_steps=10)
        batch = _batch(2, {T}, seed=1)
        host = jax.device_get({{"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                               "rest": rest}})  # donation must not delete the shared inputs
        res = []
        for n in (1, 2):
            mesh = make_mesh(n)
            rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
            state = host
            ss = jax.tree.map(lambda _: rep, state)
            f = jax.jit(make_train_step(g, tx, LT.TrainForwardConfig(), LossConfig(), seed=0), donate_argnums=(0,),
                        in_shardings=(ss, {{k: dat for k in BATCH_KEYS}}, None), out_shardings=(ss, rep))
            st = jax.device_put(state, ss)
            b = {{k: jax.device_put(v, dat) for k, v in batch.items()}}
            for _ in range(2):
                st, m = f(st, b, rngs)
            assert len(b["src_images"].sharding.device_set) == n
            res.append((jax.device_get(st["params"]), {{k: float(v) for k, v in m.items()}}))
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), res[0][0], res[1][0]))
        print(json.dumps({{"max_param_diff": max(diffs), "m1": res[0][1], "m2": res[1][1]}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=1500)
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["max_param_diff"] < 1e-5, res
    for k in ("loss", "loss_mask", "loss_dice", "grad_norm"):
        assert res["m1"][k] == pytest.approx(res["m2"][k], rel=1e-4, abs=1e-6), k


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_deterministic_sharded_and_resumable(synth_dir):
    from lmeec_jax.data.egoexo import list_train_videos
    from lmeec_jax.data.pipeline import ClipSampler, ClipSpec, make_iterator, make_train_dataset
    from lmeec_jax.data.transforms import AugmentConfig

    recs = list_train_videos(synth_dir, T)
    assert len(recs) >= 4
    spec = ClipSpec(T, AugmentConfig(size=S), preresize=128)
    kw = dict(num_steps=3, global_batch=4, seed=5, multiplier=2)
    ds = make_train_dataset(synth_dir, recs, spec, **kw)
    it = make_iterator(ds, threads=1)
    b0 = next(it)
    state = it.get_state()
    b1 = next(it)
    assert b0["src_images"].shape == (4, T, S, S, 3) and b0["tgt_masks"].shape == (4, T, S, S)
    assert b0["src_masks"].dtype == np.uint8 and list(b0["index"]) == [0, 1, 2, 3]
    it2 = make_iterator(make_train_dataset(synth_dir, recs, spec, **kw), threads=1)
    it2.set_state(state)
    b1b = next(it2)
    for k in b1:
        np.testing.assert_array_equal(b1[k], b1b[k])
    # two hosts read disjoint halves of the same global batches
    halves = [next(iter(make_iterator(make_train_dataset(synth_dir, recs, spec, process_index=h, process_count=2,
                                                         **kw), threads=1))) for h in (0, 1)]
    for k in b0:
        np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), b0[k])
    # an epoch visits every video `multiplier` times
    sampler = ClipSampler(synth_dir, recs, spec, seed=5, multiplier=2, global_batch=4, host_batch=4)
    n = sampler.spe * 4
    counts = np.bincount([sampler.video_of(j) for j in range(n)], minlength=len(recs))
    assert counts.max() <= 2 and counts.sum() == n
    # the first source mask of every sampled clip is non-empty (before augmentation)
    from lmeec_jax.data.pipeline import _mask_nonempty

    for j in range(8):
        rng = np.random.default_rng([5, j])
        v = sampler.video_of(j)
        s = sampler._sample_start(recs[v], rng)
        ann = sampler._annotation(recs[v].take)["masks"][recs[v].obj][recs[v].src_cam]
        assert s is not None and _mask_nonempty(ann[recs[v].frames[s]])


# ----------------------------------------------------------------------------- checkpoints


def test_unfinished_checkpoint_is_ignored(tmp_path):
    from lmeec_jax.training.checkpointing import Checkpointer, abstract_like

    state = {"step": jnp.int32(1), "w": jnp.arange(6.0).reshape(2, 3)}
    ck = Checkpointer(tmp_path / "ck", keep=3, async_save=True)
    ck.save(1, state)
    ck.wait()
    # a save killed before orbax's atomic rename leaves a temporary directory behind
    tmp = tmp_path / "ck" / "2.orbax-checkpoint-tmp-1234567890"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "garbage").write_text("partial")
    ck2 = Checkpointer(tmp_path / "ck", keep=3)
    assert ck2.latest_step() == 1 and ck2.all_steps() == [1]
    out = ck2.restore(1, abstract_like(state))
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(state["w"]))
    ck.close()
    ck2.close()


def _params(trainer):
    return jax.device_get(trainer.state["params"])


def _data_log(workdir):
    return [r["data"] for r in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())
            if "data" in r]


@pytest.mark.slow  # ~5 min of training-step compiles on 2 cores (suite budget); run with -m slow
def test_resume_equals_straight_run(synth_dir, jax_cache, tmp_path):
    """4 steps straight == 2 steps, a new Trainer resuming from the checkpoint, 2 more steps:
    same parameters and same data order."""
    from lmeec_jax.training.trainer import Trainer

    cfg = _cfg(synth_dir, jax_cache)
    a = Trainer(cfg, tmp_path / "a")
    a.train()
    pa = _params(a)
    a.close()

    b = Trainer(cfg, tmp_path / "b")
    b.train(until=2)
    b.close()
    assert b.ckpt.all_steps() == [2]
    b2 = Trainer(cfg, tmp_path / "b", resume="required")
    assert b2.resumed_from == 2 and b2.step == 2
    b2.train()
    pb = _params(b2)
    b2.close()

    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), pa, pb))
    assert max(diffs) < 1e-6
    assert _data_log(tmp_path / "a") == _data_log(tmp_path / "b")
    assert len(_data_log(tmp_path / "a")) == 4
    assert (tmp_path / "a" / "config.yaml").is_file()
    rec = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "clips_per_s", "grad_norm"} <= set(rec[-1])


@pytest.mark.slow
def test_nonfinite_loss_stops_keeping_last_good_checkpoint(synth_dir, jax_cache, tmp_path):
    from lmeec_jax.training.trainer import NonFiniteLoss, Trainer

    cfg = _cfg(synth_dir, jax_cache, **{"train.debug_nan_step": 2, "train.ckpt_every": 1})
    tr = Trainer(cfg, tmp_path / "w")
    with pytest.raises(NonFiniteLoss, match="last good checkpoint: step 2"):
        tr.train()
    tr.close()
    assert tr.ckpt.latest_step() == 2
    recs = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert "error" in recs[-1] and recs[-1]["step"] == 3
    # the kept checkpoint restores
    tr2 = Trainer(_cfg(synth_dir, jax_cache), tmp_path / "w", resume="required")
    assert tr2.step == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(tr2)))
    tr2.close()
