"""Faults users found, one test a row, one section a command (add rows to the command's section).

Each error row checks: status != 0, one line on stderr naming the path and the cause, no
traceback, and nothing of the user's data lost. The checkpoints are the nano model's random
weights (converted with ``--model lmeec_hiera_nano``); ``old`` and ``new`` differ in every value.
"""

import errno
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

torch = pytest.importorskip("torch", reason="the converter reads PyTorch checkpoints")

from convert.__main__ import main as convert_main
from lmeec_jax.models import checkpoint as ckpt_mod
from lmeec_jax.models.checkpoint import load_model, load_state, save_model
from lmeec_jax.models.config import get_config
from lmeec_jax.models.sam2 import build_model
from lmeec_jax.models.weights import to_state_dict

REPO = Path(__file__).resolve().parents[1]
NANO = ["--model", "lmeec_hiera_nano"]
KEY = "sam_mask_decoder.iou_prediction_head.layers.1.weight"  # tells old from new


def _one_line(err: str, *words) -> str:
    """The one stderr line; it must contain each of ``words``."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


def _snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative path -> bytes): what must survive a refused command."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _work_folders(out: Path) -> list[Path]:
    """The hidden folders that saving uses beside ``out``."""
    return sorted(out.parent.glob(f".{out.name}.*"))


# ---------------------------------------------------------------------------------------------
# python -m convert
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """``old.pt`` / ``new.pt`` (nano state dicts, new = old + 1) and ``old_dir``, the model
    directory of old.pt (a template: tests copy it)."""
    root = tmp_path_factory.mktemp("faults")
    net = build_model(get_config("lmeec_hiera_nano"), seed=0)
    sd = to_state_dict(net)
    for name, shift in (("old", 0.0), ("new", 1.0)):
        torch.save({"model": {k: torch.from_numpy(np.array(v) + shift) for k, v in sd.items()}}, root / f"{name}.pt")
    save_model(net, net.cfg, root / "old_dir")
    return dict(old=root / "old.pt", new=root / "new.pt", old_dir=root / "old_dir", key=np.asarray(sd[KEY]))


def _copy_model(ckpts, dest: Path) -> Path:
    shutil.copytree(ckpts["old_dir"], dest)
    return dest


def _which(ckpts, out: Path, full: bool = False) -> str:
    """"old" or "new": the complete model directory at ``out`` (``full``: via load_model)."""
    if full:
        model, cfg = load_model(out)
        assert cfg.name == "lmeec_hiera_nano"
        value = to_state_dict(model)[KEY]
    else:
        value = load_state(out)[KEY]
    for name, shift in (("old", 0.0), ("new", 1.0)):
        if np.array_equal(value, ckpts["key"] + shift):
            return name
    raise AssertionError(f"{out} holds neither the old nor the new model")


def test_out_dir_with_other_files_is_refused(tmp_path, ckpts, capsys):
    """Row 1: --out holding other files, or a model directory, is refused without --overwrite."""
    d = tmp_path / "results"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("my notes\n")
    (d / "sub" / "data.bin").write_bytes(b"\0\1\2")
    (d / "config.json").write_text('{"mine": true}\n')
    before = _snapshot(d)
    assert convert_main(["--src", str(ckpts["new"]), "--out", str(d), *NANO]) == 2
    _one_line(capsys.readouterr().err, d, "other files", "--overwrite")
    assert _snapshot(d) == before and not _work_folders(d)

    model_dir = _copy_model(ckpts, tmp_path / "model")
    before = _snapshot(model_dir)
    assert convert_main(["--src", str(ckpts["new"]), "--out", str(model_dir), *NANO]) == 2
    _one_line(capsys.readouterr().err, model_dir, "already holds a model directory", "--overwrite")
    assert _snapshot(model_dir) == before

    # --overwrite: the directory is replaced as a whole by the new model directory
    assert convert_main(["--src", str(ckpts["new"]), "--out", str(d), *NANO, "--overwrite"]) == 0
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "params"]
    assert _which(ckpts, d, full=True) == "new" and not _work_folders(d)


def _wait_for(proc, cond, timeout=240.0) -> bool:
    """Poll ``cond()`` every millisecond while ``proc`` runs; True once it holds."""
    t_end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < t_end:
        if cond():
            return True
        time.sleep(0.001)
    return False


def test_kill_while_saving_keeps_a_complete_directory(tmp_path, ckpts, monkeypatch):
    """Row 2: re-converting over a model directory and ``kill -9`` during the save leaves the old
    or the new complete directory at --out. The converter runs in a child, is frozen (SIGSTOP:
    the files are then exactly what a kill leaves) once its work folder appears, checked, and
    killed. The next run removes the work folder left; around its swap (the only step that
    touches --out) the old directory is there just before and the new one just after."""
    out = _copy_model(ckpts, tmp_path / "model")
    log = tmp_path / "child.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "convert", "--src", str(ckpts["new"]), "--out", str(out),
                                 *NANO, "--overwrite"], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        writing = _wait_for(proc, lambda: _work_folders(out))
        proc.send_signal(signal.SIGSTOP)
        assert writing, f"the converter ended before saving: {log.read_text()}"
        assert _which(ckpts, out) == "old"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _which(ckpts, out, full=True) == "old"
    assert _work_folders(out)  # left by the kill

    seen = []
    real_swap_in = ckpt_mod._swap_in

    def watched_swap_in(new, target):
        seen.append(_which(ckpts, target))
        old = real_swap_in(new, target)
        seen.extend([_which(ckpts, target), _which(ckpts, old)])
        return old

    monkeypatch.setattr(ckpt_mod, "_swap_in", watched_swap_in)
    assert convert_main(["--src", str(ckpts["new"]), "--out", str(out), *NANO, "--overwrite"]) == 0
    assert seen == ["old", "new", "old"]  # before the swap, after it, what is then deleted
    assert _which(ckpts, out, full=True) == "new"
    assert not _work_folders(out)


FULL_DISK_CHILD = textwrap.dedent("""
    import resource, signal, sys
    from flax import nnx
    from lmeec_jax.models.checkpoint import ModelDirError, save_model
    from lmeec_jax.models.config import get_config
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
    # many arrays: tensorstore then fails them one by one (the flood came from those)
    model = nnx.Sequential(*[nnx.Linear(32, 32, rngs=nnx.Rngs(i)) for i in range(300)])
    try:
        save_model(model, get_config("lmeec_hiera_nano"), sys.argv[1])
    except ModelDirError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
