"""Analytic mult-adds and parameters of MobileNet v1 (or VGG16), per layer, by type and per separable block.

    python -m bench.flops --alpha 0.5 --res 160          the four parts: layers, by type, blocks, totals
    python -m bench.flops --json                         one JSON object (counts per sample)
    python -m bench.flops --csv                          the per-layer table as CSV
    python -m bench.flops --paper                        every published count against the exact one

The convention is tinyconv.counting's: a mult-add is one multiply-accumulate, counted at the output resolution;
batch norm, activations, pooling and bias adds are free unless a --count-* flag counts them; FLOPs = 2 x mult-adds
(--flops shows FLOPs). Counting builds the model from shapes and compiles no kernel.
"""
import argparse
import csv
import json
import sys

import models
from tinyconv.counting import FLOPS_LABEL, MACS_LABEL, Convention, count
from tinyconv.summary import block_table, layer_table, totals, type_table


def _parser():
    p = argparse.ArgumentParser(prog="python -m bench.flops", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["mobilenet", "vgg16"], default="mobilenet")
    p.add_argument("--alpha", type=float, default=None, help="width multiplier (MobileNet; default 1.0)")
    p.add_argument("--res", type=int, default=224, help="input resolution (>= 32; default 224)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--shallow", action="store_true", help="drop the five 14x14x512 separable blocks")
    p.add_argument("--full-conv", action="store_true", help="standard 3x3 convs instead of separable blocks")
    p.add_argument("--flops", action="store_true", help="show FLOPs (2 x mult-adds) instead of mult-adds")
    p.add_argument("--count-bn", action="store_true", help="count batch norm (one mult-add per element)")
    p.add_argument("--count-bias", action="store_true", help="count bias adds")
    p.add_argument("--count-act", action="store_true", help="count activations (one op per element)")
    p.add_argument("--count-pool", action="store_true", help="count pooling (one op per window element)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--csv", action="store_true", help="print the per-layer table as CSV")
    p.add_argument("--paper", action="store_true", help="compare every count the paper publishes")
    return p


def _build(args, parser):
    if args.model == "mobilenet":
        kwargs = dict(alpha=1.0 if args.alpha is None else args.alpha, resolution=args.res, classes=args.classes,
                      shallow=args.shallow, full_conv=args.full_conv)
    else:
        given = [flag for flag, on in (("--alpha", args.alpha is not None), ("--shallow", args.shallow),
                                       ("--full-conv", args.full_conv)) if on]
        if given:
            parser.error(f"{', '.join(given)} only apply to --model mobilenet")
        kwargs = dict(resolution=args.res, classes=args.classes)
    try:
        return models.build(args.model, **kwargs), kwargs
    except ValueError as e:
        parser.error(str(e))


def as_dict(mc, model_name, kwargs):
    """The JSON object: model settings, totals, and per-layer, per-type and per-block counts (one sample)."""
    return {
        "model": model_name,
        "name": mc.name,
        "alpha": kwargs.get("alpha"),
        "resolution": kwargs["resolution"],
        "classes": kwargs["classes"],
        "shallow": kwargs.get("shallow", False),
        "full_conv": kwargs.get("full_conv", False),
        "unit": "macs: multiply-accumulates per sample; flops = 2 x macs",
        "convention": mc.convention.describe(),
        "macs": mc.macs,
        "flops": mc.flops,
        "params_paper": mc.params_paper,
        "params_trainable": mc.params_trainable,
        "params_total": mc.params_total,
        "layers": [dict(name=r.name, type=r.type, output_shape=list(r.output_shape), params=r.params_total,
                        params_paper=r.params_paper, params_trainable=r.params_trainable, macs=r.macs)
                   for r in mc.layers],
        "by_type": mc.by_type,
        "blocks": [dict(depthwise=b.depthwise, pointwise=b.pointwise, m=b.m, n=b.n, d_k=list(b.d_k),
                        d_f=list(b.d_f), stride=list(b.stride), separable_macs=b.separable_macs,
                        standard_macs=b.standard_macs, ratio=str(b.ratio), identity=str(b.identity),
                        ratio_value=float(b.ratio), exact=b.agrees, note=b.note) for b in mc.blocks],
    }


def _csv(mc, flops, stream):
    unit = "flops" if flops else "macs"
    k = 2 if flops else 1
    w = csv.writer(stream, lineterminator="\n")
    w.writerow(["name", "type", "output_shape", "params", "params_paper", "params_trainable", unit])
    for r in mc.layers:
        w.writerow([r.name, r.type, "x".join(map(str, r.output_shape)), r.params_total, r.params_paper,
                    r.params_trainable, k * r.macs])


def _text(mc, flops):
    unit = FLOPS_LABEL if flops else MACS_LABEL
    return "\n".join([
        f'Model "{mc.name}", input {mc.input_shape}, per sample, {unit}',
        "", "1. Layers", layer_table(mc, flops),
        "", "2. By layer type (the paper's Table 2)", type_table(mc, flops),
        "", "3. Depthwise-separable blocks against the standard 3x3 conv each replaces (paper eq. 5)",
        block_table(mc, flops),
        "", "4. Totals", totals(mc, flops)])


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.paper:
        from bench import paper  # builds ~40 models including VGG16: only on request
        figs = paper.figures()
        print(json.dumps(paper.as_json(figs), indent=1) if args.json else paper.report(figs))
        return 0
    model, kwargs = _build(args, parser)
    convention = Convention(bias=args.count_bias, bn=args.count_bn, activation=args.count_act,
                            pool=args.count_pool)
    mc = count(model, convention=convention)
    if args.json:
        print(json.dumps(as_dict(mc, args.model, kwargs), indent=1))
    elif args.csv:
        _csv(mc, args.flops, sys.stdout)
    else:
        print(_text(mc, args.flops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
