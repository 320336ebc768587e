"""Every count the MobileNet paper (Howard et al. 2017) and TF-slim's model zoo publish, against the exact count.

Each published figure is compared with the exact count of the model built by ``models`` under the paper's
convention (``tinyconv.counting``), at the figure's own rounding. For a figure that does not match, a short list of
alternative conventions is evaluated on the same models and the ones that reproduce the figure are shown; where
none does, the note says why we believe the published figure is wrong.

All numbers come from layers' own ``macs`` and parameter counts; nothing here re-derives a layer's cost.
"""
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

import models
from tinyconv import Conv2D, DepthwiseConv2D, PointwiseConv2D
from tinyconv.counting import Convention, count, paper_params

MILLION = Fraction(10**6)
ALPHAS = (1.0, 0.75, 0.5, 0.25)
RESOLUTIONS = (224, 192, 160, 128)
SLIM = "TF-slim model zoo (mobilenet_v1.md)"
SLIM_MACS = {1.0: (569, 418, 291, 186), 0.75: (317, 233, 162, 104), 0.5: (150, 110, 77, 49),
             0.25: (41, 34, 21, 14)}
SLIM_PARAMS = {1.0: "4.24", 0.75: "2.59", 0.5: "1.34", 0.25: "0.47"}


class Figure(NamedTuple):
    """One published figure.

    Attributes:
        source: where it is published ('paper Table 4'...).
        what: what it counts.
        published: the figure as printed.
        unit: 'M mult-adds', 'M params', '% mult-adds', '% params' or 'x'.
        exact: the exact value under our convention, in the figure's unit.
        step: the figure's rounding step (1 for '569', 0.01 for '4.24', 100 for '15300' at 3 significant digits).
        candidates: (convention, value) pairs tried when ``exact`` does not match.
        note: the explanation when no candidate reproduces the figure, or context worth printing.
        family: figures published together under one convention ('paper mult-adds'...): a convention that
            explains one of them must explain the others too, which ``report`` checks.
    """
    source: str
    what: str
    published: str
    unit: str
    exact: Fraction
    step: Fraction
    candidates: tuple = ()
    note: str = ""
    family: str = ""

    def rounds_to(self, value):
        return abs(Fraction(value) - Fraction(self.published)) * 2 <= self.step

    @property
    def matches(self):
        return self.rounds_to(self.exact)

    @property
    def reproduced_by(self):
        """The candidate conventions whose value rounds to the published figure."""
        return [(label, v) for label, v in self.candidates if self.rounds_to(v)]


def _step(published):
    decimals = len(published.split(".")[1]) if "." in published else 0
    return Fraction(1, 10**decimals)


EVERY = Convention(bias=True, bn=True, activation=True, pool=True)
LIGHT = Convention(bias=True, pool=True)


@lru_cache(maxsize=None)
def model_counts(name="mobilenet", **kwargs):
    """The model's counts under the paper's convention and with every free op counted, from one build."""
    model = models.build(name, **kwargs)
    return count(model), count(model, convention=LIGHT), count(model, convention=EVERY)


def _mobilenet_count(alpha=1.0, resolution=224, classes=1000, **kwargs):
    return model_counts("mobilenet", alpha=alpha, resolution=resolution, classes=classes, **kwargs)[0]


def _macs_of(mc, type_label):
    return sum(r.macs for r in mc.layers if r.type == type_label)


def _macs_candidates(name, kwargs):
    """Alternative conventions for a whole-model mult-add figure, in millions, the same list for every model."""
    mc, light, every = model_counts(name, **kwargs)
    cands = []
    if name == "mobilenet":
        at_224 = model_counts(name, **dict(kwargs, resolution=224))[0]
        rho2 = Fraction(kwargs["resolution"], 224) ** 2
        cands.append(("rho^2 x the 224 count (resolution multiplier applied to every layer, FC included)",
                      at_224.macs * rho2 / MILLION))
        other = 1001 if kwargs["classes"] == 1000 else 1000
        cands.append((f"{other} classes", model_counts(name, **dict(kwargs, classes=other))[0].macs / MILLION))
    cands += [("without the FC layers", (mc.macs - _macs_of(mc, "FC")) / MILLION),
              ("without conv1 (the first, standard 3x3 conv)", (mc.macs - mc.layers[0].macs) / MILLION),
              ("bias adds and pooling counted", light.macs / MILLION),
              ("batch norm, activations, biases and pooling counted", every.macs / MILLION)]
    return tuple(cands)