""")


def test_unwritable_out_is_one_line(tmp_path, ckpts, capsys, monkeypatch):
    """Row 3: --out an existing file, in a read-only folder, or on a full disk: one line, status
    2 (1 for the disk), nothing left behind, the old directory intact."""
    f = tmp_path / "weights.bin"
    f.write_bytes(b"precious")
    assert convert_main(["--src", str(ckpts["new"]), "--out", str(f), *NANO, "--overwrite"]) == 2
    _one_line(capsys.readouterr().err, f, "not a directory")
    assert f.read_bytes() == b"precious"

    # read-only folder: what a non-root user sees (root writes through permission bits)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real_access(p, mode, **kw))
    assert convert_main(["--src", str(ckpts["new"]), "--out", str(ro / "m"), *NANO]) == 2
    _one_line(capsys.readouterr().err, ro / "m", ro, "read-only")
    assert not any(ro.iterdir())
    monkeypatch.undo()

    # full disk while writing over an existing model directory
    out = _copy_model(ckpts, tmp_path / "model")
    before = _snapshot(out)

    def full_disk(self, directory, *args, **kwargs):
        Path(str(directory) + ".orbax-checkpoint-tmp").mkdir(parents=True)  # a partial write
        (Path(str(directory) + ".orbax-checkpoint-tmp") / "chunk").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ocp.Checkpointer, "save", full_disk)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # a failed save filters it for good
    assert convert_main(["--src", str(ckpts["new"]), "--out", str(out), *NANO, "--overwrite"]) == 1
    _one_line(capsys.readouterr().err, out, "No space left on device")
    assert _snapshot(out) == before and not _work_folders(out)
    monkeypatch.undo()

    # a real failing write (file size limit: EFBIG), to see that orbax's error flood stays out
    out = tmp_path / "limited"
    r = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(out)], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    _one_line(r.stderr, out, os.strerror(errno.EFBIG))
    assert not out.exists() and not _work_folders(out)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_names_the_blocked_global(tmp_path, capsys):
    """Row 4: a checkpoint whose pickle calls os.system is refused, naming the file and the global."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "hook": _RunsCode(marker)}, evil)
    bare = tmp_path / "bare.pt"  # a plain pickle (protocol 4: torch stops before reading a global)
    bare.write_bytes(pickle.dumps({"hook": _RunsCode(marker)}, protocol=4))
    for path in (evil, bare):
        assert convert_main(["--src", str(path), "--out", str(tmp_path / "o")]) == 1
        _one_line(capsys.readouterr().err, path, f"{os.system.__module__}.system", "refused for safety")
    assert not marker.exists() and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# python -m train
