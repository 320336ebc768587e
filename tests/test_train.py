"""Training: overfitting a batch, exact resume, NaN stop, the command lines (train, evaluate, predict) and one
real run on a slice of Fashion-MNIST that must beat a clear accuracy bar."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kernels._alloc import _glibc
from tinyconv import (BatchNorm, Conv2D, DepthwiseConv2D, Dropout, GlobalAvgPool2D, Linear, PointwiseConv2D, ReLU,
                      Sequential)
from tinyconv import checkpoint as ckpt
from tinyconv import evaluate as evaluate_cli
from tinyconv import predict as predict_cli
from tinyconv import train as train_cli
from tinyconv.data import Dataset, load_dataset
from tinyconv.threads import set_threads
from tinyconv.train import TrainingDiverged, fit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def tiny_model(seed=0, *, width=8, classes=4, size=16, dropout=0.2):
    """A miniature MobileNet: conv, one separable block, pooling, dropout, classifier."""
    rng = np.random.default_rng(seed)
    w = width
    return Sequential([
        Conv2D(1, w, 3, stride=2, name="c1", rng=rng), BatchNorm(w, name="c1_bn"), ReLU("c1_relu"),
        DepthwiseConv2D(w, 3, name="dw", rng=rng), BatchNorm(w, name="dw_bn"), ReLU("dw_relu"),
        PointwiseConv2D(w, 2 * w, name="pw", rng=rng), BatchNorm(2 * w, name="pw_bn"), ReLU("pw_relu"),
        GlobalAvgPool2D(name="gap"), Dropout(dropout, seed=seed, name="dropout"),
        Linear(2 * w, classes, name="fc", rng=rng)], input_shape=(size, size, 1), name="tiny")


def synthetic(n, *, seed=0, classes=4, size=16):
    """Learnable uint8 images: each class is a bright square in its own quadrant, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int64)
    images = rng.integers(0, 60, (n, size, size, 1)).astype(np.uint8)
    half = size // 2
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 2)
        images[i, r * half + 2: r * half + half - 2, q * half + 2: q * half + half - 2] += 150
    return Dataset(images=images, labels=labels, class_names=[f"class{c}" for c in range(classes)], name="toy")


FAST = dict(batch_size=32, lr=0.05, warmup_epochs=0.5, progress=False, log=None)


def test_overfits_a_small_batch():
    rng = np.random.default_rng(1)
    data = Dataset(images=rng.integers(0, 256, (32, 16, 16, 1)).astype(np.uint8),
                   labels=rng.integers(0, 4, 32).astype(np.int64), class_names="abcd", name="noise")
    model = tiny_model(dropout=0.0, width=16)
    result = fit(model, data, epochs=60, batch_size=32, optimizer="adam", lr=1e-2, schedule="constant",
                 warmup_epochs=0, weight_decay=0.0, label_smoothing=0.0, augment=None, progress=False, log=None)
    assert result.history[-1]["train_acc"] == 1.0, "random labels of one batch must be memorized"
    assert result.history[-1]["train_loss"] < 0.25


def test_resume_equals_uninterrupted(tmp_path):
    train, val = synthetic(256), synthetic(64, seed=1)
    settings = dict(epochs=3, weight_decay=1e-3, seed=5, **FAST)

    whole = tiny_model()
    fit(whole, train, val, out=str(tmp_path / "whole"), **settings)

    def interrupt(epoch, batch, loss):
        if (epoch, batch) == (1, 3):
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second epoch

    out = str(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), train, val, out=out, on_step=interrupt, **settings)
    assert ckpt.load_checkpoint(out).epoch == 1, "the checkpoint of the last finished epoch stays"
    resumed = tiny_model()  # a new process would rebuild the model from scratch
    result = fit(resumed, train, val, out=out, resume=True, **settings)

    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    with open(os.path.join(out, "metrics.csv")) as f:
        assert len(f.read().splitlines()) == 4
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0
    with pytest.raises(ValueError, match="cannot resume with different settings: lr"):
        fit(tiny_model(), train, val, out=out, resume=True, **{**settings, "lr": 0.2})


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the poisoned forward pass itself
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_model()

    def poison(epoch, batch, loss):
        if (epoch, batch) == (1, 2):
            model.layers[0].params["kernel"][...] = np.inf

    with pytest.raises(TrainingDiverged, match="NaN or Inf at epoch 2, batch 4.*last good checkpoint"):
        fit(model, synthetic(128), epochs=3, out=str(tmp_path), on_step=poison, **FAST)
    saved = ckpt.load_checkpoint(tmp_path)
    assert saved.epoch == 1
    assert all(np.isfinite(v).all() for v in saved.model_state.values())


