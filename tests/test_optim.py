"""The LM-EEC optimiser (lmeec_jax.training.optim): per-parameter lr / weight decay, cosine schedule,
torch-style clipping, one-step updates, nnx.Optimizer use, and (when torch + hydra + the sam2
package's ``training`` are importable) parity with the reference ``construct_optimizer`` +
``layer_decay_param_modifier`` + ``GradientClipper`` + ``torch.optim.AdamW``."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lmeec_jax.training import optim as O

NB = 24  # Hiera b+ blocks: stages (2, 3, 16, 3)
L = NB + 1


def fake_params():
    """A few parameters per module, NNX leaf names (kernel/scale), the real paths."""
    names = [
        "image_encoder.trunk.pos_embed",
        "image_encoder.trunk.pos_embed_window",
        "image_encoder.trunk.patch_embed.proj.kernel",
        "image_encoder.trunk.patch_embed.proj.bias",
    ]
    for i in range(NB):
        names += [
            f"image_encoder.trunk.blocks.{i}.norm1.scale",
            f"image_encoder.trunk.blocks.{i}.norm1.bias",
            f"image_encoder.trunk.blocks.{i}.attn.qkv.kernel",
            f"image_encoder.trunk.blocks.{i}.attn.qkv.bias",
            f"image_encoder.trunk.blocks.{i}.norm2.scale",
        ]
    names += [
        "image_encoder.neck.convs.0.conv.kernel",
        "image_encoder.neck.convs.0.conv.bias",
        "memory_attention.norm.scale",
        "memory_attention.norm.bias",
        "memory_attention.layers.0.norm1.scale",
        "memory_attention.layers.0.norm2.scale",
        "memory_attention.layers.0.norm3.scale",
        "memory_attention.layers.0.self_attn.q_proj.kernel",
        "memory_encoder.fuser.layers.0.gamma",
        "memory_encoder.fuser.layers.0.norm.weight",  # LayerNorm2d (custom module, torch layout)
        "memory_encoder.fuser.layers.0.norm.bias",
        "sam_mask_decoder.transformer.norm_final_attn.scale",
        "sam_mask_decoder.transformer.layers.0.norm1.scale",
        "sam_mask_decoder.transformer.layers.0.norm2.scale",
        "sam_mask_decoder.transformer.layers.0.norm3.scale",
        "sam_mask_decoder.transformer.layers.0.norm4.scale",
        "sam_mask_decoder.transformer.layers.0.mlp.layers.0.kernel",
        "sam_mask_decoder.output_upscaling.1.scale",  # LayerNorm2d ported as nnx.LayerNorm
        "sam_mask_decoder.iou_token.embedding",
        "maskmem_tpos_enc",
        "MV_MoE.mlp1.0.kernel",
        "MV_MoE.mlp1.0.bias",
        "MV_MoE.conv1.0.kernel",
    ]
    return {n: np.ones((2,), np.float32) for n in names}


def test_param_names_from_nnx_paths():
    assert O.param_name(("a", "b", "kernel")) == "a.b.weight"
    assert O.param_name(("a", "norm", "scale")) == "a.norm.weight"
    assert O.param_name(("tok", "embedding")) == "tok.weight"
    assert O.param_name(("a", "b", "bias")) == "a.b.bias"
    assert O.param_name(("pos_embed",)) == "pos_embed"
    assert O.param_name((jax.tree_util.DictKey("blocks"), jax.tree_util.DictKey(3), jax.tree_util.DictKey("kernel"),
                         jax.tree_util.GetAttrKey("value"))) == "blocks.3.weight"


def test_rules_land_on_the_right_parameters():
    rules = O.param_rules(fake_params())
    r = lambda n: rules[n]
    v0 = 3e-6
    b = 5e-6
    # layer-wise decay over the trunk: 0.9 ** (L - layer_id), blocks.i -> i + 1
    assert r("image_encoder.trunk.blocks.0.attn.qkv.weight").layer_scale == pytest.approx(0.9 ** (L - 1))
    assert r(f"image_encoder.trunk.blocks.{NB - 1}.attn.qkv.weight").layer_scale == pytest.approx(0.9)
    assert r("image_encoder.trunk.blocks.7.attn.qkv.weight").lr_start == pytest.approx(v0 * 0.9 ** (L - 8))
    assert r("image_encoder.trunk.blocks.7.attn.qkv.weight").lr_end == pytest.approx(v0 / 10 * 0.9 ** (L - 8))
    # patch_embed -> layer 0; pos_embed overridden to 1.0 (both pos embeddings)
    assert r("image_encoder.trunk.patch_embed.proj.weight").layer_scale == pytest.approx(0.9 ** L)
    assert r("image_encoder.trunk.pos_embed").layer_scale == 1.0
    assert r("image_encoder.trunk.pos_embed_window").layer_scale == 1.0
    assert r("image_encoder.trunk.pos_embed").lr_start == pytest.approx(v0)
    # rest of the image encoder: vision lr, no layer decay
    assert r("image_encoder.neck.convs.0.conv.weight").lr_start == pytest.approx(v0)
    assert r("image_encoder.neck.convs.0.conv.weight").lr_group == "vision"
    # everything else: base lr
    for n in ("sam_mask_decoder.transformer.layers.0.mlp.layers.0.weight", "MV_MoE.mlp1.0.weight", "maskmem_tpos_enc"):
        assert r(n).lr_group == "base" and r(n).lr_start == pytest.approx(b) and r(n).lr_end == pytest.approx(b / 10)
        assert r(n).lr_multiplier == pytest.approx(1.0)
    assert r("image_encoder.trunk.blocks.0.attn.qkv.weight").lr_multiplier == pytest.approx(0.6 * 0.9 ** (L - 1))

    # weight decay: 0 for biases and torch.nn.LayerNorm params, 0.1 for the rest
    zero = [
        "image_encoder.trunk.blocks.3.norm1.weight", "image_encoder.trunk.blocks.3.norm1.bias",
        "image_encoder.trunk.blocks.3.norm2.weight", "image_encoder.trunk.blocks.3.attn.qkv.bias",
        "image_encoder.trunk.patch_embed.proj.bias", "memory_attention.norm.weight",
        "memory_attention.layers.0.norm3.weight", "sam_mask_decoder.transformer.norm_final_attn.weight",
        "sam_mask_decoder.transformer.layers.0.norm4.weight", "MV_MoE.mlp1.0.bias",
        "memory_encoder.fuser.layers.0.norm.bias",
    ]
    decayed = [
        "image_encoder.trunk.blocks.3.attn.qkv.weight", "image_encoder.trunk.pos_embed",
        "image_encoder.trunk.pos_embed_window", "image_encoder.neck.convs.0.conv.weight",
        "memory_encoder.fuser.layers.0.gamma", "sam_mask_decoder.iou_token.weight", "maskmem_tpos_enc",
        "MV_MoE.conv1.0.weight",
        # SAM 2's LayerNorm2d is not a torch.nn.LayerNorm: its weight is decayed in the reference
        "memory_encoder.fuser.layers.0.norm.weight", "sam_mask_decoder.output_upscaling.1.weight",
    ]
    for n in zero:
        assert r(n).weight_decay == 0.0, n
    for n in decayed:
        assert r(n).weight_decay == 0.1, n


def test_strict_patterns_catch_naming_drift():
    p = fake_params()
    del p["memory_attention.norm.scale"], p["memory_attention.norm.bias"]
    with pytest.raises(ValueError, match="memory_attention.norm"):
        O.param_rules(p)
    O.param_rules(p, O.OptimConfig(strict_patterns=False))


def test_cosine_schedule_matches_fvcore_formula():
    f = O.cosine_schedule(5e-6, 5e-7, 100)
    assert float(f(0)) == pytest.approx(5e-6)
    assert float(f(50)) == pytest.approx(2.75e-6)
    assert float(f(25)) == pytest.approx(5e-7 + 0.5 * 4.5e-6 * (1 + math.cos(math.pi / 4)))
    assert float(f(100)) == pytest.approx(5e-7)


def test_clip_is_global_l2_with_torch_epsilon():
    tx = O.clip_by_global_norm_torch(0.1)
    g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # global norm 5
    out, _ = tx.update(g, tx.init(g))
    coef = 0.1 / (5.0 + 1e-6)
    np.testing.assert_allclose(out["a"], [3 * coef, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [[4 * coef]], rtol=1e-6)
    small = {"a": jnp.array([0.01]), "b": jnp.array([[0.02]])}
    out, _ = tx.update(small, tx.init(small))
    np.testing.assert_allclose(out["a"], [0.01])


def test_one_step_effective_lrs_and_weight_decay():
    params = {k: np.full((3,), 2.0, np.float32) for k in fake_params()}
    grads = {k: np.full((3,), 1e-3, np.float32) for k in params}  # first Adam step: m/sqrt(v) = 1
    cfg = O.OptimConfig()
    tx = O.make_optimizer(params, cfg, total_steps=100)
    upd, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    rules = O.param_rules(params, cfg)
    for n, u in upd.items():
        r = rules[O.param_name((n,))]
        adam = 1e-3 * min(1.0, 0.1 / (math.sqrt(len(params) * 3) * 1e-3 + 1e-6))  # clipped grad
        adam = adam / (adam + 1e-8)
        expect = -r.lr_start * (adam + r.weight_decay * 2.0)
        np.testing.assert_allclose(u, expect, rtol=1e-5, err_msg=n)
    # different effective lrs really happen
    first = float(upd["image_encoder.trunk.blocks.0.attn.qkv.kernel"][0])
    last = float(upd[f"image_encoder.trunk.blocks.{NB - 1}.attn.qkv.kernel"][0])
    dec = float(upd["MV_MoE.mlp1.0.kernel"][0])
    assert first / last == pytest.approx(0.9 ** (L - 1) / 0.9, rel=1e-5)
    assert last / dec == pytest.approx(0.6 * 0.9, rel=1e-5)


def test_nonfinite_step_is_skipped_but_schedule_advances():
    params = {"image_encoder.trunk.blocks.0.attn.qkv.kernel": jnp.ones((2,)), "MV_MoE.mlp1.0.kernel": jnp.ones((2,))}
    cfg = O.OptimConfig(strict_patterns=False)
    tx = O.make_optimizer(params, cfg, total_steps=4)
    st = tx.init(params)
    bad = {k: jnp.array([jnp.nan, 1.0]) for k in params}
    upd, st = tx.update(bad, st, params)
    for u in upd.values():
        np.testing.assert_array_equal(u, 0.0)
    good = {k: jnp.array([1.0, 1.0]) for k in params}
    upd, st = tx.update(good, st, params)
    # the second call uses the lr of step 1 (where = 1/4), Adam's first real step (m/sqrt(v) = 1)
    lr1 = 5e-7 + 0.5 * 4.5e-6 * (1 + math.cos(math.pi / 4))
    np.testing.assert_allclose(upd["MV_MoE.mlp1.0.kernel"], -lr1 * (1 + 0.1), rtol=1e-4)


def test_frozen_patterns_get_no_update():
    params = {"MV_MoE.mlp1.0.kernel": jnp.ones((2,)), "sam_prompt_encoder.mask_downscaling.0.kernel": jnp.ones((2,))}
    cfg = O.OptimConfig(strict_patterns=False, frozen_patterns=("sam_prompt_encoder.mask_downscaling.*",))
    tx = O.make_optimizer(params, cfg, total_steps=10)
    upd, _ = tx.update({k: jnp.ones((2,)) for k in params}, tx.init(params), params)
    np.testing.assert_array_equal(upd["sam_prompt_encoder.mask_downscaling.0.kernel"], 0.0)
    assert np.all(np.asarray(upd["MV_MoE.mlp1.0.kernel"]) < 0)


def test_works_with_nnx_optimizer():
    class Blk(nnx.Module):
        def __init__(self, rngs):
            self.norm1 = nnx.LayerNorm(2, rngs=rngs)
            self.qkv = nnx.Linear(2, 2, rngs=rngs)

    class Trunk(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Blk(rngs) for _ in range(2)])
            self.pos_embed = nnx.Param(jnp.ones((1, 2)))

    class Enc(nnx.Module):
        def __init__(self, rngs):
            self.trunk = Trunk(rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.image_encoder = Enc(rngs)
            self.head = nnx.Linear(2, 2, rngs=rngs)

    model = Model(nnx.Rngs(0))
    cfg = O.OptimConfig(strict_patterns=False)
    rules = O.param_rules(nnx.state(model, nnx.Param), cfg)
    assert rules["image_encoder.trunk.blocks.0.qkv.weight"].layer_scale == pytest.approx(0.9 ** 2)
    assert rules["image_encoder.trunk.blocks.1.norm1.weight"].weight_decay == 0.0  # matches the LN pattern
    assert rules["head.weight"].lr_group == "base"
    opt = nnx.Optimizer(model, O.make_optimizer(nnx.state(model, nnx.Param), cfg, 10), wrt=nnx.Param)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(lambda m: sum(jnp.sum(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))))(model)
        opt.update(model, grads)

    step(model, opt)
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    d0 = before["image_encoder"]["trunk"]["blocks"][0]["qkv"]["bias"] - after["image_encoder"]["trunk"]["blocks"][0]["qkv"]["bias"]
    d1 = before["image_encoder"]["trunk"]["blocks"][1]["qkv"]["bias"] - after["image_encoder"]["trunk"]["blocks"][1]["qkv"]["bias"]
    dh = before["head"]["bias"] - after["head"]["bias"]
    np.testing.assert_allclose(d0 / d1, 0.9, rtol=1e-4)
    np.testing.assert_allclose(d1 / dh, 0.6 * 0.9, rtol=1e-4)


# ----------------------------------------------------------------------------- reference parity


class CosineSched:
    """fvcore.common.param_scheduler.CosineParamScheduler (fvcore is not a dependency)."""

    def __init__(self, start_value, end_value):
        self.start_value, self.end_value = start_value, end_value

    def __call__(self, where):
        return self.end_value + 0.5 * (self.start_value - self.end_value) * (1 + math.cos(math.pi * where))


class ConstSched:
    def __init__(self, value):
        self.value = value

    def __call__(self, where):
        return self.value


def _reference_setup():
    torch = pytest.importorskip("torch")
    pytest.importorskip("hydra")
    omegaconf = pytest.importorskip("omegaconf")
    try:
        from sam2.modeling.backbones.hieradet import Hiera
        from sam2.modeling.sam2_utils import LayerNorm2d
        from training.optimizer import GradientClipper, construct_optimizer
    except Exception as e:  # pragma: no cover
        pytest.skip(f"reference training code not importable: {e}")
    nn = torch.nn

    def ns(**kw):
        m = nn.Module()
        for k, v in kw.items():
            setattr(m, k, v)
        return m

    torch.manual_seed(0)
    trunk = Hiera(embed_dim=8, num_heads=1, stages=(1, 2, 1, 1), global_att_blocks=(2,),
                  window_spec=(4, 4, 4, 4), window_pos_embed_bkg_spatial_size=(4, 4))
    model = ns(
        image_encoder=ns(trunk=trunk, neck=ns(convs=nn.ModuleList([ns(conv=nn.Conv2d(4, 4, 1))]))),
        memory_attention=ns(
            norm=nn.LayerNorm(4),
            layers=nn.ModuleList([ns(norm1=nn.LayerNorm(4), norm2=nn.LayerNorm(4), norm3=nn.LayerNorm(4),
                                     linear1=nn.Linear(4, 4))]),
        ),
        memory_encoder=ns(
            mask_downsampler=ns(encoder=nn.Sequential(nn.Conv2d(1, 4, 3), LayerNorm2d(4))),
            fuser=ns(layers=nn.ModuleList([ns(norm=LayerNorm2d(4), gamma=nn.Parameter(torch.ones(4)),
                                              dwconv=nn.Conv2d(4, 4, 3, groups=4))])),
        ),
        sam_mask_decoder=ns(
            transformer=ns(norm_final_attn=nn.LayerNorm(4),
                           layers=nn.ModuleList([ns(norm1=nn.LayerNorm(4), norm2=nn.LayerNorm(4),
                                                    norm3=nn.LayerNorm(4), norm4=nn.LayerNorm(4),
                                                    mlp=ns(lin1=nn.Linear(4, 4)))])),
            output_upscaling=nn.Sequential(nn.ConvTranspose2d(4, 4, 2), LayerNorm2d(4)),
            iou_token=nn.Embedding(1, 4),
        ),
        sam_prompt_encoder=ns(mask_downscaling=nn.Sequential(nn.Conv2d(1, 4, 2), LayerNorm2d(4))),
        MV_MoE=ns(mlp1=nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4)),
                  conv1=nn.Sequential(nn.Conv2d(8, 4, 3, bias=False))),
    )
    model.maskmem_tpos_enc = nn.Parameter(torch.zeros(7, 1, 1, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)

    here = __name__
    options = omegaconf.OmegaConf.create({
        "lr": [
            {"scheduler": {"_target_": f"{here}.CosineSched", "start_value": 5e-6, "end_value": 5e-7}},
            {"scheduler": {"_target_": f"{here}.CosineSched", "start_value": 3e-6, "end_value": 3e-7},
             "param_names": ["image_encoder.*"]},
        ],
        "weight_decay": [
            {"scheduler": {"_target_": f"{here}.ConstSched", "value": 0.1}},
            {"scheduler": {"_target_": f"{here}.ConstSched", "value": 0.0},
             "param_names": ["*bias*"], "module_cls_names": ["torch.nn.LayerNorm"]},
        ],
    })
    modifiers = [omegaconf.OmegaConf.create({
        "_target_": "training.optimizer.layer_decay_param_modifier", "_partial_": True,
        "layer_decay_value": 0.9, "apply_to": "image_encoder.trunk",
        "overrides": [{"pattern": "*pos_embed*", "value": 1.0}],
    })]
    optim = construct_optimizer(model, omegaconf.OmegaConf.create({"_target_": "torch.optim.AdamW"}),
                                options, modifiers)
    return torch, model, optim, GradientClipper(max_norm=0.1, norm_type=2)


def test_parity_with_reference_param_groups_and_steps():
    torch, model, optim, clipper = _reference_setup()
    names = {id(p): n for n, p in model.named_parameters()}
    params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    cfg = O.OptimConfig()
    rules = O.param_rules(params, cfg)
    total = 10
    assert {n for n in rules} == set(names.values())

    # per-parameter lr (at two points of the schedule) and weight decay
    for where in (0.0, 0.35):
        optim.step_schedulers(where, int(where * total))
        for g in optim.optimizer.param_groups:
            for p in g["params"]:
                r = rules[names[id(p)]]
                assert g["weight_decay"] == r.weight_decay, names[id(p)]
                expect = r.lr_end + 0.5 * (r.lr_start - r.lr_end) * (1 + math.cos(math.pi * where))
                assert g["lr"] == pytest.approx(expect, rel=1e-9), names[id(p)]

    # three optimiser steps with the same gradients
    tx = O.make_optimizer(params, cfg, total_steps=total)
    state = jax.jit(tx.init)(params)

    @jax.jit
    def update(g, s, p):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s
    rng = np.random.default_rng(0)
    for step in range(3):
        grads = {n: rng.normal(size=p.shape).astype(np.float32) * (0.02 if step != 1 else 0.001)
                 for n, p in params.items()}
        for n, p in model.named_parameters():
            p.grad = torch.tensor(grads[n])
        optim.step_schedulers(step / total, step)
        clipper(model)
        optim.optimizer.step()
        params, state = update(grads, state, params)
        for n, p in model.named_parameters():
            np.testing.assert_allclose(params[n], p.detach().numpy(), rtol=1e-5, atol=1e-9, err_msg=f"{step} {n}")
