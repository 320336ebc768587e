"""Smoke tests of the speed benchmarks: they import, and their pure helpers and validations work on tiny shapes.

No timing is asserted anywhere (timing lives in ``bench/``). The benchmark environment (allocator and OpenBLAS
settings) is never applied to the test process, only computed; the engine worker processes the benchmarks run in
(one per engine, started once for this module) do get it.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench import _harness as h  # noqa: E402
from bench import kernels as bk  # noqa: E402
from bench import model as bm  # noqa: E402
from bench import torch_mobilenet as tmn  # noqa: E402
import models  # noqa: E402

TINY = bk.Workload("tiny", 0.25, 32, 2, 3, 5, 0.1, 0.1)


@pytest.fixture(scope="module")
def workers():
    with h.Worker("tinyconv") as tc, h.Worker("torch") as tw:
        yield tc, tw


def test_benchmark_env_sets_allocator_drops_openblas_and_leaves_input_alone():
    environ = {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "512", "PATH": "/bin"}
    env = h.benchmark_env(environ)
    assert "OPENBLAS_CORETYPE" not in env and "OPENBLAS_L2_SIZE" not in env
    assert env["MALLOC_MMAP_THRESHOLD_"] == "1073741824" and env["MALLOC_TRIM_THRESHOLD_"] == "4294967296"
    assert env[h.ENV_MARKER] == "1" and env["PATH"] == "/bin"
    assert environ == {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "512", "PATH": "/bin"}


def test_cpu_line_names_model_numbers_and_caches(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 207\n"
                       "model name\t: Intel(R) Xeon(R) Processor\nstepping\t: 2\n\n"
                       "processor\t: 1\ncpu family\t: 99\nmodel\t\t: 1\nmodel name\t: other\n")
    caches = tmp_path / "cache"
    for index, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"),
                                                 (2, "Unified", "2048K"), (3, "Unified", "266240K")]):
        d = caches / f"index{index}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert h._cpu_model(str(cpuinfo), str(caches)) == (
        "Intel(R) Xeon(R) Processor (family 6 model 207 stepping 2; caches L1d 48K, L2 2048K, L3 266240K (cpu0's))")
    # neither file readable: the name alone, never an error
    assert h._cpu_model(str(tmp_path / "missing"), str(tmp_path / "missing")) in (
        h.platform.processor() or "unknown CPU",)


def test_selected_needs_every_filter():
    assert h.selected("mobilenet depthwise forward", [])
    assert h.selected("mobilenet depthwise forward", ["Depthwise", "forw"])
    assert not h.selected("mobilenet depthwise forward", ["depthwise", "backward"])


def test_rel_error_and_tables():
    assert h.rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert h.rel_error(np.array([1.0, 2.1]), np.array([1.0, 2.0])) == pytest.approx(0.05)
    assert h.rel_error(np.zeros(3), np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        h.rel_error(np.zeros(2), np.zeros(3))
    table = h.markdown_table(["name", "ms"], [["a", "1.5"], ["bb", "12"]])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[1].endswith("-:|")
    assert h.verdict(1.6, 1.5) == "met" and h.verdict(1.4, 1.5) == "MISSED" and h.verdict(1.0, None) == "-"


def test_time_interleaved_runs_every_contender():
    calls = {"a": 0, "b": 0}

    def make(k):
        def fn():
            calls[k] += 1
        return fn

    med = h.time_interleaved({"a": make("a"), "b": make("b")}, repeats=2, warmup=1, min_sample=0.0)
    assert set(med) == {"a", "b"} and all(v >= 0 for v in med.values())
    assert calls["a"] >= 4 and calls["b"] >= 4  # warm-up, calibration and two samples


def test_same_conv_pads_like_tensorflow():
    even = tmn.SameConv2d(3, 4, 3, stride=2, in_size=8)
    assert even.pad == (0, 1, 0, 1) and even.padding == (0, 0)
    odd = tmn.SameConv2d(3, 4, 3, stride=2, in_size=7)
    assert odd.pad is None and odd.padding == (1, 1)
    with pytest.raises(ValueError, match="built for 8x8"):
        even(torch.zeros(1, 3, 7, 7))


@pytest.mark.parametrize("kw", [dict(alpha=0.25, resolution=32, classes=5),
                                dict(alpha=0.25, resolution=33, classes=3, in_channels=1, activation="relu6")])
def test_torch_mobilenet_matches_tinyconv_on_copied_weights(kw):
    model = models.mobilenet_v1(**kw)
    tm = tmn.copy_from_tinyconv(tmn.mobilenet_v1(**kw), model).eval()
    x = np.random.default_rng(0).standard_normal((2, kw["resolution"], kw["resolution"],
                                                  kw.get("in_channels", 3))).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    assert h.rel_error(model.forward(x), ref) < 1e-4
    assert sum(p.numel() for p in tm.parameters()) == model.param_count()


def test_workers_run_one_engine_each_and_report_errors(workers):
    tc, tw = workers
    assert tc.engine == "tinyconv" and tw.engine == "torch" and tc.pid != tw.pid
    with pytest.raises(h.WorkerError, match="import of torch halted"):
        tc.call("importlib:import_module", "torch")  # the tinyconv worker cannot import torch at all
    assert tw.call(h.imported, "torch")
    assert tc.call("os:getenv", "MALLOC_MMAP_THRESHOLD_") == h.MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert tc.call("os:getenv", "OPENBLAS_CORETYPE") is None
    with pytest.raises(h.WorkerError, match="ZeroDivisionError"):
        tc.call("operator:truediv", 1, 0)
    assert tc.call("operator:add", 2, 3) == 5  # alive after an error


def test_time_interleaved_times_remote_contenders(workers):
    tc, tw = workers
    tc.call(h.register, "noop", print)  # any picklable-by-name callable; print(): a newline on stderr
    med, fastest = h.time_interleaved({"remote": h.Remote(tc, "noop"), "local": lambda: None}, repeats=2,
                                      warmup=0, min_sample=0.0, best=True)
    assert set(med) == set(fastest) == {"remote", "local"} and med["remote"] >= fastest["remote"] >= 0


def test_bn_relu_inputs_keep_pre_activations_off_the_kink():
    layer = next(layer for layer in models.mobilenet_v1(alpha=0.25, resolution=32, classes=5).layers
                 if hasattr(layer, "act_kind"))
    x, _, gamma, beta, _, _ = bk._bn_inputs(TINY, (16, 16, 8), np.random.default_rng(0), relu=True)
    x2 = x.reshape(-1, 8).astype(np.float64)
    v = (x2 - x2.mean(0)) * gamma / np.sqrt(x2.var(0) + layer.eps) + beta
    assert np.abs(v).min() > 5e-5


def test_kernel_rows_validate_on_a_tiny_workload_in_the_workers(workers):
    tc, tw = workers
    results = bk.run_workload(workers, TINY, repeats=1, warmup=0, report=lambda line: None)
    families = {r.op.family for r in results}
    assert {"conv", "depthwise", "pointwise", "global avgpool", "dropout", "linear", "softmax cross-entropy"} \
        <= families
    assert "batchnorm+relu" in families or {"batchnorm", "relu"} <= families  # fused BN+ReLU layers or not
    for r in results:
        assert r.ok, (r.op.label, r.error)
        assert r.torch and all(t > 0 for t in r.torch.values()) and r.ours > 0
        assert (r.gemm is not None) == (r.op.family == "pointwise")
        assert r.torch_error is not None or r.op.family == "dropout"
    assert not tc.call(h.imported, "torch")
    assert not tw.call("bench._harness:_numba_ran")  # the torch worker never launched a parallel kernel
    assert bk.summaries(results)
    # the input layer's input gradient is timed but left out of the per-step totals: no step computes it
    conv = [r for r in results if r.op.family == "conv"]
    assert any(r.op.op == "backward input" and r.op.layers == (bk.INPUT_LAYER,) for r in conv)
    want = sum(r.ours * len(r.op.layers) for r in conv if r.op.op != "backward input")
    assert bk.step_totals(results)[(conv[0].op.workload, "conv")][0] == pytest.approx(want)


def test_model_validation_profile_and_blocks_on_a_tiny_case(workers):
    tc, _ = workers
    case = bm.Case("train", 0.25, 64, 8, 3, 5, 0.1, 1.5)  # BN over >= 32 values: float32 well conditioned
    r = bm.speed(workers, case, repeats=1, warmup=0)
    assert r["ok"], r["check"]
    assert set(r["torch"]) == {"NCHW", "channels_last"}
    table = tc.call(bm.ours_profile, 1)
    assert "Conv DW 3x3" in table and "Conv 1x1" in table
    assert "0.1424" in tc.call(bm.ours_blocks, 1, 0)  # block 1: 1/16 + 1/9 at alpha 0.25
    infer = bm.speed(workers, case._replace(mode="infer"), repeats=1, warmup=0)
    assert infer["ok"], infer["check"]  # our plain and folded logits against every PyTorch model's
    assert set(infer["torch"]) == {"NCHW", "channels_last", bm.FOLDED}
    assert set(infer["ours_times"]) == {"plain", bm.FOLDED}
    assert infer["ours"] == min(infer["ours_times"].values())
    assert len(bm.speed_row(infer)) == len(bm.SPEED_HEADERS) == len(bm.speed_row(r))
    for res in (r, infer):  # the GEMM floor is timed in our worker (never compared with a time: one sample here)
        assert res["floor"] > 0 and res["ceiling"] == res["torch"][res["best"]] / res["floor"]
    assert not tc.call(h.imported, "torch")


def test_gemm_floor_does_the_products_of_every_gemm_layer():
    """The floor's products carry exactly the mult-adds of the layers that are GEMMs (all but the depthwise convs):
    once for inference; for training once more for the weight gradients, and once more for the input gradients
    but the first layer's. And the callable computes what the products say."""
    from tinyconv.layers import DepthwiseConv2D
    case = bm.Case("train", 0.25, 32, 4, 3, 5, 0.1, None)
    model = bm.build_ours(case)
    shapes = model.layer_shapes((32, 32, 3))
    gemm_macs = sum(layer.macs(s) for layer, s, _ in shapes if not isinstance(layer, DepthwiseConv2D)) * case.batch
    first = shapes[0][0].macs(shapes[0][1]) * case.batch

    def macs(products, kind=""):
        return sum(m * k * n for m, k, n, what in products if what.endswith(kind))
    infer = bm.gemm_products(model, case._replace(mode="infer"))
    train = bm.gemm_products(model, case)
    assert macs(infer) == gemm_macs and len(infer) == 15  # conv1, 13 pointwise, the classifier
    assert macs(train, "forward") == macs(train, "weight gradient") == gemm_macs
    assert macs(train, "input gradient") == gemm_macs - first and len(train) == 3 * 15 - 1
    assert {what.split()[0] for *_, what in infer} == {layer.name for layer, s, _ in shapes
                                                       if layer.macs(s) and not isinstance(layer, DepthwiseConv2D)}
    # a thin 1x1 conv's weight gradient is timed as the engine multiplies it, (dy.T @ x): K_out x NHW x C_in
    pw1 = next(layer for layer, _, _ in shapes if layer.name == "conv_pw_1")
    assert pw1.in_channels <= 32
    assert [p[:3] for p in train if p[3] == "conv_pw_1 weight gradient"] == [
        (pw1.out_channels, case.batch * 16 * 16, pw1.in_channels)]
    bm.gemm_floor(model, case)()  # every product's operands fit its buffers (a wrong reshape raises)


def test_model_profile_in_process_on_a_tiny_case():
    case = bm.Case("train", 0.25, 32, 4, 3, 5, 0.1, None)
    model = bm.build_ours(case)
    times, step = bm.profile(model, case, *bm.batch(case), steps=1)
    assert step > 0 and "**training step**" in bm.profile_table(model, case, times, step)


def test_case_names_are_unique_and_found():
    assert len({c.name for c in bm.CASES}) == len(bm.CASES)
    for c in bm.CASES:
        assert bm.case_by_name(c.name) is c
    with pytest.raises(ValueError, match="unknown case"):
        bm.case_by_name("nope")


@pytest.mark.parametrize("main", [bm.main, bk.main])
@pytest.mark.parametrize("repeats", ["0", "-3", "two"])
def test_repeats_must_be_a_positive_integer(main, repeats, capsys):
    """A bad --repeats stops before any worker starts or any results file is written (it used to run, with 0 taken
    as the default and a negative count overwriting bench/results/kernels.md)."""
    with pytest.raises(SystemExit) as e:
        main(["--repeats", repeats, "--out", "/nonexistent/never-written.md"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--repeats" in err and "expected a positive integer" in err and repr(repeats) in err
