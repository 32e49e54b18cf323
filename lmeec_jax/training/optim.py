"""The LM-EEC optimiser (SAM 2 trainer + finetune yaml) as an optax transformation.

What the reference does (``training/optimizer.py``, ``training/trainer.py``,
``sam2.1_hiera_b+_EgoExo_finetune.yaml``):

* ``torch.optim.AdamW`` (betas 0.9/0.999, eps 1e-8): ``p -= lr * (adam_step + wd * p)``;
* lr: fvcore ``CosineParamScheduler`` ``end + 0.5 (start - end)(1 + cos(pi * where))`` with
  ``where = step / total_steps`` (set before the optimiser step of each iteration, step 0 -> start);
  start/end 5e-6/5e-7, and 3e-6/3e-7 for parameters matching ``image_encoder.*``;
* layer-wise lr decay (``layer_decay_param_modifier``, ``apply_to='image_encoder.trunk'``,
  value 0.9, override ``*pos_embed*`` -> 1.0): with ``L = len(trunk.blocks) + 1`` the scale is
  ``0.9 ** (L - layer_id)``, ``layer_id`` from ``Hiera.get_layer_id``: ``rel_pos`` -> L,
  ``pos_embed`` -> 0, ``patch_embed`` -> 0, ``blocks.i`` -> i + 1, anything else -> L; parameters
  outside the trunk get scale 1. The override wins for ``*pos_embed*`` (so ``pos_embed`` and
  ``pos_embed_window`` train at the full vision lr). It scales the lr, hence also the decoupled
  weight decay, exactly like torch;
* weight decay 0.1, and 0.0 for names matching ``*bias*`` and for the parameters of
  ``torch.nn.LayerNorm`` modules. SAM 2's own ``LayerNorm2d`` (mask-decoder upscaling, prompt
  encoder mask downscaling, memory-encoder mask downsampler and CXBlock ``norm``) is *not* a
  ``torch.nn.LayerNorm``: its weight is decayed (its bias is not, by the name pattern);
* gradient clipping: ``torch.nn.utils.clip_grad_norm_`` over *all* model parameters together
  (one global L2 norm, not per module), max_norm 0.1: ``g *= min(1, 0.1 / (norm + 1e-6))``;
* AMP GradScaler: a step whose gradients are not finite is skipped (no parameter or Adam
  update); the lr schedule still advances (it follows the iteration count).

Parameter names are the torch state-dict names. They are derived from pytree paths: an NNX
path ``a.b.kernel`` / ``a.b.scale`` / ``a.b.embedding`` names torch ``a.b.weight``; other leaves
keep their name. So the functions here accept an ``nnx.State`` (with ``Variable`` or raw array
leaves), a nested dict, or a flat ``{dotted name: array}`` dict, with NNX or torch leaf names.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "OptimConfig",
    "ParamRule",
    "param_name",
    "param_names",
    "trunk_layer_id",
    "param_rules",
    "cosine_schedule",
    "clip_by_global_norm_torch",
    "make_optimizer",
]

# torch.nn.LayerNorm modules of SAM 2.1 (+ LM-EEC, which adds none). LayerNorm2d is absent on purpose.
SAM2_LAYERNORM_PATTERNS = (
    "image_encoder.trunk.blocks.*.norm1.*",
    "image_encoder.trunk.blocks.*.norm2.*",
    "memory_attention.norm.*",
    "memory_attention.layers.*.norm1.*",
    "memory_attention.layers.*.norm2.*",
    "memory_attention.layers.*.norm3.*",
    "sam_mask_decoder.transformer.norm_final_attn.*",
    "sam_mask_decoder.transformer.layers.*.norm1.*",
    "sam_mask_decoder.transformer.layers.*.norm2.*",
    "sam_mask_decoder.transformer.layers.*.norm3.*",
    "sam_mask_decoder.transformer.layers.*.norm4.*",
)


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float = 5.0e-6
    base_lr_end: Optional[float] = None  # default base_lr / 10
    vision_lr: float = 3.0e-6
    vision_lr_end: Optional[float] = None  # default vision_lr / 10
    vision_patterns: tuple = ("image_encoder.*",)
    weight_decay: float = 0.1
    no_decay_patterns: tuple = ("*bias*",)
    layernorm_patterns: tuple = SAM2_LAYERNORM_PATTERNS  # torch.nn.LayerNorm params: no decay
    layer_decay: Optional[float] = 0.9  # None: no layer-wise decay
    layer_decay_min: Optional[float] = None
    layer_decay_apply_to: str = "image_encoder.trunk"
    layer_decay_overrides: tuple = (("*pos_embed*", 1.0),)
    num_trunk_layers: Optional[int] = None  # default: counted from the `blocks.<i>` names
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_max_norm: Optional[float] = 0.1
    skip_nonfinite: bool = True
    # parameters that get no gradient at all in the reference graph (torch grad None: AdamW leaves
    # them untouched, no weight decay either); their updates are set to zero here
    frozen_patterns: tuple = ()
    # every pattern above must match at least one parameter (the reference asserts this)
    strict_patterns: bool = True

    @property
    def base_end(self) -> float:
        return self.base_lr / 10 if self.base_lr_end is None else self.base_lr_end

    @property
    def vision_end(self) -> float:
        return self.vision_lr / 10 if self.vision_lr_end is None else self.vision_lr_end


@dataclass(frozen=True)
class ParamRule:
    """The optimiser's view of one parameter.

    Effective lr at step s: ``layer_scale * group_schedule(s)``, i.e. cosine from ``lr_start`` to
    ``lr_end`` (both include ``layer_scale``). ``lr_multiplier``: effective lr / base lr.
    """

    name: str
    lr_group: str  # "base" | "vision" | "frozen"
    layer_scale: float
    weight_decay: float
    lr_start: float
    lr_end: float
    lr_multiplier: float


# ----------------------------------------------------------------------------- names

_RENAME_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def _key_str(k) -> Optional[str]:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def param_name(path) -> str:
    """Torch state-dict name of a pytree path (tuple of jax key entries or of strings)."""
    parts = [p if isinstance(p, str) else _key_str(p) for p in path]
    # a Variable flattens to its `.value`: drop that trailing attribute
    if len(parts) > 1 and parts[-1] in ("value", "raw_value"):
        parts = parts[:-1]
    name = ".".join(parts)
    head, _, last = name.rpartition(".")
    last = _RENAME_TO_TORCH.get(last, last)
    return f"{head}.{last}" if head else last


def param_names(params) -> list[str]:
    """Torch names of every leaf of ``params``, in pytree leaf order."""
    return [param_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


# ----------------------------------------------------------------------------- rules


def trunk_layer_id(name: str, num_blocks: int) -> int:
    """``Hiera.get_layer_id`` (BEiT style) on a full parameter name."""
    if name.find("rel_pos") != -1:
        return num_blocks + 1
    if name.find("pos_embed") != -1:
        return 0
    if name.find("patch_embed") != -1:
        return 0
    if name.find("blocks") != -1:
        return int(name.split("blocks")[1].split(".")[1]) + 1
    return num_blocks + 1


def _count_blocks(names, apply_to: str) -> int:
    idx = set()
    for n in names:
        if n.startswith(apply_to) and "blocks" in n:
            try:
                idx.add(int(n.split("blocks")[1].split(".")[1]))
            except (IndexError, ValueError):
                pass
    return len(idx)


def _match(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(names, patterns, what: str):
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ValueError(f"{what} pattern {p!r} does not match any parameter")


def param_rules(params, cfg: OptimConfig = OptimConfig()) -> dict[str, ParamRule]:
    """For every parameter (by torch name): lr group, layer scale, weight decay, lr range.

    ``params``: an ``nnx.State`` / nested dict / flat ``{name: array}`` dict, or a list of names.
    """
    if isinstance(params, (list, tuple)):
        names = [param_name((n,)) for n in params]
    else:
        names = param_names(params)
    if len(set(names)) != len(names):
        raise ValueError("duplicate parameter names")
    if cfg.strict_patterns:
        _check_patterns(names, cfg.vision_patterns, "vision lr")
        _check_patterns(names, cfg.no_decay_patterns, "no weight decay")
        _check_patterns(names, cfg.layernorm_patterns, "LayerNorm")
        _check_patterns(names, cfg.frozen_patterns, "frozen")
        if cfg.layer_decay is not None:
            _check_patterns(names, [cfg.layer_decay_apply_to + "*"], "layer decay apply_to")

    num_blocks = cfg.num_trunk_layers
    if num_blocks is None:
        num_blocks = _count_blocks(names, cfg.layer_decay_apply_to)
    num_layers = num_blocks + 1
    decays = None
    if cfg.layer_decay is not None:
        decays = [cfg.layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
        if cfg.layer_decay_min is not None:
            decays = [max(v, cfg.layer_decay_min) for v in decays]

    rules = {}
    for n in names:
        if _match(n, cfg.frozen_patterns):
            rules[n] = ParamRule(n, "frozen", 0.0, 0.0, 0.0, 0.0, 0.0)
            continue
        vision = _match(n, cfg.vision_patterns)
        start, end = (cfg.vision_lr, cfg.vision_end) if vision else (cfg.base_lr, cfg.base_end)
        scale = 1.0
        if decays is not None:
            scale = decays[num_layers]
            if n.startswith(cfg.layer_decay_apply_to):
                scale = decays[trunk_layer_id(n, num_blocks)]
                for pat, val in cfg.layer_decay_overrides:
                    if fnmatch.fnmatchcase(n, pat):
                        scale = float(val)
                        break
        no_decay = _match(n, cfg.no_decay_patterns) or _match(n, cfg.layernorm_patterns)
        wd = 0.0 if no_decay else cfg.weight_decay
        rules[n] = ParamRule(
            n, "vision" if vision else "base", scale, wd, start * scale, end * scale,
            start * scale / cfg.base_lr,
        )
    return rules


# ----------------------------------------------------------------------------- pieces


def cosine_schedule(start: float, end: float, total_steps: int) -> Callable:
    """fvcore CosineParamScheduler at ``where = step / total_steps``."""
    total = float(max(int(total_steps), 1))

    def schedule(count):
        where = jnp.asarray(count, jnp.float32) / total
        return end + 0.5 * (start - end) * (1.0 + jnp.cos(math.pi * where))

    return schedule


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_`` (L2, all leaves together): ``g * min(1, max/(norm+1e-6))``."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
        updates = jax.tree_util.tree_map(lambda g: (g * coef).astype(g.dtype), updates)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


class _CountState(NamedTuple):
    count: jax.Array


def _per_leaf(tree, fn_by_name):
    """``tree_map_with_path`` with the torch name of each leaf."""
    return jax.tree_util.tree_map_with_path(lambda path, x: fn_by_name(param_name(path), x), tree)


def _lookup(table: Mapping[str, Any], name: str):
    if name not in table:
        raise KeyError(f"parameter {name!r} was not known when the optimizer was built")
    return table[name]


def _zero_frozen(frozen: set) -> optax.GradientTransformation:
    def update_fn(updates, state, params=None):
        del params
        return _per_leaf(updates, lambda n, u: jnp.zeros_like(u) if n in frozen else u), state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update_fn)


def _add_decayed_weights(wd: Mapping[str, float]) -> optax.GradientTransformation:
    """``u + wd[name] * p`` per leaf (decoupled AdamW decay, before the lr scaling)."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the parameters")
        out = jax.tree_util.tree_map_with_path(
            lambda path, u, p: u + _lookup(wd, param_name(path)) * p if _lookup(wd, param_name(path)) else u,
            updates, params,
        )
        return out, state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update_fn)


