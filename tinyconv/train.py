"""Training: the ``fit`` loop and the ``python -m tinyconv.train`` command line.

``fit(model, train_data, val_data, ...)`` runs minibatch training with a schedule, evaluates every epoch, and, given
an output folder, checkpoints every epoch (atomically), keeps ``metrics.csv`` and ``curves.png`` up to date and
can resume a run exactly: the data order and augmentation are pure functions of (seed, epoch, batch)
(``tinyconv.data``), the dropout generators' states, the optimizer's buffers and the global step are in the
checkpoint, so a run interrupted and resumed ends with the same weights as one that was not (same seed and
thread count: Numba's parallel reductions and BLAS split work by thread, so other counts round differently).

The command line's defaults are the README's default run: MobileNet v1 alpha 0.5 on Fashion-MNIST padded to
32x32, 13 epochs (90.55% test accuracy in about 4 minutes on 2 cores), batch 128, SGD with Nesterov momentum 0.9,
lr 0.1 with one warm-up epoch then cosine to 0, weight decay 5e-4 (not on BN or biases), label smoothing 0.1,
dropout 0.2, random crop (pad 4) and horizontal flip, batch-norm momentum 0.9 in Keras's convention (PyTorch's
default).

Layering: ``tinyconv`` never imports ``models``, except here: the command line has to build the network it is
asked for, so ``build_model`` imports ``models`` inside the function, at call time. The library (``fit``) takes a
model the caller built and never needs ``models``.
"""
import argparse
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from tqdm import tqdm

from tinyconv import checkpoint as ckpt
from tinyconv.data import (Augment, DatasetError, Normalization, iterate_batches, load_dataset, num_batches,
                           prepare, split_holdout)
from tinyconv.evaluate import evaluate
from tinyconv.io import atomic_write
from tinyconv.loss import SoftmaxCrossEntropy
from tinyconv.optim import SCHEDULES, LRSchedule, OPTIMIZERS, make_optimizer
from tinyconv.threads import blas_override_note, set_threads

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "folder")
MODELS = ("mobilenet", "small")
METRICS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s")
DEFAULT_AUGMENT = Augment(crop_padding=4, pad_mode="zero", flip=True)  # torchvision's RandomCrop(32, padding=4)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left in place."""


@dataclass
class FitResult:
    """What ``fit`` did.

    Attributes:
        history: one dict per epoch with the METRICS keys (val_* are NaN without validation data).
        test: EvalResult on ``test_data`` after the last epoch, or None.
        train_seconds: wall time of the training loops (all epochs, including resumed ones; no evaluation).
        images_per_s: training images per second over those loops.
        out: the output folder, or None.
    """

    history: list = field(default_factory=list)
    test: object = None
    train_seconds: float = 0.0
    images_per_s: float = 0.0
    out: str = None


