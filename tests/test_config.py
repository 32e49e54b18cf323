"""Training config (lmeec_jax/training/config.py, OmegaConf structured configs): overrides, type
errors and unknown keys (one-line ConfigError), named configs or paths, ``--dry-run``, the
``config.yaml`` round trip, and the named configs found by a non-editable install."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmeec_jax.data.synthetic import SynthConfig
from lmeec_jax.training import config as C

REPO = Path(__file__).resolve().parents[1]
NAMES = ["lmeec_hiera_b+_egoexo", "synthetic_tiny"]


def _env() -> dict:
    """A subprocess environment that cannot reach the repo through PYTHONPATH."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


# ----------------------------------------------------------------------------- values and overrides


def test_typed_fields_and_overrides():
    cfg = C.load_config(None)
    assert cfg.name == "synthetic_tiny" and cfg.model.overrides == {"memory_attention_layers": 2, "fuser_layers": 1}
    sc = cfg.data.synthetic
    assert sc.exo_distance == (1.1, 1.5) and sc.patterns == ("solid",) and sc.object_scale == 1.75
    assert cfg.model.fresh == ("MV_MoE.",) and cfg.optim.layer_decay_overrides == (("*pos_embed*", 1.0),)
    hash((cfg.optim, cfg.loss, sc))  # tuple fields are tuples again (dict-free sections stay hashable)

    cfg = C.load_config("synthetic_tiny", [
        "model.overrides.image_size=64",  # one key of a dict field: the file's keys stay
        "data.synthetic.exo_distance=[1, 2]", "optim.base_lr=1e-4", "optim.layer_decay=0.8",
        "train.steps=null", "train={batch_size: 3}",  # a section value merges into the section
        "optim.layer_decay_overrides=[[a*, 2.0]]", "model.init_from=", "runtime.compilation_cache='123'",
    ])
    assert cfg.model.overrides == {"memory_attention_layers": 2, "fuser_layers": 1, "image_size": 64}
    assert cfg.data.synthetic.exo_distance == (1.0, 2.0) and type(cfg.data.synthetic.exo_distance[0]) is float
    assert cfg.optim.base_lr == 1e-4 and cfg.optim.layer_decay == 0.8
    assert cfg.optim.layer_decay_overrides == (("a*", 2.0),)
    assert cfg.train.steps is None and cfg.train.batch_size == 3 and cfg.train.keep == 2
    assert cfg.model.init_from == "" and cfg.runtime.compilation_cache == "123"
    # a mapping value replaces a dict field
    assert C.load_config(None, ["model.overrides={trunk: {drop_path_rate: 0.2}}"]).model.overrides == {
        "trunk": {"drop_path_rate": 0.2}}


def test_synthetic_section_defaults_are_the_generator_defaults():
    sc, d = C.SyntheticSection(), SynthConfig()
    for k in ("n_frames", "object_scale", "exo_distance", "p_lookalike", "p_small", "patterns", "distinct_colours"):
        assert getattr(sc, k) == getattr(d, k), k


