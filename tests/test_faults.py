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