def _model_figures(source, what, kwargs, macs_published, params_published, family, note=""):
    """Mult-adds and paper-convention parameters of one MobileNet configuration."""
    kwargs = dict(dict(alpha=1.0, resolution=224, classes=1000), **kwargs)
    mc = model_counts("mobilenet", **kwargs)[0]
    figs = []
    if macs_published is not None:
        figs.append(Figure(source, f"{what}: mult-adds", str(macs_published), "M mult-adds", mc.macs / MILLION,
                           _step(str(macs_published)), _macs_candidates("mobilenet", kwargs), note,
                           f"{family} mult-adds"))
    if params_published is not None:
        figs.append(Figure(source, f"{what}: params", params_published, "M params", mc.params_paper / MILLION,
                           _step(params_published), _params_candidates(kwargs), "", f"{family} params"))
    return figs


def _params_candidates(kwargs):
    """Alternative conventions for a parameter figure, in millions."""
    mc = model_counts("mobilenet", **kwargs)[0]
    slim = model_counts("mobilenet", **dict(kwargs, classes=1001))[0]
    gammas = (slim.params_trainable - slim.params_paper - 1001) // 2  # BN gamma and beta: one entry per channel
    return (("trainable: + biases and BN gamma, beta", mc.params_trainable / MILLION),
            ("total: + BN moving mean and variance", mc.params_total / MILLION),
            ("1001 classes, every variable (Keras-style total)", slim.params_total / MILLION),
            ("1001 classes, every variable but BN gamma (BN with scale=False)",
             (slim.params_total - gammas) / MILLION))


def _single_layer_figures():
    """Section 3.1 / Table 3: one 14x14x512 layer with a 3x3x512x512 kernel, and its shrunk versions."""
    src = "paper Table 3 (one layer, D_F=14, M=N=512, D_K=3)"

    def standard(c, size):
        layer = Conv2D(c, c, 3, padding="same")
        return layer.macs((size, size, c)), paper_params(layer)

    def separable(c, size):
        dw, pw = DepthwiseConv2D(c, 3, padding="same"), PointwiseConv2D(c, c)
        return dw.macs((size, size, c)) + pw.macs((size, size, c)), paper_params(dw) + paper_params(pw)

    c75, d714 = int(512 * 0.75), round(14 * 0.714)  # 384 channels; 14 x 0.714 = 9.996 -> a 10x10 map
    rows = [("standard 3x3 convolution", standard(512, 14), "462", "2.36"),
            ("depthwise separable", separable(512, 14), "52.3", "0.27"),
            ("alpha=0.75 (M=N=384)", separable(c75, 14), "29.6", "0.15"),
            (f"alpha=0.75, rho=0.714 (D_F={d714})", separable(c75, d714), "15.1", "0.15")]
    figs = []
    for what, (macs, params), pub_macs, pub_params in rows:
        figs.append(Figure(src, f"{what}: mult-adds", pub_macs, "M mult-adds", Fraction(macs) / MILLION,
                           _step(pub_macs)))
        figs.append(Figure(src, f"{what}: params", pub_params, "M params", Fraction(params) / MILLION,
                           _step(pub_params)))
    return figs