@pytest.mark.parametrize("override, key", [
    ("train.nope=1", "train.nope"),
    ("data.synthetic.zzz=1", "data.synthetic.zzz"),
    ("nope.x=1", "nope"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("train.log_data=3", "train.log_data"),
    ("model.name=3", "model.name"),
    ("train.epochs=null", "train.epochs"),
    ("model.fresh=5", "model.fresh"),
    ("model.overrides=3", "model.overrides"),
    ("train=3", "train"),
    ("data.synthetic.exo_distance=[1, x]", "data.synthetic.exo_distance"),
    ("nokey", "nokey"),
    ("train.steps=[1", "train.steps"),
])
def test_bad_override_is_one_line_error(override, key):
    with pytest.raises(C.ConfigError) as e:
        C.load_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg and key in msg, msg
    if "nope" in override or "zzz" in override:
        assert msg.startswith(f"unknown config key {key}"), msg


@pytest.mark.parametrize("text, key", [
    ("train:\n  nope: 1\n", "unknown config key train.nope"),
    ("model:\n  overrides: {a: 1}\n  extra: {b: 2}\n", "unknown config key model.extra"),
    ("train:\n  log_data: 1\n", "train.log_data"),
    ("loss:\n  weight_mask: heavy\n", "loss.weight_mask"),
    ("data:\n  synthetic: [1]\n", "data.synthetic"),
    ("- a\n", "top level must be a mapping"),
    ("train:\n  steps: [1\n", "x.yaml"),
])
def test_bad_file_is_one_line_error(tmp_path, text, key):
    (tmp_path / "x.yaml").write_text(text)
    with pytest.raises(C.ConfigError) as e:
        C.load_config(tmp_path / "x.yaml")
    msg = str(e.value)
    assert "\n" not in msg and key in msg, msg


def test_from_dict_and_apply_overrides():
    d = C.apply_overrides({"train": {"steps": 4}}, ["train.keep=7", "model.overrides={image_size: 64}"], C.Config)
    cfg = C.from_dict(C.Config, d)
    assert cfg.train.steps == 4 and cfg.train.keep == 7 and cfg.model.overrides == {"image_size": 64}
    with pytest.raises(C.ConfigError, match="unknown config key train.nope"):
        C.from_dict(C.Config, {"train": {"nope": 1}})
    with pytest.raises(C.ConfigError, match="unknown config key model.nope"):
        C.apply_overrides({}, ["model.nope=1"], C.Config)


# ----------------------------------------------------------------------------- names, paths, files


def test_name_or_path(tmp_path, monkeypatch):
    assert C.config_names() == NAMES
    assert C.resolve_config(None) == C.DEFAULT_CONFIG == C.CONFIG_DIR / "synthetic_tiny.yaml"
    for name in NAMES:
        assert C.resolve_config(name) == C.resolve_config(name + ".yaml") == C.CONFIG_DIR / f"{name}.yaml"
        assert C.load_config(name).name == name
    own = tmp_path / "mine.yaml"
    own.write_text("train:\n  steps: 5\n")
    cfg = C.load_config(own)
    assert cfg.name == "mine" and cfg.train.steps == 5  # the name defaults to the file's stem
    monkeypatch.chdir(tmp_path)
    assert C.load_config("mine.yaml").train.steps == 5  # a relative path
    (tmp_path / "synthetic_tiny.yaml").write_text("train:\n  steps: 6\n")
    assert C.load_config("synthetic_tiny.yaml").train.steps == 400  # a bare name: the shipped config
    assert C.load_config("./synthetic_tiny.yaml").train.steps == 6
    for bad in ("nope", "nope.yaml", str(tmp_path / "missing.yaml")):
        with pytest.raises(C.ConfigError) as e:
            C.load_config(bad)
        msg = str(e.value)
        assert "\n" not in msg and bad in msg and all(n in msg for n in NAMES), msg


def test_cli_unknown_config_name(capsys):
    from train.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--config", "no_such_config", "--dry-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no_such_config" in err and "synthetic_tiny" in err


@pytest.mark.parametrize("name", NAMES)
def test_resolved_config_yaml_roundtrip(tmp_path, name):
    cfg = C.load_config(name, ["train.steps=3", "model.overrides.trunk={drop_path_rate: 0.2}",
                               "model.init_from='true'", "data.takes_file='1e-4'", "optim.frozen_patterns=['*x*']"])
    C.save_config(cfg, tmp_path / "config.yaml")
    back = C.load_config(tmp_path / "config.yaml")
    assert back == cfg and hash(back.optim) == hash(cfg.optim)
    assert back.model.init_from == "true" and back.data.takes_file == "1e-4"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == C.to_dict(cfg)


def test_dry_run_prints_config_and_touches_nothing(tmp_path):
    """In a fresh interpreter: exit 0, YAML on stdout that loads back to the same config, no
    workdir, no data, and neither the trainer nor the model modules imported."""
    code = ("import sys; from train.__main__ import main; rc = main(sys.argv[1:]); "
            "bad = [m for m in ('lmeec_jax.training.trainer', 'lmeec_jax.models.sam2') if m in sys.modules]; "
            "sys.exit(rc if not bad else f'imported {bad}')")
    args = ["--set", "train.steps=5", "--workdir", str(tmp_path / "w"), "--dry-run"]
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env={**_env(), "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []  # no workdir, no work_dirs/, no data
    out = tmp_path / "dry.yaml"
    out.write_text(r.stdout)
    assert C.load_config(out) == C.load_config(None, ["train.steps=5"])


# ----------------------------------------------------------------------------- installed package


def _copy_sources(dst: Path) -> Path:
    """pyproject.toml, README.md and the packages it lists (a copy, so that the build's build/
    and *.egg-info land outside the checkout)."""
    find = re.search(r"^\[tool\.setuptools\.packages\.find\]\s*include\s*=\s*\[([^]]*)\]",
                     (REPO / "pyproject.toml").read_text(), re.M)
    include = re.findall(r'"([^"]+)"', find.group(1))
    assert include, "no [tool.setuptools.packages.find] include list in pyproject.toml"
    dst.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, dst / f)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for d in REPO.iterdir():
        if d.is_dir() and (d / "__init__.py").is_file() and any(fnmatch.fnmatch(d.name, p) for p in include):
            shutil.copytree(d, dst / d.name, ignore=ignore)
    return dst


def test_non_editable_install_finds_named_configs(tmp_path):
    venv = tmp_path / "venv"
    # no pip of its own: the system site-packages' pip installs into the venv (sys.prefix)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    py = str(venv / "bin" / "python")
    src = _copy_sources(tmp_path / "src")
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--no-build-isolation", str(src)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.rmtree(src)  # nothing can come from the copy either

    empty = tmp_path / "empty"
    empty.mkdir()
    probe = ("import lmeec_jax, train, lmeec_jax.training.config as C; "
             "print(lmeec_jax.__file__); print(train.__file__); print(C.CONFIG_DIR); print(*C.config_names())")
    r = subprocess.run([py, "-c", probe], cwd=empty, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    site = str(venv.resolve())
    pkg, train_pkg, config_dir, names = r.stdout.splitlines()
    # the venv's copy, ahead of the system site-packages' editable install of this repo
    assert pkg.startswith(site) and train_pkg.startswith(site) and config_dir.startswith(site), r.stdout
    assert names.split() == NAMES

    r = subprocess.run([py, "-m", "train", "--config", "synthetic_tiny", "--dry-run"], cwd=empty, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["name"] == "synthetic_tiny" and printed["data"]["synthetic"]["enabled"] is True
    assert printed == C.to_dict(C.load_config("synthetic_tiny"))
    assert list(empty.iterdir()) == []