# ---------------------------------------------------------------------------------------------
# The configs are tests/test_train.py's (nano model at 64 px, 4-frame clips, its 2-take split),
# written to a YAML file for --config. Most rows swap the compiled train step for a trivial one
# (`fake_step`: the state's step + 1, a constant loss), which keeps them to seconds; the real step
# runs in the interrupt row of `python -m train` in a child process (slow: one compilation).

from lmeec_jax.training import config as C  # noqa: E402
from lmeec_jax.training import trainer as trainer_mod  # noqa: E402
from lmeec_jax.training.checkpointing import Checkpointer  # noqa: E402
from tests.test_train import _cfg, jax_cache, synth_dir  # noqa: E402,F401  (fixtures)
from train.__main__ import main as train_main  # noqa: E402


def _train_config(tmp_path, synth_dir, jax_cache, **over) -> Path:
    """tests/test_train.py's small config (+ ``over``) as a YAML file for ``--config``."""
    path = tmp_path / "cfg.yaml"
    C.save_config(_cfg(synth_dir, jax_cache, **over), path)
    return path


@pytest.fixture
def fake_step(monkeypatch):
    """A trivial train step (no model compilation); ``signal_at[step] = SIG`` sends SIG to this
    process from inside the compiled call that makes ``step``."""
    import jax
    import jax.numpy as jnp

    signal_at: dict = {}

    def send(step):
        sig = signal_at.get(int(step))
        if sig is not None:
            os.kill(os.getpid(), sig)

    def make_train_step(*args, **kwargs):
        def step(state, batch, rngs):
            jax.debug.callback(send, state["step"] + 1)
            loss = jnp.mean(batch["tgt_masks"].astype(jnp.float32))
            return {**state, "step": state["step"] + 1}, {"loss": loss, "grad_norm": jnp.float32(1.0)}
        return step

    real_build = trainer_mod.build_train_model

    def build_train_model(cfg, log=print):  # built once per model config (the random init takes long)
        from flax import nnx

        key = C.config_yaml(cfg).split("\ndata:")[0]
        if key not in _MODELS:
            _MODELS[key] = real_build(cfg, log)
        model, mcfg = _MODELS[key]
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, jax.tree.map(jnp.array, state)), mcfg  # a copy: the step donates its state

    monkeypatch.setattr(trainer_mod, "make_train_step", make_train_step)
    monkeypatch.setattr(trainer_mod, "build_train_model", build_train_model)
    return signal_at


_MODELS: dict = {}


def _train(capsys, *argv) -> tuple[int, str, str]:
    """``python -m train ARGV`` in this process: (status, stdout, stderr)."""
    try:
        rc = train_main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _steps(workdir: Path) -> list[int]:
    return Checkpointer(workdir / "checkpoints").all_steps()