def fit(model, train_data, val_data=None, *, test_data=None, epochs=10, batch_size=128, optimizer="sgd", lr=0.1,
        momentum=0.9, nesterov=True, schedule="cosine", warmup_epochs=1.0, weight_decay=5e-4, label_smoothing=0.1,
        augment=DEFAULT_AUGMENT, normalization=None, seed=0, out=None, resume=False, progress=True, config=None,
        on_step=None, log=print):
    """Train ``model`` on ``train_data``, evaluating on ``val_data`` every epoch and on ``test_data`` at the end.

    Args:
        model: a Sequential producing (N, K) logits; trained in place.
        train_data: a ``tinyconv.data.Dataset`` (or tuple (images, labels)) of prepared uint8 (N, H, W, C) images.
        val_data: same, or None.
        test_data: same, or None.
        epochs: number of passes over ``train_data``.
        batch_size: images per step; each epoch drops its last incomplete batch (every step sees a full batch).
        optimizer: 'sgd' (momentum, ``nesterov``), 'rmsprop' (TF 1's, with ``momentum``) or 'adam' (AdamW).
        lr: peak learning rate.
        momentum, nesterov: momentum for SGD and RMSProp; Nesterov for SGD.
        schedule: 'cosine' (to 0 at the end), 'step' (x0.1 at 50% and 75%) or 'constant'.
        warmup_epochs: linear warm-up length in epochs (may be fractional), counted in steps.
        weight_decay: L2 on kernels and weight matrices, never on BN parameters or biases (see tinyconv.optim).
        label_smoothing: for the training loss (and the reported validation loss, so both compare).
        augment: a ``tinyconv.data.Augment`` applied to training batches, or None.
        normalization: a ``tinyconv.data.Normalization``; None fits one on ``train_data``.
        seed: data order and augmentation seed (the model's initialization is the caller's).
        out: folder for ``checkpoint.npz``, ``metrics.csv``, ``curves.png`` and ``summary.json``; None keeps
            nothing on disk.
        resume: continue from ``out/checkpoint.npz`` if it exists; the training settings must match the saved
            ones (a ValueError lists the differences).
        progress: show a tqdm bar per epoch (loss, accuracy, images/s).
        config: extra JSON-serializable run description saved in the checkpoint (the CLI puts the model and data
            settings here, which ``tinyconv.evaluate`` and ``tinyconv.predict`` use to rebuild the run).
        on_step: optional ``fn(epoch, batch, loss)`` called after every optimizer step (0-based epoch and batch).
        log: where per-epoch lines go (``print``; ``None`` for silence).

    Returns:
        FitResult.

    Raises:
        TrainingDiverged: the loss became NaN or Inf; nothing is written for the epoch it happened in.
        KeyboardInterrupt: propagated as is; the last checkpoint (end of the previous epoch) stays whole.
    """
    log = log or (lambda *a, **k: None)
    train_images, train_labels = _arrays(train_data)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= len(train_images):
        raise ValueError(f"batch_size must be an int in [1, {len(train_images)}] (the training set size), "
                         f"got {batch_size!r}")
    if normalization is None:
        normalization = Normalization.fit(train_images)
    settings = dict(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum,
                    nesterov=nesterov, schedule=schedule, warmup_epochs=warmup_epochs, weight_decay=weight_decay,
                    label_smoothing=label_smoothing, augment=asdict(augment) if augment else None, seed=seed)
    steps_per_epoch = num_batches(len(train_images), batch_size, drop_last=True)
    total_steps = epochs * steps_per_epoch
    sched = LRSchedule(schedule, lr=lr, total_steps=total_steps,
                       warmup_steps=min(round(warmup_epochs * steps_per_epoch), total_steps))
    opt = _make_optimizer(optimizer, model, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    loss_fn = SoftmaxCrossEntropy(label_smoothing)
    ckpt_path = os.path.join(out, ckpt.FILENAME) if out else None
    meta = dict(config=config or {}, train=settings, normalization=normalization.to_dict(),
                class_names=list(getattr(train_data, "class_names", ())), input_shape=list(train_images.shape[1:]))

    result = FitResult(out=out)
    start_epoch = 0
    if resume and ckpt_path and os.path.exists(ckpt_path):
        saved = ckpt.load_checkpoint(ckpt_path)
        diff = {k: (saved.meta.get("train", {}).get(k), v) for k, v in settings.items()
                if saved.meta.get("train", {}).get(k) != v}
        if diff:
            raise ValueError(f"{ckpt_path}: cannot resume with different settings: "
                             + ", ".join(f"{k} saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        ckpt.restore(saved, model, opt)
        start_epoch, result.history = saved.epoch, saved.meta.get("history", [])
        result.train_seconds = saved.meta.get("train_seconds", 0.0)
        log(f"resumed {ckpt_path} after epoch {start_epoch}/{epochs}")

    for epoch in range(start_epoch, epochs):
        model.train()
        row, seconds = _train_epoch(model, opt, loss_fn, sched, (train_images, train_labels), epoch=epoch,
                                    epochs=epochs, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                                    augment=augment, normalization=normalization, seed=seed, progress=progress,
                                    on_step=on_step, ckpt_path=ckpt_path)
        result.train_seconds += seconds
        model.eval()
        if val_data is not None:
            val = evaluate(model, val_data, normalization=normalization, label_smoothing=label_smoothing)
            row.update(val_loss=val.loss, val_acc=val.accuracy)
        else:
            row.update(val_loss=math.nan, val_acc=math.nan)
        result.history.append(row)
        if out:
            ckpt.save_checkpoint(ckpt_path, model=model, optimizer=opt, epoch=epoch + 1, step=opt.steps,
                                 history=result.history, train_seconds=result.train_seconds, **meta)
            write_metrics(os.path.join(out, "metrics.csv"), result.history)
            plot_curves(os.path.join(out, "curves.png"), result.history)
        log(_epoch_line(row, epochs))

    seen = sum(r["seconds"] * r["images_per_s"] for r in result.history)
    result.images_per_s = seen / result.train_seconds if result.train_seconds else 0.0
    model.eval()
    if test_data is not None:
        result.test = evaluate(model, test_data, normalization=normalization)
    return result


def _arrays(data):
    images, labels = (data.images, data.labels) if hasattr(data, "images") else data
    return images, np.asarray(labels, np.int64)


def _make_optimizer(kind, model, *, lr, momentum, nesterov, weight_decay):
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {kind!r}")
    extra = {"sgd": dict(momentum=momentum, nesterov=nesterov), "rmsprop": dict(momentum=momentum), "adam": {}}
    return make_optimizer(kind, model.named_parameters(), lr=lr, weight_decay=weight_decay, **extra[kind])


def _train_epoch(model, opt, loss_fn, sched, arrays, *, epoch, epochs, batch_size, steps_per_epoch, augment,
                 normalization, seed, progress, on_step, ckpt_path):
    """One pass over the training data; returns the epoch's metrics row (without validation) and its seconds."""
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress,
               leave=False, dynamic_ncols=True, file=sys.stderr)
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    try:
        batches = iterate_batches(arrays, batch_size, seed=seed, epoch=epoch, drop_last=True, augment=augment,
                                  normalization=normalization)
        for b, (x, y) in enumerate(batches):
            step = epoch * steps_per_epoch + b
            opt.lr = sched(step)
            model.zero_grad()
            logits = model.forward(x, training=True)
            loss = loss_fn.forward(logits, y) if np.isfinite(logits).all() else math.nan
            if not math.isfinite(loss):
                where = f"the last good checkpoint is {ckpt_path}" if ckpt_path and os.path.exists(ckpt_path) \
                    else "no checkpoint was written"
                raise TrainingDiverged(f"loss became NaN or Inf at epoch {epoch + 1}, batch {b + 1} "
                                       f"(lr {opt.lr:.4g}); training stopped and {where}. Try a lower --lr or a "
                                       f"longer warm-up.")
            model.backward(loss_fn.backward())
            opt.step()
            loss_sum += loss * len(y)
            correct += int(np.count_nonzero(logits.argmax(axis=1) == y))
            seen += len(y)
            if on_step is not None:
                on_step(epoch, b, loss)
            bar.update(1)
            if progress and (b % 10 == 0 or b == steps_per_epoch - 1):
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.2f}%",
                                img_s=f"{seen / elapsed:,.0f}", refresh=False)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    return dict(epoch=epoch + 1, train_loss=loss_sum / seen, train_acc=correct / seen, lr=opt.lr, seconds=seconds,
                images_per_s=seen / seconds), seconds


