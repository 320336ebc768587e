"""python -m bench.flops: the four parts, JSON and CSV, exit code 2 on bad arguments, no kernel compiled, and
--paper's verdict on every published figure."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import flops, paper

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = flops.main(list(argv))
    return code, capsys.readouterr().out


def test_default_output_has_the_four_parts(capsys):
    code, out = run(capsys, "--alpha", "0.5", "--res", "160")
    assert code == 0
    for part in ("1. Layers", "2. By layer type", "3. Depthwise-separable blocks", "4. Totals"):
        assert part in out
    assert "mult-adds (MACs)" in out and "76,524,800" in out and "1,342,536" in out
    blocks = [line.split() for line in out.splitlines() if line.startswith("block ")]
    assert len(blocks) == 13 and all(row[10] == "yes" for row in blocks)  # every block: ratio == 1/N + 1/D_K^2


def test_flops_flag_relabels_and_doubles(capsys):
    _, out = run(capsys, "--alpha", "0.5", "--res", "160", "--flops")
    assert "FLOPs (2 x mult-adds)" in out.splitlines()[0]
    assert "153,049,600" in out


def test_json_has_the_documented_fields(capsys):
    _, out = run(capsys, "--json", "--alpha", "0.75", "--res", "192", "--classes", "10")
    data = json.loads(out)
    for key in ("model", "alpha", "resolution", "classes", "macs", "params_paper", "params_trainable",
                "params_total", "layers", "by_type", "blocks"):
        assert key in data
    assert (data["alpha"], data["resolution"], data["classes"]) == (0.75, 192, 10)
    assert data["macs"] == sum(layer["macs"] for layer in data["layers"])
    assert set(data["layers"][0]) >= {"name", "type", "output_shape", "params", "macs"}
    assert data["layers"][-1]["output_shape"] == [10] and all(b["exact"] for b in data["blocks"])


def test_count_flags_and_csv(capsys):
    _, plain = run(capsys, "--json")
    _, counted = run(capsys, "--json", "--count-bn", "--count-bias")
    assert json.loads(counted)["macs"] > json.loads(plain)["macs"]
    _, out = run(capsys, "--csv", "--model", "vgg16", "--res", "32", "--classes", "10")
    lines = out.splitlines()
    assert lines[0] == "name,type,output_shape,params,params_paper,params_trainable,macs"
    assert lines[-1].startswith("predictions,FC,10,")


@pytest.mark.parametrize("argv,message", [
    (["--alpha", "0"], "alpha must be a number > 0"), (["--alpha", "-1"], "alpha"),
    (["--res", "31"], "resolution must be an int >= 32"), (["--model", "resnet"], "invalid choice"),
    (["--model", "vgg16", "--alpha", "0.5"], "only apply to --model mobilenet"), (["--classes", "0"], "classes"),
])
def test_bad_arguments_exit_2_with_a_clear_message(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        flops.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_runs_as_a_module_and_compiles_no_kernel():
    """A fresh process: the CLI prints, and no Numba dispatcher in kernels/ holds a compiled signature."""
    code = ("import sys, numba, kernels, pkgutil, importlib\n"
            "from bench import flops\n"
            "flops.main(['--alpha', '0.5', '--res', '160'])\n"
            "mods = [importlib.import_module('kernels.' + m.name) for m in pkgutil.iter_modules(kernels.__path__)]\n"
            "compiled = [f'{m.__name__}.{k}' for m in mods for k, v in vars(m).items()\n"
            "            if hasattr(v, 'signatures') and v.signatures]\n"
            "print('COMPILED', compiled)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "4. Totals" in out
    assert out.strip().endswith("COMPILED []")


@pytest.fixture(scope="module")
def figures():
    return {(f.source, f.what): f for f in paper.figures()}


def find(figures, source, what):
    (f,) = [f for (s, w), f in figures.items() if s.startswith(source) and w == what]
    return f


def test_paper_every_figure_is_matched_or_explained(figures):
    for f in figures.values():
        assert f.matches or f.reproduced_by or f.note, f.what


def test_paper_headline_figures_match(figures):
    for source, what in [("paper Table 6", "1.0 MobileNet-224: mult-adds"),
                         ("paper Table 6", "1.0 MobileNet-224: params"),
                         ("paper Table 5", "0.75 MobileNet: mult-adds"),
                         ("paper Table 5", "shallow MobileNet: mult-adds"),
                         ("paper Table 3", "depthwise separable: mult-adds"),
                         ("paper Table 3", "alpha=0.75, rho=0.714 (D_F=10): mult-adds")]:
        assert find(figures, source, what).matches, what


def test_paper_mismatches_have_the_expected_reasons(figures):
    def conventions(source, what):
        f = find(figures, source, what)
        assert not f.matches
        return {label: broken for label, _, broken in paper.explanations(f, list(figures.values()))}

    rho = conventions("paper Table 7", "1.0 MobileNet-160: mult-adds")
    assert [label for label, broken in rho.items() if not broken] == [
        "rho^2 x the 224 count (resolution multiplier applied to every layer, FC included)"]
    assert "without the FC layers" in conventions("paper Table 4", "full-conv MobileNet: mult-adds")
    assert "without the FC layers" in conventions("paper Table 8", "VGG16: mult-adds")
    slim = conventions("TF-slim", "1.0: params")
    assert list(slim) == ["1001 classes, every variable but BN gamma (BN with scale=False)"]
    assert "typo" in find(figures, "paper Table 2", "Conv 3x3: share of mult-adds").note
    assert not find(figures, "TF-slim", "0.25-192: mult-adds").reproduced_by


def test_paper_cli_prints_the_summary_line(capsys, figures):
    _, out = run(capsys, "--paper")
    assert "published figures:" in out and "DIFFERS" in out