def _scale_by_lr(rules: Mapping[str, ParamRule], schedules: Mapping[str, Callable]) -> optax.GradientTransformation:
    """``u *= -layer_scale[name] * schedule[group](count)``; the count advances on every call."""

    def init_fn(params):
        del params
        return _CountState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        lrs = {g: f(state.count) for g, f in schedules.items()}

        def one(n, u):
            r = _lookup(rules, n)
            if r.lr_group == "frozen":
                return jnp.zeros_like(u)
            return (-(lrs[r.lr_group] * r.layer_scale) * u).astype(u.dtype)

        return _per_leaf(updates, one), _CountState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- optimiser


def make_optimizer(params_state, cfg: OptimConfig = OptimConfig(), total_steps: int = 1) -> optax.GradientTransformation:
    """AdamW + cosine lr per group + layer decay + torch-style clipping, as one transformation.

    ``params_state``: the parameters (``nnx.State``, nested or flat dict) — used to derive the
    per-parameter rules; the returned transformation works on any pytree with the same names
    (e.g. the pure ``nnx.State`` that ``nnx.Optimizer`` hands to optax).
    ``total_steps``: number of optimiser steps of the whole run (schedule ``where`` denominator).

    Chain: [zero frozen grads] -> clip (global L2, torch) -> Adam moments -> + wd * p, all inside
    ``apply_if_finite`` when ``cfg.skip_nonfinite``; then ``* -lr`` with the per-leaf layer scale,
    whose step count advances even on skipped steps (as the reference's scheduler does).
    """
    rules = param_rules(params_state, cfg)
    frozen = {n for n, r in rules.items() if r.lr_group == "frozen"}
    wd = {n: r.weight_decay for n, r in rules.items()}
    schedules = {
        "base": cosine_schedule(cfg.base_lr, cfg.base_end, total_steps),
        "vision": cosine_schedule(cfg.vision_lr, cfg.vision_end, total_steps),
    }
    inner = [_zero_frozen(frozen)] if frozen else []
    if cfg.clip_max_norm is not None:
        inner.append(clip_by_global_norm_torch(cfg.clip_max_norm))
    inner.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    inner.append(_add_decayed_weights(wd))
    inner_tx = optax.chain(*inner)
    if cfg.skip_nonfinite:
        inner_tx = optax.apply_if_finite(inner_tx, max_consecutive_errors=2**31 - 1)
    return optax.chain(inner_tx, _scale_by_lr(rules, schedules))