def _epoch_line(row, epochs):
    val = f", val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}%" if not math.isnan(row["val_acc"]) \
        else ""
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%"
            f"{val}, lr {row['lr']:.4g}, {row['seconds']:.1f} s, {row['images_per_s']:,.0f} images/s")


def write_metrics(path, history):
    """Write the per-epoch metrics as CSV (rewritten whole each epoch from the history, so it always matches the
    checkpoint, also after a resume)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRICS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in METRICS})
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def plot_curves(path, history):
    """Save a PNG of train and validation accuracy and loss against epoch (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [r["epoch"] for r in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax_acc, "acc", "accuracy (%)"), (ax_loss, "loss", "loss")):
        scale = 100 if key == "acc" else 1
        ax.plot(epochs, [scale * r[f"train_{key}"] for r in history], "o-", label="train")
        if not all(math.isnan(r[f"val_{key}"]) for r in history):
            ax.plot(epochs, [scale * r[f"val_{key}"] for r in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


# ---------------------------------------------------------------------------------------------------------------
# Run description -> data and model (shared by the train, evaluate and predict command lines)
# ---------------------------------------------------------------------------------------------------------------

def input_geometry(image_hw, res):
    """How images of size ``image_hw`` become ``res`` x ``res`` inputs: (resize, pad_to) for ``data.prepare``.

    Images smaller than 32 (MNIST's 28x28) keep their framing inside a 32 grid: at res 32 they are zero-padded,
    at larger res resized by res / 32 first and then padded (28 -> 56 -> 64 at res 64). Larger images (CIFAR's
    32x32, image folders) are resized to res.
    """
    h, w = image_hw
    if h < 32 and w < 32:
        inner = (round(h * res / 32), round(w * res / 32))
        return (None if inner == (h, w) else inner), res
    return (None if (h, w) == (res, res) else res), None


def load_data(cfg, splits=("train", "val", "test")):
    """Load and prepare the splits a run description names.

    Args:
        cfg: the run's ``data`` settings: dataset, data_dir, res, in_channels, val (held-out count), seed,
            limit_train, limit_test. The dataset's native image size is recorded in it as ``image_size``
            (prediction prepares image files from that size, like the training images).
        splits: which of 'train', 'val', 'test' to return.

    Returns:
        {split: Dataset or None}; 'val' is None when the run holds out nothing.
    """
    out = {}
    if {"train", "val"} & set(splits):
        train = load_dataset(cfg["dataset"], split="train", data_dir=cfg.get("data_dir"),
                             classes_subset=cfg.get("classes_subset"))
        if cfg.get("limit_train"):
            train = _head(train, cfg["limit_train"])
        cfg["image_size"] = list(train.images.shape[1:3])
        geometry = input_geometry(train.images.shape[1:3], cfg["res"])
        train = prepare(train, resize=geometry[0], pad_to=geometry[1], in_channels=cfg.get("in_channels"))
        val = None
        if cfg.get("val"):
            train, val = split_holdout(train, cfg["val"], seed=cfg.get("seed", 0))
        out.update(train=train, val=val)
    if "test" in splits:
        test = load_dataset(cfg["dataset"], split="test", data_dir=cfg.get("data_dir"),
                            classes_subset=cfg.get("classes_subset"))
        if cfg.get("limit_test"):
            test = _head(test, cfg["limit_test"])
        cfg["image_size"] = list(test.images.shape[1:3])
        geometry = input_geometry(test.images.shape[1:3], cfg["res"])
        out["test"] = prepare(test, resize=geometry[0], pad_to=geometry[1], in_channels=cfg.get("in_channels"))
    return {s: out[s] for s in splits}


def _head(dataset, n):
    return replace(dataset, images=dataset.images[:n], labels=dataset.labels[:n])


def build_model(cfg):
    """Build the network a run description names, through ``models.build``.

    This is the one place in ``tinyconv`` that imports ``models``, lazily, because a command line must turn a
    model name into layers; the library itself never does.
    """
    import models
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    return models.build(cfg["name"], **kwargs)


def model_from_checkpoint(path):
    """Rebuild a command-line run's model from its checkpoint and load the weights.

    Returns:
        (model in eval mode, Checkpoint).
    """
    saved = ckpt.load_checkpoint(path)
    cfg = saved.config.get("model")
    if not cfg:
        raise ckpt.CheckpointError(f"{saved.path} does not say how to build its model (it was not written by "
                                   "python -m tinyconv.train); load it with checkpoint.restore into a model you "
                                   "build yourself")
    model = build_model(cfg)
    ckpt.restore(saved, model)
    return model.eval(), saved


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: ``prog: error: <reason> (see --help)`` on stderr, exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, check, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (kind is float and not math.isfinite(value)) or not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonnegative_float = _number(float, lambda v: v >= 0, "a number >= 0")
resolution = _number(int, lambda v: v >= 32, "an integer >= 32")
unit_interval = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def class_list(text):
    """Parse ``0-9`` or ``0,3,5`` or ``0-4,7`` into a list of distinct class indices, in the order given."""
    what = "class indices like 0-9 or 0,3,5"
    classes = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if sep else int(lo)
            if first < 0 or last < first:
                raise ValueError
            classes.extend(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if len(set(classes)) != len(classes):
        raise argparse.ArgumentTypeError(f"expected {what} without repeats, got {text!r}")
    return classes


def make_parser(prog="python -m tinyconv.train",
                description="Train MobileNet v1 with tinyconv. The defaults are the README's default run."):
    """The training command line; ``bench.torch_train`` parses the same one under its own name."""
    p = ArgumentParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="fashion-mnist", help="dataset to train on")
    g.add_argument("--data-dir", default=None, help="folder holding the dataset (default: $TINYCONV_DATA, then "
                                                    "/usr/share/datasets/<dataset>)")
    g.add_argument("--classes-subset", type=class_list, default=None,
                   help="train on these classes only, relabelled 0..k-1 (e.g. 0-9: the first ten of CIFAR-100)")
    g.add_argument("--val", type=nonnegative_int, default=5000,
                   help="training images held out (seeded) for validation; 0 trains on all")
    g.add_argument("--limit-train", type=positive_int, default=None, help="use only the first N training images")
    g.add_argument("--limit-test", type=positive_int, default=None, help="use only the first N test images")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODELS, default="mobilenet",
                   help="architecture (small: models.small_cnn, for quick checks)")
    g.add_argument("--alpha", type=positive_float, default=0.5, help="MobileNet width multiplier")
    g.add_argument("--res", type=resolution, default=32, help="input resolution (28x28 images are padded to 32)")
    g.add_argument("--shallow", action="store_true", help="drop the five 14x14x512 blocks (paper's shallow net)")
    g.add_argument("--full-conv", action="store_true", help="standard 3x3 convs instead of separable blocks")
    g.add_argument("--dropout", type=unit_interval, default=0.2, help="dropout rate before the classifier")
    g.add_argument("--bn-momentum", type=unit_interval, default=0.9,
                   help="batch-norm moving-average momentum, Keras's convention (PyTorch's default 0.1 is 0.9 "
                        "here); Keras's 0.99 leaves the moving statistics stale in runs of a few thousand steps")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=13, help="passes over the training images")
    g.add_argument("--batch-size", type=positive_int, default=128, help="images per step")
    g.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd",
                   help="sgd: momentum + Nesterov; rmsprop: TF 1's, as the paper; adam: AdamW")
    g.add_argument("--lr", type=positive_float, default=0.1, help="peak learning rate")
    g.add_argument("--momentum", type=unit_interval, default=0.9, help="momentum (sgd, rmsprop)")
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="classical momentum for sgd")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="learning-rate schedule after warm-up")
    g.add_argument("--warmup", type=nonnegative_float, default=1.0, help="linear warm-up, in epochs")
    g.add_argument("--weight-decay", type=nonnegative_float, default=5e-4,
                   help="L2 on kernels (never BN or biases); decoupled for adam")
    g.add_argument("--label-smoothing", type=unit_interval, default=0.1, help="label smoothing")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random crop (pad 4) and horizontal flip")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the initialization, data order, "
                                                                   "augmentation, dropout and validation split")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder (default: runs/<date>-<time>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its saved settings")
    g.add_argument("--threads", type=positive_int, default=None, help="threads for kernels and BLAS "
                                                                      "(default: all cores)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def run_description(args):
    """The model, data and training settings of a fresh run, as saved in its checkpoint."""
    model = dict(name=args.model, resolution=args.res, dropout=args.dropout, bn_momentum=args.bn_momentum,
                 classes=None, in_channels=None, seed=args.seed)
    if args.model == "mobilenet":
        model.update(alpha=args.alpha, shallow=args.shallow, full_conv=args.full_conv)
    data = dict(dataset=args.dataset, data_dir=args.data_dir, res=args.res, val=args.val, seed=args.seed,
                limit_train=args.limit_train, limit_test=args.limit_test, classes_subset=args.classes_subset)
    train = dict(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                 momentum=args.momentum, nesterov=args.nesterov, schedule=args.schedule, warmup_epochs=args.warmup,
                 weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                 augment=asdict(DEFAULT_AUGMENT) if args.augment else None, seed=args.seed)
    return dict(model=model, data=data), train


def main(argv=None):
    """``python -m tinyconv.train``: train, checkpoint every epoch, report test accuracy. Returns the exit code."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.dataset == "folder" and not args.data_dir:
        parser.error("--dataset folder needs --data-dir DIR (one subfolder per class; DIR/train and DIR/test if "
                     "the test images are kept apart)")
    started = time.perf_counter()
    if args.resume:
        if not args.out:
            parser.error("--resume needs --out DIR, the folder of the run to continue")
        try:
            saved = ckpt.load_checkpoint(args.out)
        except (OSError, ValueError) as e:
            parser.error(f"cannot resume: {e}")
        config, train = saved.config, saved.meta["train"]
    else:
        out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        if os.path.exists(os.path.join(out, ckpt.FILENAME)):
            parser.error(f"{out} already holds a checkpoint; pass --resume to continue it, or choose another --out")
        args.out = out
        config, train = run_description(args)
    threads = set_threads(args.threads)
    note = blas_override_note()
    if note:
        print(note, file=sys.stderr)
    if args.resume and saved.config.get("threads") not in (None, threads):
        print(f"note: the run used {saved.config['threads']} threads, now {threads}; the result will differ from "
              f"an uninterrupted run in the last bits", file=sys.stderr)
    config["threads"] = threads
    try:
        data = load_data(config["data"])
        model_cfg = dict(config["model"])
        model_cfg["classes"] = model_cfg["classes"] or data["train"].num_classes
        model_cfg["in_channels"] = model_cfg["in_channels"] or data["train"].image_shape[2]
        config["model"] = model_cfg
        model = build_model(model_cfg)
    except (DatasetError, ValueError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 1
    augment = Augment(**train["augment"]) if train["augment"] else None
    print(f"{model.name}: {model.param_count():,} parameters, {model.macs() / 1e6:.1f}M mult-adds; "
          f"{len(data['train']):,} training / {len(data['val']) if data['val'] else 0:,} validation / "
          f"{len(data['test']):,} test images; {threads} threads; out {args.out}")
    try:
        result = fit(model, data["train"], data["val"], test_data=data["test"],
                     **{**train, "augment": augment}, out=args.out, resume=args.resume, progress=args.progress,
                     config=config)
    except TrainingDiverged as e:
        print(f"train: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        path = os.path.join(args.out, ckpt.FILENAME)
        kept = f"the last good checkpoint is {path}; continue with --resume --out {args.out}" \
            if os.path.exists(path) else "no epoch finished, so there is no checkpoint"
        print(f"\ntrain: interrupted; {kept}", file=sys.stderr)
        return 130
    wall = time.perf_counter() - started
    summary = dict(test_acc=result.test.accuracy, test_loss=result.test.loss, params=model.param_count(),
                   mult_adds=model.macs(), epochs=train["epochs"], train_seconds=result.train_seconds,
                   wall_seconds=wall, images_per_s=result.images_per_s, threads=threads,
                   command="python -m tinyconv.train " + " ".join(sys.argv[1:] if argv is None else argv))
    atomic_write(os.path.join(args.out, "summary.json"), lambda f: f.write(json.dumps(summary, indent=2).encode()))
    print(f"test accuracy {100 * result.test.accuracy:.2f}% | {model.param_count():,} parameters | "
          f"{model.macs() / 1e6:.1f}M mult-adds | training {result.train_seconds:.1f} s "
          f"({result.images_per_s:,.0f} images/s) | wall {wall:.1f} s | {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