def _metrics(workdir: Path) -> list[dict]:
    import json

    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_bad_config_values_all_reported(tmp_path, capsys):
    """Row 1: out-of-range values, unknown keys in free-form dicts and missing paths are all
    reported before anything runs, one line each, status 2; nothing is created."""
    sets = {"train.steps=0": "train.steps", "train.keep=0": "train.keep", "train.batch_size=0": "train.batch_size",
            "model.dtype=int8": "model.dtype", "model.overrides.bogus=1": "model.overrides.bogus",
            "data.augment.hflip_p=1.5": "data.augment.hflip_p", "optim.base_lr=-1": "optim.base_lr",
            "data.synthetic.p_small=2": "data.synthetic.p_small",
            f"model.init_from={tmp_path / 'nomodel'}": "model.init_from"}
    argv = [x for s in sets for x in ("--set", s)]
    rc, out, err = _train(capsys, *argv, "--workdir", tmp_path / "w")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == len(sets) and "Traceback" not in err, err
    assert all(line.startswith("error: ") for line in lines), err
    for key in sets.values():
        assert sum(f"{key}:" in line or f"key {key} " in line for line in lines) == 1, (key, err)
    assert not (tmp_path / "w").exists()
    for bad, key in (("train.steps=-3", "train.steps"), ("data.synthetic.enabled=false", "data.train_dir")):
        rc, _, err = _train(capsys, "--set", bad, "--workdir", tmp_path / "w")
        assert rc == 2
        _one_line(err, key)
    # and the API: load_config raises one ConfigError with all of them
    with pytest.raises(C.ConfigError) as e:
        C.load_config(None, ["train.steps=0", "model.dtype=int8"])
    assert len(e.value.problems) == 2


def test_resume_with_changed_recipe_is_refused(tmp_path, synth_dir, jax_cache, fake_step, capsys):
    """Row 2: resuming with another model or recipe: one line naming the keys (old -> new),
    status 2, workdir untouched; --resume-changed resumes and keeps the old config.yaml."""
    cfg = _train_config(tmp_path, synth_dir, jax_cache, **{"train.steps": 2})
    wd = tmp_path / "w"
    assert _train(capsys, "--config", cfg, "--workdir", wd)[0] == 0
    before = _snapshot(wd)
    for sets, words in ((["optim.base_lr=5e-4"], ["optim.base_lr: 0.001 -> 0.0005"]),
                        (["model.overrides.fuser_layers=2", "train.steps=3"],
                         ["model.overrides.fuser_layers: 1 -> 2", "train.steps: 2 -> 3"])):
        rc, out, err = _train(capsys, "--config", cfg, "--workdir", wd, *[x for s in sets for x in ("--set", s)])
        assert rc == 2
        _one_line(err, wd / "config.yaml", "step 2", "--resume-changed", *words)
        after = _snapshot(wd)
        after.pop("error.log", None)  # the CLI's log (the traceback of the refusal)
        assert after == {k: v for k, v in before.items() if k != "error.log"}

    rc, out, err = _train(capsys, "--config", cfg, "--workdir", wd, "--set", "optim.base_lr=5e-4", "--resume-changed")
    assert rc == 0 and err == "", err
    assert "resumed from step 2" in out
    kept = sorted(wd.glob("config.*.yaml"))
    assert len(kept) == 1 and kept[0].read_bytes() == before["config.yaml"]
    assert C.load_config(wd / "config.yaml").optim.base_lr == 5e-4


def _failing_async_save(monkeypatch, fail_step: int):
    """The checkpoint writer of step ``fail_step`` fails in the background with ENOSPC."""
    real = ocp.StandardCheckpointHandler.async_save

    class DiskFull:
        def result(self, timeout=None):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async def async_save(self, directory, *args, **kwargs):
        futures = await real(self, directory, *args, **kwargs)
        if Path(directory).parent.name.split(".")[0] == str(fail_step):
            return list(futures or []) + [DiskFull()]
        return futures

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)


