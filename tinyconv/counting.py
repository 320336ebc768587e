"""The counting convention, stated once, and the counts of a model under it.

Convention (the MobileNet paper's, and the default everywhere in tinyconv):

* A **mult-add** (MAC) is one multiply-accumulate ``y += w * x``. A layer's mult-adds are counted at its output
  resolution: a KH x KW conv from C to K channels producing OH x OW costs ``OH * OW * KH * KW * C * K``, whatever
  its stride and padding (taps that land in the zero padding are counted, as the paper's formulas do).
* Only the main op of convolutions (standard, depthwise, pointwise) and fully connected layers costs anything by
  default. Bias adds, batch norm (one multiply-add per element once folded into a scale and a shift), activations
  (one op per element) and pooling (one op per window element) are free; each has a flag that counts it, and a
  counted extra op counts as one mult-add.
* **FLOPs = 2 x mult-adds**, always; every table, header and JSON field names which of the two it shows.
* **Parameters** three ways: ``paper`` = conv and FC weights only (no biases, no batch norm), as the paper counts;
  ``trainable`` = every trained number (weights, biases, BN gamma and beta), as Keras's "Trainable params";
  ``total`` = trainable plus buffers (BN moving mean and variance), as Keras's "Total params".

Everything here only adds up what each layer reports (``macs``, ``extra_ops``, ``param_count``): no layer's cost
is computed twice. Counting needs shapes only and compiles no kernel.
"""
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

from tinyconv.layer import EXTRA_KINDS

MACS_LABEL = "mult-adds (MACs)"
FLOPS_LABEL = "FLOPs (2 x mult-adds)"
WEIGHT_KINDS = ("conv", "depthwise", "pointwise", "linear")
"""Layer kinds whose non-bias parameters are weights in the paper's parameter count."""


@dataclass(frozen=True)
class Convention:
    """Which of the ops that are free by default to count, each as one mult-add per op.

    Attributes:
        bias: bias adds (one per output element of a layer with a bias).
        bn: batch norm's folded scale-and-shift (one multiply-add per element).
        activation: activations (one op per element).
        pool: pooling (one op per window element).
    """
    bias: bool = False
    bn: bool = False
    activation: bool = False
    pool: bool = False

    def extra(self, ops):
        """Sum of the ops in ``ops`` (a layer's ``extra_ops``) whose kind this convention counts."""
        unknown = set(ops) - set(EXTRA_KINDS)
        if unknown:
            raise ValueError(f"unknown extra op kinds {sorted(unknown)}; expected some of {EXTRA_KINDS}")
        return sum(n for kind, n in ops.items() if getattr(self, kind))

    def describe(self):
        """One line stating the convention in words, for headers."""
        counted = [k for k in EXTRA_KINDS if getattr(self, k)]
        free = [k for k in EXTRA_KINDS if not getattr(self, k)]
        words = "conv/FC multiply-accumulates at the output resolution"
        if counted:
            words += f" + {', '.join(counted)} (one mult-add per op)"
        if free:
            words += f"; free: {', '.join(free)}"
        return words


DEFAULT = Convention()


class LayerCount(NamedTuple):
    """Counts of one layer for one sample.

    Attributes:
        name, type: the layer's name and ``type_label`` ('Conv 1x1', 'Conv DW 3x3', 'FC', 'BatchNorm'...).
        input_shape, output_shape: per-sample shapes.
        params_paper, params_trainable, params_total: the three parameter counts (see the module docstring).
        macs: mult-adds of the main op plus the extra ops the convention counts.
    """
    name: str
    type: str
    input_shape: tuple
    output_shape: tuple
    params_paper: int
    params_trainable: int
    params_total: int
    macs: int


class BlockCount(NamedTuple):
    """A depthwise-separable block against the standard conv it replaces (the paper's Section 3.1).

    Attributes:
        depthwise, pointwise: layer names.
        m, n: input and output channels (M, N); d_k: kernel size (KH * KW = D_K^2); d_f: output size (OH, OW).
        stride, depth_multiplier: of the depthwise conv.
        separable_macs: depthwise + pointwise mult-adds.
        standard_macs: mult-adds of a KH x KW conv from M to N channels at the same stride.
        ratio: separable_macs / standard_macs, exact.
        identity: the paper's 1/N + 1/D_K^2 (times the depth multiplier), exact.
        note: why ratio and identity differ, or how a strided block was counted; '' otherwise.
    """
    depthwise: str
    pointwise: str
    m: int
    n: int
    d_k: tuple
    d_f: tuple
    stride: tuple
    depth_multiplier: int
    separable_macs: int
    standard_macs: int
    ratio: Fraction
    identity: Fraction
    note: str

    @property
    def agrees(self):
        return self.ratio == self.identity


def paper_params(layer):
    """Weights counted by the paper: every non-bias parameter of a conv or FC layer, nothing else."""
    if layer.kind not in WEIGHT_KINDS:
        return 0
    return sum(int(p.size) for k, p in layer.params.items() if k != "bias")


