"""Checkpoints: exact round trip, atomicity under interruption (simulated and a real SIGKILL), clear load errors."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from test_train import tiny_model
from tinyconv import checkpoint as ckpt
from tinyconv.optim import SGD, Adam

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trained_pair(seed=0):
    """A tiny model and an SGD optimizer with non-trivial state (a few steps taken)."""
    model = tiny_model(seed)
    opt = SGD(model.named_parameters(), lr=0.1, weight_decay=1e-3)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        model.zero_grad()
        for _, _, g in model.named_parameters():
            g[...] = rng.standard_normal(g.shape)
        opt.step()
    model.layers[-2].rng.random(5)  # advance the dropout generator
    return model, opt


def _save(path, model, opt, **meta):
    ckpt.save_checkpoint(path, model=model, optimizer=opt, rngs={"data": np.random.default_rng(7)},
                         epoch=3, step=opt.steps, config={"note": "test"}, **meta)


def test_round_trip_restores_everything(tmp_path):
    model, opt = _trained_pair()
    path = tmp_path / "checkpoint.npz"
    _save(path, model, opt)
    expected_draw = model.layers[-2].rng.random(3)

    fresh = tiny_model(seed=1)
    fresh_opt = SGD(fresh.named_parameters(), lr=0.1, weight_decay=1e-3)
    data_rng = np.random.default_rng(123)
    loaded = ckpt.load_checkpoint(tmp_path)  # a run folder resolves to its checkpoint.npz
    assert loaded.epoch == 3 and loaded.config == {"note": "test"}
    ckpt.restore(loaded, fresh, fresh_opt, rngs={"data": data_rng})
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    for k, v in opt.state_dict().items():
        np.testing.assert_array_equal(v, fresh_opt.state_dict()[k], err_msg=k)
    assert fresh_opt.steps == opt.steps == 2
    np.testing.assert_array_equal(fresh.layers[-2].rng.random(3), expected_draw)
    np.testing.assert_array_equal(data_rng.random(3), np.random.default_rng(7).random(3))


class _Killed(BaseException):
    """Stands in for a kill arriving in the middle of the write."""


def test_interrupted_write_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    model, opt = _trained_pair()
    path = tmp_path / "checkpoint.npz"
    _save(path, model, opt)
    good = path.read_bytes()

    real_savez = np.savez

    def half_write(f, **arrays):
        real_savez(f, **arrays)
        f.truncate(f.tell() // 2)  # half the bytes are on disk when the "kill" arrives
        raise _Killed

    monkeypatch.setattr(np, "savez", half_write)
    model.layers[0].params["kernel"] += 1.0
    with pytest.raises(_Killed):
        _save(path, model, opt)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["checkpoint.npz"], "the temporary file must be cleaned up"
    assert ckpt.load_checkpoint(path).epoch == 3


def test_sigkill_mid_write_leaves_a_whole_checkpoint(tmp_path):
    """A real process rewriting a 40 MB checkpoint in a loop, killed with SIGKILL at a random moment."""
    script = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {REPO!r})
        from tinyconv import Linear, Sequential
        from tinyconv.checkpoint import save_checkpoint
        model = Sequential([Linear(2000, 5000, name="fc")])
        for epoch in range(1, 10**6):
            model.layers[0].params["kernel"][...] = epoch
            save_checkpoint(sys.argv[1], model=model, epoch=epoch)
            print(epoch, flush=True)
    """)
    path = tmp_path / "checkpoint.npz"
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"
        time.sleep(0.05 + np.random.default_rng().random() * 0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    loaded = ckpt.load_checkpoint(path)
    kernel = loaded.model_state["fc/kernel"]
    assert loaded.epoch >= 1 and np.all(kernel == loaded.epoch), "weights and metadata come from one write"


def test_load_errors_are_clear(tmp_path):
    model, opt = _trained_pair()
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ckpt.load_checkpoint(tmp_path / "missing.npz")

    path = tmp_path / "checkpoint.npz"
    _save(path, model, opt)
    whole = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load_checkpoint(truncated)
    flipped = bytearray(whole)
    flipped[len(whole) // 3] ^= 0xFF  # one bad byte inside an array: the zip CRC catches it
    garbled = tmp_path / "garbled.npz"
    garbled.write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(garbled)
    text = tmp_path / "notes.npz"
    text.write_text("not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="not a readable checkpoint"):
        ckpt.load_checkpoint(text)
    plain = tmp_path / "weights.npz"
    model.save(plain)
    with pytest.raises(ckpt.CheckpointError, match="not a tinyconv checkpoint"):
        ckpt.load_checkpoint(plain)


def test_restore_rejects_mismatches(tmp_path):
    model, opt = _trained_pair()
    path = tmp_path / "checkpoint.npz"
    _save(path, model, opt)
    loaded = ckpt.load_checkpoint(path)
    wider = tiny_model(width=12)
    with pytest.raises(ckpt.CheckpointError, match="wrong shapes"):
        ckpt.restore(loaded, wider)
    other = tiny_model()
    with pytest.raises(ckpt.CheckpointError, match="optimizer 'sgd'"):
        ckpt.restore(loaded, other, Adam(other.named_parameters(), lr=1e-3))
    with pytest.raises(ckpt.CheckpointError, match="random generator 'loader'"):
        ckpt.restore(loaded, other, rngs={"loader": np.random.default_rng()})
    loaded.model_state["c1/kernel"][0, 0, 0, 0] = np.nan
    with pytest.raises(ckpt.CheckpointError, match="NaN"):
        ckpt.restore(loaded, other)