def test_fit_rejects_bad_settings():
    data = synthetic(64)
    with pytest.raises(ValueError, match="epochs"):
        fit(tiny_model(), data, epochs=0, progress=False, log=None)
    with pytest.raises(ValueError, match="batch_size"):
        fit(tiny_model(), data, epochs=1, batch_size=65, progress=False, log=None)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        fit(tiny_model(), data, epochs=1, batch_size=8, optimizer="lamb", progress=False, log=None)


# --- command lines -------------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (["--epochs", "-1"], "--epochs"), (["--epochs", "0"], "--epochs"), (["--epochs", "two"], "--epochs"),
    (["--lr", "0"], "--lr"), (["--lr", "-0.1"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--dataset", "imagenet"], "--dataset"), (["--alpha", "0"], "--alpha"), (["--alpha", "-1"], "--alpha"),
    (["--res", "16"], "--res"), (["--batch-size", "0"], "--batch-size"), (["--optimizer", "lamb"], "--optimizer"),
    (["--schedule", "linear"], "--schedule"), (["--label-smoothing", "1"], "--label-smoothing"),
    (["--dropout", "1.5"], "--dropout"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--threads", "0"], "--threads"), (["--resume"], "--resume needs --out"), (["--frobnicate"], "unrecognized"),
    (["--classes-subset", "9-0"], "--classes-subset"), (["--classes-subset", "a"], "--classes-subset"),
    (["--classes-subset", "1,1"], "without repeats"), (["--dataset", "folder"], "--dataset folder needs --data-dir"),
]


@pytest.mark.parametrize("argv, reason", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_cli_arguments_exit_2_with_one_line(argv, reason, capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and reason in err, err


def test_bad_cli_argument_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "tinyconv.train", "--lr", "-1"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "python -m tinyconv.train: error: argument --lr: expected a number > 0, got '-1' (see --help)"]


def test_cli_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--dataset", "--model", "--alpha", "--res", "--shallow", "--full-conv", "--epochs", "--batch-size",
                 "--optimizer", "--lr", "--schedule", "--weight-decay", "--label-smoothing", "--dropout", "--seed",
                 "--out", "--resume", "--threads"):
        assert flag in out


def test_cli_refuses_to_overwrite_a_run(tmp_path, capsys):
    ckpt.save_checkpoint(tmp_path / ckpt.FILENAME, model=tiny_model(), epoch=1)
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--out", str(tmp_path)])
    assert exc.value.code == 2 and "already holds a checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists(FASHION), reason="Fashion-MNIST is not installed")
def test_cli_resume_after_ctrl_c_equals_uninterrupted(tmp_path, capsys, monkeypatch, restore_threads):
    argv = ["--model", "small", "--epochs", "2", "--limit-train", "640", "--val", "128", "--limit-test", "128",
            "--batch-size", "64", "--threads", "1", "--no-progress"]
    assert train_cli.main(argv + ["--out", str(tmp_path / "whole")]) == 0

    real_epoch = train_cli._train_epoch

    def ctrl_c_in_epoch_2(*args, epoch, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(*args, epoch=epoch, **kwargs)

    cut = str(tmp_path / "cut")
    monkeypatch.setattr(train_cli, "_train_epoch", ctrl_c_in_epoch_2)
    assert train_cli.main(argv + ["--out", cut]) == 130
    assert f"interrupted; the last good checkpoint is {cut}" in capsys.readouterr().err
    monkeypatch.undo()
    assert train_cli.main(["--resume", "--out", cut, "--threads", "1", "--no-progress"]) == 0
    whole, resumed = ckpt.load_checkpoint(tmp_path / "whole"), ckpt.load_checkpoint(cut)
    assert resumed.epoch == 2
    for name, value in whole.model_state.items():
        np.testing.assert_array_equal(resumed.model_state[name], value, err_msg=name)


def test_input_geometry():
    assert train_cli.input_geometry((28, 28), 32) == (None, 32)
    assert train_cli.input_geometry((28, 28), 64) == ((56, 56), 64)
    assert train_cli.input_geometry((32, 32), 32) == (None, None)
    assert train_cli.input_geometry((32, 32), 96) == (96, None)


@pytest.fixture
def restore_threads():
    yield
    set_threads()  # the command lines below run on one thread; give the rest of the session every core back


@pytest.mark.skipif(not os.path.exists(FASHION), reason="Fashion-MNIST is not installed")
def test_real_run_on_a_slice_then_evaluate_and_predict(tmp_path, capsys, restore_threads):
    """The three command lines end to end: MobileNet alpha 0.25, 3 epochs on 20,000 Fashion-MNIST images (about
    15 s on one thread), then >= 70% on 2,000 test images (chance: 10%; this run measured 74.6%)."""
    out = str(tmp_path / "run")
    code = train_cli.main(["--alpha", "0.25", "--epochs", "3", "--limit-train", "20000", "--val", "1000",
                           "--limit-test", "2000", "--threads", "1", "--out", out, "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "mult-adds" in printed and "images/s" in printed
    for name in ("checkpoint.npz", "metrics.csv", "curves.png", "summary.json"):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["test_acc"] >= 0.70, summary
    assert summary["params"] == 215_498 and summary["images_per_s"] > 0

    assert evaluate_cli.main([out, "--threads", "1"]) == 0
    report = capsys.readouterr().out
    assert "per-class accuracy" in report and "Ankle boot" in report and "confusion matrix" in report
    assert f"accuracy {100 * summary['test_acc']:.2f}%" in report, "evaluate must reproduce the run's test accuracy"

    test = load_dataset("fashion-mnist", split="test")
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"item{i}.png"))
        Image.fromarray(test.images[i, :, :, 0]).save(paths[-1])
    assert predict_cli.main([out, *paths, "--top-k", "3", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == paths and all(line.count("%") == 3 for line in lines)

    assert predict_cli.main([out, str(tmp_path / "missing.png")]) == 1
    assert "missing.png: cannot read the image" in capsys.readouterr().err


def test_cli_trains_on_an_image_folder_with_a_class_subset(tmp_path, capsys):
    """An image folder (one subfolder per class, train/ and test/) through the command line, keeping classes 0 and 2."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for k, name in enumerate(("ankle", "bag", "coat")):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (28, 28), dtype=np.uint8)
                pixels[k * 9:(k + 1) * 9, :] += 150  # a bright band whose position is the class
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    out = tmp_path / "run"
    code = train_cli.main(["--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--classes-subset", "0,2",
                           "--model", "small", "--epochs", "1", "--batch-size", "8", "--val", "0", "--threads", "1",
                           "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    saved = ckpt.load_checkpoint(out)
    assert saved.config["data"]["classes_subset"] == [0, 2]
    logits_kernel = [v for k, v in saved.model_state.items() if k.endswith("/kernel")][-1]
    assert logits_kernel.shape[-1] == 2, "two classes kept, so two logits"
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["epochs"] == 1


def test_blas_override_note(tmp_path):
    """The trainer says when OPENBLAS_CORETYPE pins an AVX-512 CPU to older kernels, and only then."""
    from tinyconv.threads import blas_override_note
    avx512, avx2 = tmp_path / "avx512", tmp_path / "avx2"
    avx512.write_text("flags\t\t: fpu sse2 avx2 fma avx512f avx512bw\n")
    avx2.write_text("flags\t\t: fpu sse2 avx2 fma\n")
    note = blas_override_note({"OPENBLAS_CORETYPE": "Haswell"}, str(avx512))
    assert note is not None and "OPENBLAS_CORETYPE=Haswell" in note and "unset" in note
    assert blas_override_note({}, str(avx512)) is None
    assert blas_override_note({"OPENBLAS_CORETYPE": "SkylakeX"}, str(avx512)) is None
    assert blas_override_note({"OPENBLAS_CORETYPE": "Haswell"}, str(avx2)) is None
    assert blas_override_note({"OPENBLAS_CORETYPE": "Haswell"}, str(tmp_path / "missing")) is None


@pytest.mark.parametrize("package", ["tinyconv", "models", "kernels"])
def test_blas_thread_default_is_set_before_numpy_loads(package):
    """Each package sets OPENBLAS_THREAD_TIMEOUT before NumPy (and so OpenBLAS) loads, since OpenBLAS reads it only
    then; a value the user set is kept."""
    code = ("import os, sys\n"
            "order = []\n"
            "class Recorder:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        order.append(name)\n"
            "sys.meta_path.insert(0, Recorder())\n"
            f"import {package}\n"
            "first = 'numpy' not in order or order.index('kernels') < order.index('numpy')\n"
            "print(first, os.environ['OPENBLAS_THREAD_TIMEOUT'])\n")
    assert _python(code).split() == ["True", "18"]
    assert _python(code, OPENBLAS_THREAD_TIMEOUT="20").split() == ["True", "20"]


def _python(code, **env):
    """stdout of ``python -c code`` run from the project's root, with OPENBLAS_THREAD_TIMEOUT unset unless given."""
    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True,
                          check=True, cwd=root).stdout


_SPIN_PROBE = """
import statistics, sys, time
import numpy as np
a = np.ones((1024, 1024), np.float32)
a @ a  # NumPy's BLAS loaded and its workers started before tinyconv
{before}
import {package}
import kernels

def cpu_while_asleep():
    a @ a
    start = time.process_time()
    time.sleep(0.05)
    return time.process_time() - start

print(len(kernels.OPENBLAS_RESTARTED), statistics.median(cpu_while_asleep() for _ in range(7)) * 1e3)
"""


@pytest.mark.parametrize("package, before", [
    ("tinyconv", ""), ("kernels", ""),
    ("tinyconv", "import os; os.environ['OPENBLAS_THREAD_TIMEOUT'] = '18'  # too late for OpenBLAS to see it")])
def test_blas_workers_stop_spinning_when_numpy_was_imported_first(package, before):
    """NumPy imported first has loaded OpenBLAS with its own 2^28-cycle spin; importing tinyconv restarts the
    workers with 2^18 (kernels._openblas), also when the script set the variable itself after NumPy. Observed as
    CPU time the process burns during a 50 ms sleep right after a GEMM: ~50 ms while a worker spins, ~1-4 ms once
    it sleeps. A value set before Python started is what OpenBLAS runs with: kept, nothing restarted, and its spin
    measured as the control; where no worker spins even then (one core, or a BLAS without such a pool), the test
    has nothing to compare and is skipped."""
    def run(before, **env):
        restarted, cpu_ms = _python(_SPIN_PROBE.format(package=package, before=before), **env).split()
        return int(restarted), float(cpu_ms)

    kept, spinning_ms = run("", OPENBLAS_THREAD_TIMEOUT="28")
    assert kept == 0  # the user's value: nothing restarted
    if spinning_ms < 25:
        pytest.skip(f"no BLAS worker spins here even at 2^28 cycles ({spinning_ms:.1f} ms of CPU in 50 ms)")
    restarted, fixed_ms = run(before)
    assert restarted >= 1
    assert fixed_ms < 15, (fixed_ms, spinning_ms)


def test_import_survives_a_failed_blas_restart():
    """If the restart cannot be done (here threadpoolctl fails), importing tinyconv still works and says why."""
    code = ("import warnings\n"
            "import numpy, threadpoolctl\n"
            "def broken():\n"
            "    raise OSError('no library list')\n"
            "threadpoolctl.ThreadpoolController = broken\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import tinyconv, kernels\n"
            "print(kernels.OPENBLAS_RESTARTED, [str(w.message) for w in caught if 'OpenBLAS' in str(w.message)])\n")
    out = _python(code)
    assert out.startswith("[] [")
    assert "no library list" in out and "OPENBLAS_THREAD_TIMEOUT=18" in out


def test_restarted_blas_workers_compute_the_same_products(monkeypatch):
    """After a restart of the BLAS workers (what importing kernels does when NumPy came first) GEMMs on both
    threads give the products they gave before; a restart to the value OpenBLAS already runs with is skipped."""
    from kernels._openblas import restart_workers
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 512, 512))
    before = a @ b
    own = os.environ["OPENBLAS_THREAD_TIMEOUT"]  # what kernels left in place: set, and read by OpenBLAS
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "17" if own != "17" else "16")
    restarted = restart_workers()
    if not restarted:
        pytest.skip("no pthreads OpenBLAS with these entry points in this process")
    np.testing.assert_array_equal(a @ b, before)
    assert restart_workers() == []  # already at that value
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", own)  # back to it, for the tests after this one
    assert restart_workers() == restarted
    np.testing.assert_array_equal(a @ b, before)


def test_allocator_decision_respects_the_user():
    """The allocator is left alone when the user opted out or set glibc's own malloc variables."""
    from kernels._alloc import reason_to_skip
    assert "TINYCONV_KEEP_FREED_MEMORY=0" in reason_to_skip({"TINYCONV_KEEP_FREED_MEMORY": "0"})
    assert "MALLOC_MMAP_THRESHOLD_" in reason_to_skip({"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert "MALLOC_TRIM_THRESHOLD_" in reason_to_skip({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert "GLIBC_TUNABLES" in reason_to_skip({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
    if _glibc():
        assert reason_to_skip({}) is None
        assert reason_to_skip({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}) is None


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_large_arrays_come_from_the_heap_after_import():
    """After ``import kernels`` a 64 MiB array is carved from the heap (reused after free, no page faults on the
    next step) instead of a mapping of its own; the opt-out and a user's own malloc variable leave glibc's
    default, which maps it."""
    code = ("import kernels, numpy as np\n"
            "from kernels import _alloc\n"
            "a = np.empty(64 << 20, np.uint8)\n"
            "addr = a.ctypes.data\n"
            "heap = [tuple(int(v, 16) for v in line.split()[0].split('-'))\n"
            "        for line in open('/proc/self/maps') if line.rstrip().endswith('[heap]')]\n"
            "print(any(lo <= addr < hi for lo, hi in heap), _alloc.status.replace(' ', '_'))\n")
    drop = ("TINYCONV_KEEP_FREED_MEMORY", "GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
            "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(extra):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             check=True, cwd=root).stdout.split()
        return out[0] == "True", out[1]

    assert run({}) == (True, "set")
    in_heap, status = run({"TINYCONV_KEEP_FREED_MEMORY": "0"})
    assert not in_heap and status.startswith("off")
    in_heap, status = run({"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert not in_heap and status.startswith("left_to_the_user")
