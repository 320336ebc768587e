"""Text tables of a model's counts: Keras's ``model.summary()`` with the mult-adds column Keras lacks.

Every table and total names its unit: mult-adds (MACs) by default, FLOPs (= 2 x mult-adds) with ``flops=True``.
"""
from tinyconv.counting import DEFAULT, FLOPS_LABEL, MACS_LABEL, count


def _unit(flops):
    return ("FLOPs", 2) if flops else ("Mult-adds", 1)


def _shape(shape):
    return "(None, " + ", ".join(map(str, shape)) + ")"


def _table(header, rows, align):
    """Fixed-width table; ``align`` is a string of '<' and '>' per column."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([rule, line(header), rule, *map(line, rows), rule])


def layer_table(mc, flops=False):
    """Per layer: name, type, output shape, parameters (total, as Keras's Param #), mult-adds and % of the total."""
    unit, k = _unit(flops)
    total = mc.macs or 1
    rows = [(r.name, r.type, _shape(r.output_shape), f"{r.params_total:,}", f"{k * r.macs:,}",
             f"{100 * r.macs / total:.2f}") for r in mc.layers]
    return _table(("Layer", "Type", "Output shape", "Param #", unit, "%"), rows, "<<<>>>")


def type_table(mc, flops=False):
    """The paper's Table 2: each layer type's share of the mult-adds and of the paper's parameters."""
    unit, k = _unit(flops)
    rows = [(t["type"], f"{k * t['macs']:,}", f"{t['macs_pct']:.2f}%", f"{t['params']:,}",
             f"{t['params_pct']:.2f}%") for t in mc.by_type]
    return _table(("Type", unit, f"% {unit}", "Params (paper)", "% Params"), rows, "<>>>>")


def block_table(mc, flops=False):
    """Each depthwise-separable block against the standard conv it replaces, with the paper's 1/N + 1/D_K^2."""
    if not mc.blocks:
        return "(no depthwise-separable blocks)"
    unit, k = _unit(flops)
    rows = []
    for b in mc.blocks:
        rows.append((b.depthwise.replace("conv_dw_", "block "), f"{b.d_f[0]}x{b.d_f[1]}", b.stride[0], b.m, b.n,
                     f"{k * b.separable_macs:,}", f"{k * b.standard_macs:,}", f"{float(b.ratio):.6f}",
                     f"{float(b.identity):.6f}", "yes" if b.agrees else "NO", b.note))
    return _table(("Block", "D_F", "s", "M", "N", f"Separable {unit}", f"Standard {unit}", "Ratio",
                   "1/N+1/D_K^2", "Exact", "Note"), rows, "<>>>>>>>><<")


def totals(mc, flops=False):
    """Totals: mult-adds (and FLOPs), and the parameters three ways."""
    lines = [f"Mult-adds (MACs):        {mc.macs:>15,}   ({mc.macs / 1e6:,.2f} M)",
             f"FLOPs (2 x mult-adds):   {mc.flops:>15,}   ({mc.flops / 1e6:,.2f} M)"]
    if flops:
        lines.reverse()
    non_trainable = mc.params_total - mc.params_trainable
    lines += [f"Params (paper: conv/FC weights, no bias, no BN): {mc.params_paper:>12,}",
              f"Trainable params:                                {mc.params_trainable:>12,}",
              f"Non-trainable params (BN moving statistics):     {non_trainable:>12,}",
              f"Total params:                                    {mc.params_total:>12,}",
              f"Convention: {mc.convention.describe()}"]
    return "\n".join(lines)


def summary(model, input_shape=None, *, flops=False, convention=DEFAULT):
    """Keras-style summary of a model, with mult-adds: the per-layer table, then the totals.

    Args:
        model: a Sequential.
        input_shape: per-sample input shape; defaults to the model's.
        flops: show FLOPs (2 x mult-adds) instead of mult-adds.
        convention: which free ops to count (tinyconv.counting.Convention).

    Returns:
        The summary as a string.
    """
    mc = count(model, input_shape, convention)
    unit = FLOPS_LABEL if flops else MACS_LABEL
    head = f'Model: "{mc.name}"   input {_shape(mc.input_shape)}   counts per sample, {unit}'
    return "\n".join([head, layer_table(mc, flops), totals(mc, flops)])