def test_failed_async_save_stops_at_once(tmp_path, synth_dir, jax_cache, fake_step, capsys, monkeypatch):
    """Row 3a: the background save of step 4 fails (disk full): training stops as soon as the
    failure is known (between two steps; at the latest before the next save, step 6, not at the
    end), with one line naming the step's path and the cause, status 1; step 2 restores."""
    cfg = _train_config(tmp_path, synth_dir, jax_cache, **{"train.steps": 8, "train.async_checkpointing": True})
    wd = tmp_path / "w"
    real_next = trainer_mod.Trainer._next_batch
    monkeypatch.setattr(trainer_mod.Trainer, "_next_batch", lambda self: (time.sleep(0.3), real_next(self))[1])
    real_async_save = ocp.StandardCheckpointHandler.async_save
    _failing_async_save(monkeypatch, 4)
    rc, out, err = _train(capsys, "--config", cfg, "--workdir", wd)
    assert rc == 1
    _one_line(err, wd / "checkpoints" / "4", "No space left on device")
    assert max(r["step"] for r in _metrics(wd)) <= 6  # stopped, not run on to the end (8)
    assert _steps(wd) == [2]
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", real_async_save)  # the disk has room again
    rc, out, err = _train(capsys, "--config", cfg, "--workdir", wd)
    assert rc == 0 and "resumed from step 2" in out, err
    assert _steps(wd) == [2, 4, 6, 8]


def test_corrupt_latest_checkpoint_restores_the_previous(tmp_path, synth_dir, jax_cache, fake_step, capsys):
    """Row 3b: the latest checkpoint's files truncated: one line, the previous step restored,
    the bad one moved aside (not deleted), training completes."""
    cfg = _train_config(tmp_path, synth_dir, jax_cache, **{"train.steps": 4})
    wd = tmp_path / "w"
    assert _train(capsys, "--config", cfg, "--workdir", wd)[0] == 0
    assert _steps(wd) == [2, 4]
    for p in (wd / "checkpoints" / "4").rglob("*"):
        if p.is_file():
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    rc, out, err = _train(capsys, "--config", cfg, "--workdir", wd)
    assert rc == 0 and err == "", err
    warn = [line for line in out.splitlines() if "cannot be restored" in line]
    assert len(warn) == 1 and str(wd / "checkpoints" / "4") in warn[0] and "restoring step 2" in warn[0], out
    assert "resumed from step 2" in out and _steps(wd) == [2, 4]
    assert any((wd / "checkpoints.unreadable").iterdir())  # kept for inspection
    steps = [r["step"] for r in _metrics(wd) if "loss" in r]
    assert steps[-2:] == [3, 4]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_inside_a_compiled_step_saves_and_exits_130(tmp_path, synth_dir, jax_cache, fake_step, capsys, sig):
    """Row 4: a signal that arrives during a compiled step: the checkpoint of the current step
    is saved, one line, status 130; the run resumes from it."""
    cfg = _train_config(tmp_path, synth_dir, jax_cache, **{"train.steps": 6, "train.ckpt_every": 0})
    wd = tmp_path / "w"
    fake_step[3] = sig
    rc, out, err = _train(capsys, "--config", cfg, "--workdir", wd)
    assert rc == 130
    line = _one_line(err, f"interrupted by {signal.Signals(sig).name}", "checkpoint saved")
    step = _steps(wd)
    assert len(step) == 1 and str(wd / "checkpoints" / str(step[0])) in line and 3 <= step[0] < 6
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    fake_step.clear()
    rc, out, err = _train(capsys, "--config", cfg, "--workdir", wd)
    assert rc == 0 and f"resumed from step {step[0]}" in out


