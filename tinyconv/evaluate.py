"""Evaluation: loss, accuracy, per-class accuracy and the confusion matrix of a model on a labelled split.

``evaluate(model, data, ...)`` is the library call (the trainer uses it for validation and test);
``python -m tinyconv.evaluate CHECKPOINT`` rebuilds the checkpoint's model and data pipeline and reports on the
test split (or ``--split val``/``train``).
"""
import sys
import time
from dataclasses import dataclass

import numpy as np

from tinyconv.data import Normalization, iterate_batches
from tinyconv.loss import SoftmaxCrossEntropy


@dataclass
class EvalResult:
    """What ``evaluate`` measured.

    Attributes:
        loss: mean cross-entropy (with the label smoothing it was asked for).
        accuracy: fraction of correct top-1 predictions.
        confusion: (K, K) int64 counts, row = true class, column = predicted class.
        class_names: K names.
        seconds: wall time of the pass.
    """

    loss: float
    accuracy: float
    confusion: np.ndarray
    class_names: tuple
    seconds: float = 0.0

    @property
    def count(self):
        return int(self.confusion.sum())

    @property
    def per_class_accuracy(self):
        """(K,) recall of each class (NaN for a class absent from the data)."""
        support = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.diag(self.confusion) / support

    def report(self):
        """A human-readable table: overall numbers, per-class accuracy, confusion matrix."""
        names = [str(n) for n in self.class_names]
        width = max(8, max(len(n) for n in names))
        lines = [f"accuracy {100 * self.accuracy:.2f}% ({int(np.trace(self.confusion))}/{self.count}), "
                 f"loss {self.loss:.4f}", "", "per-class accuracy:"]
        for name, acc, support in zip(names, self.per_class_accuracy, self.confusion.sum(axis=1)):
            lines.append(f"  {name:<{width}} {100 * acc:6.2f}%  ({support} images)")
        lines += ["", "confusion matrix (rows: true class, columns: predicted class, in class order):"]
        cell = max(5, len(str(self.confusion.max())) + 1)
        lines.append(" " * (width + 2) + "".join(f"{i:>{cell}}" for i in range(len(names))))
        for i, (name, row) in enumerate(zip(names, self.confusion)):
            lines.append(f"  {name:<{width}}" + "".join(f"{v:>{cell}}" for v in row) + f"   {i}")
        return "\n".join(lines)


def predict_logits(model, images, *, normalization=None, batch_size=256):
    """Logits of ``model`` in inference mode for uint8 images.

    Args:
        model: a Sequential.
        images: (N, H, W, C) uint8, prepared like the training data.
        normalization: the training run's Normalization (None: scale to [0, 1]).
        batch_size: images per forward call.

    Returns:
        (N, K) float array.
    """
    labels = np.zeros(len(images), np.int64)
    out = [model.forward(x, training=False)
           for x, _ in iterate_batches((images, labels), batch_size, shuffle=False, normalization=normalization)]
    return np.concatenate(out)


def evaluate(model, data, *, normalization=None, batch_size=256, label_smoothing=0.0, class_names=None):
    """Loss, accuracy and confusion matrix of ``model`` on labelled data, in inference mode.

    Args:
        model: a Sequential whose output is (N, K) logits.
        data: a ``tinyconv.data.Dataset`` or a tuple (images (N, H, W, C) uint8, labels (N,) int).
        normalization: the training run's Normalization (None: scale to [0, 1]).
        batch_size: images per forward call.
        label_smoothing: smoothing of the reported loss (the trainer passes its own, so train and validation
            losses are comparable).
        class_names: names for the report; default the Dataset's, else '0'..'K-1'.

    Returns:
        EvalResult.
    """
    images, labels = (data.images, data.labels) if hasattr(data, "images") else data
    labels = np.asarray(labels, np.int64)
    start = time.perf_counter()
    loss_fn = SoftmaxCrossEntropy(label_smoothing)
    total_loss, confusion = 0.0, None
    for x, y in iterate_batches((images, labels), batch_size, shuffle=False, normalization=normalization):
        logits = model.forward(x, training=False)
        if confusion is None:
            confusion = np.zeros((logits.shape[1], logits.shape[1]), np.int64)
        total_loss += loss_fn.forward(logits, y) * len(y)
        np.add.at(confusion, (y, logits.argmax(axis=1)), 1)
    if confusion is None:
        raise ValueError("evaluate needs at least one example")
    names = class_names or getattr(data, "class_names", None) or tuple(str(i) for i in range(len(confusion)))
    n = int(confusion.sum())
    return EvalResult(loss=total_loss / n, accuracy=float(np.trace(confusion)) / n, confusion=confusion,
                      class_names=tuple(names), seconds=time.perf_counter() - start)


def main(argv=None):
    """``python -m tinyconv.evaluate CHECKPOINT``: accuracy, per-class accuracy and confusion matrix."""
    from tinyconv import train  # the command-line helpers that rebuild a run's model and data
    from tinyconv.threads import set_threads
    parser = train.ArgumentParser(prog="python -m tinyconv.evaluate",
                                  description="Evaluate a tinyconv checkpoint on its dataset's test split.")
    parser.add_argument("checkpoint", help="a checkpoint.npz, or the run folder holding one")
    parser.add_argument("--split", choices=("test", "val", "train"), default="test",
                        help="which split to evaluate (val: the run's held-out part of train)")
    parser.add_argument("--data-dir", default=None, help="folder holding the dataset (default: the run's)")
    parser.add_argument("--batch-size", type=train.positive_int, default=500, help="images per forward call")
    parser.add_argument("--threads", type=train.positive_int, default=None, help="threads (default: all cores)")
    args = parser.parse_args(argv)
    try:
        model, ckpt = train.model_from_checkpoint(args.checkpoint)
        data_cfg = dict(ckpt.config["data"], **({"data_dir": args.data_dir} if args.data_dir else {}))
        split = train.load_data(data_cfg, splits=(args.split,))[args.split]
        if split is None:
            parser.error("the run held out no validation images; use --split test or train")
        set_threads(args.threads)
        result = evaluate(model, split, normalization=Normalization.from_dict(ckpt.meta["normalization"]),
                          batch_size=args.batch_size)
    except (OSError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    print(f"{ckpt.path} (epoch {ckpt.epoch}), {data_cfg['dataset']} {args.split}: {result.count} images, "
          f"{result.count / result.seconds:,.0f} images/s")
    print(result.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
