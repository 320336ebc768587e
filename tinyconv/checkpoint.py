"""Training checkpoints: one ``.npz`` holding everything needed to continue a run exactly.

Layout of the file (``np.savez``, no pickles):
    ``model/<layer>/<name>``    every parameter and buffer (``Sequential.state_dict``)
    ``optim/<layer>/<name>/<slot>``, ``optim/steps``    the optimizer's state (``Optimizer.state_dict``)
    ``meta``    a 0-d string holding JSON: format tag and version, epoch, global step, the full run config,
                the optimizer's kind and hyperparameters, the metrics history, and the states of every random
                generator the run draws from (data order and augmentation, each dropout layer's masks).

The file is written with ``tinyconv.io.atomic_write`` (temporary file in the same folder, fsync, rename), so a
kill at any moment leaves the previous checkpoint whole. Loading validates the format and reports a corrupt,
truncated or mismatched file in one sentence naming it.
"""
import json
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from tinyconv.io import atomic_write
from tinyconv.sequential import StateError

FORMAT = "tinyconv-checkpoint"
VERSION = 1
FILENAME = "checkpoint.npz"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupt, or does not fit the model or optimizer it is loaded into."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        meta: the JSON metadata (``epoch``, ``step``, ``config``, ``optimizer``, ``history``, ``rng``...).
        model_state: ``{name: array}`` for ``Sequential.load_state_dict``.
        optimizer_state: ``{name: array}`` for ``Optimizer.load_state_dict`` (empty if none was saved).
        path: where it was read from.
    """

    meta: dict
    model_state: dict
    optimizer_state: dict = field(default_factory=dict)
    path: str = ""

    @property
    def epoch(self):
        """Number of completed epochs."""
        return int(self.meta.get("epoch", 0))

    @property
    def config(self):
        """The run's configuration (what ``python -m tinyconv.train`` was called with, resolved)."""
        return self.meta.get("config", {})


def model_rngs(model):
    """The random generators a model's layers own (dropout masks), by ``layer/<name>``."""
    return {f"layer/{layer.name}": layer.rng for layer in model.layers
            if isinstance(getattr(layer, "rng", None), np.random.Generator)}


def resolve(path):
    """A checkpoint path: a file, or a run folder holding ``checkpoint.npz``."""
    path = os.fspath(path)
    return os.path.join(path, FILENAME) if os.path.isdir(path) else path


def save_checkpoint(path, *, model, optimizer=None, rngs=None, **meta):
    """Write a checkpoint atomically.

    Args:
        path: destination ``.npz`` file.
        model: the ``Sequential`` whose parameters and buffers are saved; its dropout generators are saved too.
        optimizer: optional optimizer whose state is saved (kind and hyperparameters go to ``meta``).
        rngs: extra ``{name: np.random.Generator}`` to save (e.g. the data order), restored by ``restore``.
        **meta: JSON-serializable metadata: ``epoch``, ``step``, ``config``, ``history``...
    """
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None:
        arrays.update({f"optim/{k}": v for k, v in optimizer.state_dict().items()})
        meta["optimizer"] = {"kind": optimizer.kind, **optimizer.hyperparameters()}
    generators = {**model_rngs(model), **(rngs or {})}
    meta["rng"] = {name: g.bit_generator.state for name, g in generators.items()}
    meta = {"format": FORMAT, "version": VERSION, **meta}
    arrays["meta"] = np.array(json.dumps(meta))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path):
    """Read and validate a checkpoint written by ``save_checkpoint``.

    Args:
        path: the ``.npz`` file, or a run folder holding ``checkpoint.npz``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: the file is not a readable tinyconv checkpoint (truncated, corrupt, wrong format or version).
    """
    path = resolve(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated: {e})") from None
    if "meta" not in arrays:
        raise CheckpointError(f"{path} is an .npz file but not a tinyconv checkpoint (no 'meta' entry)")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError as e:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tinyconv checkpoint (format tag {meta.get('format')!r})"
                              if isinstance(meta, dict) else f"{path}: checkpoint metadata is not an object")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r} is not supported "
                              f"(this tinyconv reads version {VERSION})")
    model_state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    optim_state = {k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")}
    if not model_state:
        raise CheckpointError(f"{path}: checkpoint holds no model weights")
    return Checkpoint(meta=meta, model_state=model_state, optimizer_state=optim_state, path=path)


def restore(ckpt, model, optimizer=None, rngs=None):
    """Load a checkpoint's weights, buffers, optimizer state and generator states in place.

    Args:
        ckpt: a ``Checkpoint`` (from ``load_checkpoint``).
        model: the ``Sequential`` to fill; must have the checkpoint's architecture.
        optimizer: if given, its state is restored; its kind must match the saved one.
        rngs: ``{name: np.random.Generator}`` to restore, with the names used when saving.

    Raises:
        CheckpointError: naming the file and what does not fit.
    """
    try:
        model.load_state_dict(ckpt.model_state)
    except StateError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    if optimizer is not None:
        saved = ckpt.meta.get("optimizer", {}).get("kind")
        if saved != optimizer.kind:
            raise CheckpointError(f"{ckpt.path}: checkpoint has optimizer {saved!r}, the run uses {optimizer.kind!r}")
        try:
            optimizer.load_state_dict(ckpt.optimizer_state)
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
    saved_rngs = ckpt.meta.get("rng", {})
    for name, g in {**model_rngs(model), **(rngs or {})}.items():
        if name not in saved_rngs:
            raise CheckpointError(f"{ckpt.path}: checkpoint holds no state for random generator {name!r}")
        try:
            g.bit_generator.state = saved_rngs[name]
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{ckpt.path}: bad state for random generator {name!r} ({e})") from None