@pytest.mark.slow
def test_sigint_to_python_m_train_saves_a_checkpoint(tmp_path, synth_dir, jax_cache):
    """Row 4, the real command: SIGINT after the first metrics line -> a checkpoint at the
    current step, one line on stderr, status 130 (one train-step compilation: minutes)."""
    cfg = _train_config(tmp_path, synth_dir, jax_cache, **{"train.steps": 50, "train.ckpt_every": 0})
    wd = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, "-m", "train", "--config", str(cfg), "--workdir", str(wd)], cwd=REPO,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(proc, lambda: (wd / "metrics.jsonl").is_file() and (wd / "metrics.jsonl").stat().st_size,
                         timeout=900), proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    line = _one_line(err, "interrupted by SIGINT", "checkpoint saved")
    steps = _steps(wd)
    assert len(steps) == 1 and 1 <= steps[0] < 50 and str(wd / "checkpoints" / str(steps[0])) in line


def _break_take(split: Path, take_index: int = 0) -> str:
    """Delete every frame file of one take (its camera folders stay): its clips cannot load."""
    take = sorted(p.name for p in split.iterdir() if p.is_dir())[take_index]
    for jpg in (split / take).rglob("*.jpg"):
        jpg.unlink()
    return take


def test_bad_frames_are_skipped_counted_and_stop_past_the_threshold(tmp_path, synth_dir, jax_cache, fake_step,
                                                                    capsys):
    """Row 5: missing frame files (with data.preresize set, where the first frame used to be
    opened outside the skip path) are skipped and counted in metrics.jsonl; past
    train.max_skip_rate the run stops with one line, status 1, keeping a checkpoint."""
    split = tmp_path / "split"
    shutil.copytree(synth_dir, split)
    _break_take(split)
    over = {"train.steps": 3, "train.max_skip_rate": 1.0, "train.skip_min_clips": 1}
    cfg = _train_config(tmp_path, split, jax_cache, **over)
    wd = tmp_path / "w"
    rc, out, err = _train(capsys, "--config", cfg, "--workdir", wd)
    assert rc == 0 and err == "", err
    last = [r for r in _metrics(wd) if "loss" in r][-1]
    assert last["step"] == 3 and last["skipped"] > 0 and last["clips_read"] == 6 + last["skipped"]

    cfg = _train_config(tmp_path, split, jax_cache, **{**over, "train.max_skip_rate": 0.05})
    wd = tmp_path / "w2"
    rc, out, err = _train(capsys, "--config", cfg, "--workdir", wd)
    assert rc == 1
    _one_line(err, split, "skipped for bad data", "train.max_skip_rate 0.05", "frame file missing",
              "checkpoint of step 0")
    assert _steps(wd) == [0]
    assert "error" in _metrics(wd)[-1]


def test_workdir_that_is_a_file_or_read_only(tmp_path, capsys, monkeypatch):
    """Row 6: --workdir a file, or in a read-only folder: one line, status 2, nothing written."""
    f = tmp_path / "notes.txt"
    f.write_text("mine\n")
    rc, _, err = _train(capsys, "--workdir", f)
    assert rc == 2
    _one_line(err, f, "not a directory")
    assert f.read_text() == "mine\n"
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real_access(p, mode, **kw))
    rc, _, err = _train(capsys, "--workdir", ro / "w")
    assert rc == 2
    _one_line(err, ro / "w", "read-only")
    assert not any(ro.iterdir())


# ---------------------------------------------------------------------------------------------
# python -m eval show
# ---------------------------------------------------------------------------------------------


def test_show_unknown_take_or_missing_data(tmp_path, synth_dir, capsys):
    """Row 1: --take that is not in --data, or --data that does not exist: one line, status 2."""
    from eval.__main__ import main as eval_main

    out = tmp_path / "out"
    assert eval_main(["show", "--data", str(synth_dir), "--take", "nosuch", "--object", "x", "--out", str(out)]) == 2
    _one_line(capsys.readouterr().err, "--take nosuch", synth_dir / "nosuch")
    missing = tmp_path / "nodata"
    assert eval_main(["show", "--data", str(missing), "--take", "t", "--object", "x", "--out", str(out)]) == 2
    _one_line(capsys.readouterr().err, missing, "no such directory")
    assert not out.exists()