def _table2_figures():
    """Table 2: resources per layer type of MobileNet 1.0-224."""
    mc = _mobilenet_count()
    published = {"Conv 1x1": ("94.86", "74.59"), "Conv DW 3x3": ("3.06", "1.06"), "Conv 3x3": ("1.19", "0.02"),
                 "FC": ("0.18", "24.33")}
    rows = {t["type"]: t for t in mc.by_type}
    total_macs = sum(t["macs"] for t in mc.by_type)
    total_params = sum(t["params"] for t in mc.by_type)
    column = sum(Fraction(m) for m, _ in published.values())
    figs = []
    for kind, (pub_m, pub_p) in published.items():
        exact_m = Fraction(100 * rows[kind]["macs"], total_macs)
        note = ""
        if kind == "Conv 3x3":
            transposed = f"{pub_m[0]}.{pub_m[3]}{pub_m[2]}"  # 1.19 -> 1.91
            swapped = column - Fraction(pub_m) + Fraction(transposed)
            note = (f"typo: the exact share is {float(exact_m):.2f}%, the published digits transposed; the "
                    f"published column sums to {float(column):.2f}%, with {transposed} it sums to "
                    f"{float(swapped):.2f}%")
        figs.append(Figure("paper Table 2 (1.0-224)", f"{kind}: share of mult-adds", pub_m, "% mult-adds",
                           exact_m, _step(pub_m), note=note))
        figs.append(Figure("paper Table 2 (1.0-224)", f"{kind}: share of params", pub_p, "% params",
                           Fraction(100 * rows[kind]["params"], total_params), _step(pub_p)))
    return figs


def _vgg_figures():
    """Table 8: VGG16 15300 M mult-adds, 138 M params; MobileNet '32 times smaller and 27 times less compute'."""
    vgg = model_counts("vgg16")[0]
    mob = _mobilenet_count()
    src = "paper Table 8"
    cands = _macs_candidates("vgg16", {})
    size = Fraction(vgg.params_paper, mob.params_paper)
    compute = Fraction(vgg.macs, mob.macs)
    return [
        Figure(src, "VGG16: mult-adds", "15300", "M mult-adds", vgg.macs / MILLION, Fraction(100), cands,
               "read at 3 significant digits; 15.3 billion is also the figure commonly quoted for VGG16"),
        Figure(src, "VGG16: params", "138", "M params", vgg.params_paper / MILLION, Fraction(1)),
        Figure("paper Section 4.3", "MobileNet vs VGG16: times smaller (params)", "32", "x", size, Fraction(1),
               (("rounded down", Fraction(int(size))),), "the paper's own 138 / 4.2 is 32.9, also rounded down"),
        Figure("paper Section 4.3", "MobileNet vs VGG16: times less compute (mult-adds)", "27", "x", compute,
               Fraction(1)),
    ]


def _slim_figures():
    figs = []
    for alpha in ALPHAS:
        for res, pub in zip(RESOLUTIONS, SLIM_MACS[alpha]):
            note = ""
            if alpha == 0.75:
                note = ("the whole 0.75 row equals the count without conv1, a convention no other row follows: "
                        "this row was computed differently; the paper's own 325 for 0.75-224 is the exact count")
            if (alpha, res) == (0.5, 224):
                macs = model_counts(alpha=alpha, resolution=res, classes=1001)[0].macs
                note = (f"{macs:,} is {149_500_000 - macs:,} mult-adds short of rounding up to 150 (the paper "
                        f"prints 149): any convention adding a few thousand ops, e.g. the logits' bias adds and "
                        f"the global pool, rounds it up")
            if (alpha, res) == (0.25, 192):
                note = ("34 would need a 204x204 input; the rest of the 0.25 row matches the exact count, so this "
                        "is most likely a typo for 30")
            figs += _model_figures(SLIM, f"{alpha}-{res}", dict(alpha=alpha, resolution=res, classes=1001), pub,
                                   None, "TF-slim", note)
        figs += _model_figures(SLIM, f"{alpha}", dict(alpha=alpha, classes=1001), None, SLIM_PARAMS[alpha],
                               "TF-slim")
    return figs


