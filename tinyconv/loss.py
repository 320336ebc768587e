"""Softmax cross-entropy as a loss object: forward returns the mean loss, backward the logits' gradient."""
from kernels import loss as loss_k


class SoftmaxCrossEntropy:
    """Fused softmax + cross-entropy, mean over the batch, optional label smoothing.

    Args:
        label_smoothing: ls in [0, 1): targets are (1 - ls) one-hot + ls / K, as Keras and PyTorch.
    """

    def __init__(self, label_smoothing=0.0):
        if isinstance(label_smoothing, bool) or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self._cache = None

    def forward(self, logits, labels):
        """Mean loss over the batch (a Python float); keeps the probabilities for backward.

        Args:
            logits: (N, K) float array.
            labels: (N,) integer class indices in [0, K).
        """
        loss, probs = loss_k.softmax_cross_entropy_forward(logits, labels, label_smoothing=self.label_smoothing)
        self._cache = (probs, labels)
        return loss

    __call__ = forward

    @property
    def probs(self):
        """Softmax probabilities (N, K) of the last forward call."""
        return None if self._cache is None else self._cache[0]

    def backward(self, scale=1.0):
        """Gradient of ``scale`` x the mean loss with respect to the logits, (N, K)."""
        if self._cache is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward called without a preceding forward")
        probs, labels = self._cache
        self._cache = None
        return loss_k.softmax_cross_entropy_backward(probs, labels, label_smoothing=self.label_smoothing,
                                                     scale=scale)