def count_layers(model, input_shape=None, convention=DEFAULT):
    """Per-layer counts of a Sequential model for one sample.

    Args:
        model: a Sequential (or anything with ``layer_shapes``).
        input_shape: per-sample input shape; defaults to the model's.
        convention: which free ops to count.

    Returns:
        list of LayerCount, in layer order; a fused layer gives one row per part (see ``Layer.parts``).
    """
    rows = []
    for fused, shape, _ in model.layer_shapes(input_shape):
        for layer in fused.parts():  # a fused layer (BatchNormAct) counts as the layers it computes
            shape_out = layer.output_shape(shape)
            rows.append(LayerCount(layer.name, layer.type_label, tuple(shape), tuple(shape_out), paper_params(layer),
                                   layer.param_count(True), layer.param_count(False),
                                   layer.macs(shape) + convention.extra(layer.extra_ops(shape))))
            shape = shape_out
    return rows


def by_type(layers):
    """The paper's Table 2: mult-adds and paper parameters per layer type, with their shares of the totals.

    Args:
        layers: list of LayerCount.

    Returns:
        list of dicts {type, macs, params, macs_pct, params_pct}, largest mult-adds first; types without cost
        and without weights (activations when free, reshapes) are left out.
    """
    macs, params = {}, {}
    for r in layers:
        if r.macs or r.params_paper:
            macs[r.type] = macs.get(r.type, 0) + r.macs
            params[r.type] = params.get(r.type, 0) + r.params_paper
    total_macs, total_params = sum(macs.values()) or 1, sum(params.values()) or 1
    rows = [dict(type=t, macs=macs[t], params=params[t], macs_pct=100 * macs[t] / total_macs,
                 params_pct=100 * params[t] / total_params) for t in macs]
    return sorted(rows, key=lambda row: -row["macs"])


def separable_blocks(model, input_shape=None):
    """Every depthwise conv followed by a pointwise conv (with only BN/activations between), against the standard
    conv with the same kernel, stride, input and output channels.

    Both sides are counted at the output resolution D_F, so for depth multiplier 1 the ratio is exactly
    (D_K^2 M D_F^2 + M N D_F^2) / (D_K^2 M N D_F^2) = 1/N + 1/D_K^2 for strided blocks too. With a depth multiplier
    d the depthwise conv outputs d M channels and the pointwise conv reads them, so the ratio is d (1/N + 1/D_K^2).

    Returns:
        list of BlockCount in layer order (empty for a model without separable blocks).
    """
    rows = model.layer_shapes(input_shape)
    blocks = []
    for i, (dw, dw_in, dw_out) in enumerate(rows):
        if dw.kind != "depthwise":
            continue
        pw = None
        for layer, pw_in, _ in rows[i + 1:]:
            if layer.kind == "pointwise":
                pw = layer
                break
            if layer.kind not in ("batchnorm", "activation"):
                break
        if pw is None:
            continue
        kh, kw = dw.kernel_size
        oh, ow = dw_out[0], dw_out[1]
        m, n, d = dw.in_channels, pw.out_channels, dw.depth_multiplier
        sep = dw.macs(dw_in) + pw.macs(pw_in)
        std = oh * ow * kh * kw * m * n  # what Conv2D(m, n, (kh, kw), stride).macs(dw_in) reports
        ratio = Fraction(sep, std)
        identity = d * (Fraction(1, n) + Fraction(1, kh * kw))
        if ratio != identity:
            note = "differs: the depthwise and pointwise convs do not share one output size"
        elif d != 1:
            note = f"depth multiplier {d}: the ratio is {d} x (1/N + 1/D_K^2)"
        elif dw.stride != (1, 1):
            note = f"stride {dw.stride[0]}: exact, both at the output D_F={oh}x{ow} (input {dw_in[0]}x{dw_in[1]})"
        else:
            note = ""
        blocks.append(BlockCount(dw.name, pw.name, m, n, (kh, kw), (oh, ow), dw.stride, d, sep, std, ratio,
                                 identity, note))
    return blocks


class ModelCount(NamedTuple):
    """Everything ``bench.flops`` and ``summary`` print about one model.

    Attributes:
        name: model name; input_shape, output_shape: per sample.
        convention: the Convention used.
        layers, by_type, blocks: from :func:`count_layers`, :func:`by_type`, :func:`separable_blocks`.
        macs, params_paper, params_trainable, params_total: totals.
    """
    name: str
    input_shape: tuple
    output_shape: tuple
    convention: Convention
    layers: list
    by_type: list
    blocks: list
    macs: int
    params_paper: int
    params_trainable: int
    params_total: int

    @property
    def flops(self):
        return 2 * self.macs


def count(model, input_shape=None, convention=DEFAULT):
    """Count a model: per layer, by type, per separable block, and totals (one sample).

    Args:
        model: a Sequential.
        input_shape: per-sample input shape; defaults to the model's.
        convention: which free ops to count (default: none, the paper's convention).

    Returns:
        ModelCount.
    """
    layers = count_layers(model, input_shape, convention)
    return ModelCount(
        name=model.name, input_shape=layers[0].input_shape, output_shape=layers[-1].output_shape,
        convention=convention, layers=layers, by_type=by_type(layers),
        blocks=separable_blocks(model, input_shape),
        macs=sum(r.macs for r in layers), params_paper=sum(r.params_paper for r in layers),
        params_trainable=sum(r.params_trainable for r in layers), params_total=sum(r.params_total for r in layers))