def figures():
    """Every published figure with its exact counterpart, in the order of the paper, then TF-slim's table."""
    figs = _single_layer_figures()
    figs += _table2_figures()
    paper = "paper"
    figs += _model_figures("paper Table 4", "full-conv MobileNet", dict(full_conv=True), 4866, "29.3", paper,
                           "the row beside it (569) counts the FC layer, so this one row seems to leave the 1.02 M "
                           "mult-adds of the classifier out; an inconsistency of 0.02%")
    figs += _model_figures("paper Table 4", "MobileNet 1.0-224", {}, 569, "4.2", paper)
    figs += _model_figures("paper Table 5", "0.75 MobileNet", dict(alpha=0.75), 325, "2.6", paper)
    figs += _model_figures("paper Table 5", "shallow MobileNet", dict(shallow=True), 307, "2.9", paper)
    for alpha, macs, params in ((1.0, 569, "4.2"), (0.75, 325, "2.6"), (0.5, 149, "1.3"), (0.25, 41, "0.5")):
        figs += _model_figures("paper Table 6", f"{alpha} MobileNet-224", dict(alpha=alpha), macs, params, paper)
    for res, macs in zip(RESOLUTIONS, (569, 418, 290, 186)):
        figs += _model_figures("paper Table 7", f"1.0 MobileNet-{res}", dict(resolution=res), macs, None, paper)
    figs += _model_figures("paper Table 8", "1.0 MobileNet-224", {}, 569, "4.2", paper)
    figs += _vgg_figures()
    figs += _model_figures("paper Table 9", "0.50 MobileNet-160", dict(alpha=0.5, resolution=160), 76, "1.32",
                           paper)
    figs += _slim_figures()
    return figs


def explanations(figure, figs):
    """For a figure that does not match: each convention that reproduces it, with the figures of its family it
    would then get wrong (none: the convention fits the whole family). Figures with a note of their own are
    explained on their own and left out of the check."""
    family = [o for o in figs if figure.family and o.family == figure.family and o is not figure and not o.note]
    out = []
    for label, value in figure.reproduced_by:
        broken = []
        for other in family:
            alt = dict(other.candidates).get(label)
            if alt is None or not other.rounds_to(alt):
                broken.append((other, alt))
        out.append((label, value, broken))
    return out


def _fmt(value, figure):
    digits = max(2, len(figure.published.split(".")[1]) + 2 if "." in figure.published else 2)
    return f"{float(value):,.{digits}f}"


def report(figs):
    """The side-by-side table; each mismatch is followed by the conventions that reproduce it, and whether each of
    them holds for the rest of its family, or by the reason no convention does."""
    lines = []
    width = max(len(f.what) for f in figs)
    source = None
    consistent = inconsistent = wrong = 0
    for f in figs:
        if f.source != source:
            source = f.source
            lines += ["", f"== {source}"]
        lines.append(f"  {f.what:<{width}}  published {f.published:>6} {f.unit:<11}  exact {_fmt(f.exact, f):>12}"
                     f"  {'match' if f.matches else 'DIFFERS'}")
        if f.matches:
            continue
        found = explanations(f, figs)
        for label, value, broken in found:
            if not broken:
                tail = f"; consistent with every other {f.family} figure" if f.family else ""
            else:
                shown = ", ".join(f"{o.what} {'n/a' if v is None else _fmt(v, o)} vs {o.published}"
                                  for o, v in broken[:3])
                more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
                tail = f"; but it would break {shown}{more}"
            lines.append(f"      reproduced by: {label} = {_fmt(value, f)}{tail}")
        if f.note:
            lines.append(f"      {f.note}")
        if not found and not f.note:
            lines.append("      not reproduced by any convention tried: "
                         + "; ".join(f"{label} = {_fmt(v, f)}" for label, v in f.candidates))
        if any(not broken for _, _, broken in found):
            consistent += 1
        elif found:
            inconsistent += 1
        else:
            wrong += 1
    exact = sum(f.matches for f in figs)
    lines += ["", f"{len(figs)} published figures: {exact} match the exact count at the published rounding; "
                  f"{consistent} are reproduced by a convention consistent with the rest of their table; "
                  f"{inconsistent} only by a convention the rest of their table contradicts; {wrong} by none."]
    return "\n".join(lines)


def as_json(figs):
    """The figures as a list of dicts for ``--paper --json``."""
    return [dict(source=f.source, what=f.what, published=f.published, unit=f.unit, exact=float(f.exact),
                 matches=f.matches, note=f.note,
                 reproduced_by=[dict(convention=c, value=float(v), contradicted_by=[o.what for o, _ in broken])
                                for c, v, broken in explanations(f, figs)]) for f in figs]
