import pytest
import torch
import torch.nn as nn

from rescomp.config import MeasureConfig
from rescomp.measure import activation_bytes, count_macs, count_params, measure, state_dict_bytes
from rescomp.models import build_model, model_names


def tiny_net() -> nn.Module:
    # conv 3->4, 3x3, 8x8 output; then linear 256->10
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def test_counts_by_hand():
    net = tiny_net()
    assert count_params(net) == 3 * 4 * 9 + 256 * 10 + 10
    assert count_macs(net, 8) == 3 * 4 * 9 * 64 + 256 * 10  # one multiply-add = one MAC
    # what the footnote says fvcore adds: two per element for BatchNorm, one for adaptive average pooling,
    # none for max pooling
    assert count_macs(nn.Sequential(nn.BatchNorm2d(3)), 8) == 2 * 3 * 64
    assert count_macs(nn.Sequential(nn.AdaptiveAvgPool2d(1)), 8) == 3 * 64
    assert count_macs(nn.Sequential(nn.MaxPool2d(2)), 8) == 0
    act = activation_bytes(net, 8)
    # at the conv, its input (3*64 floats) and output (4*64) are live; flatten is a view of that
    # output (no new memory); at the linear, 256 + 10 floats.
    assert act == {"act_peak_bytes": (3 * 64 + 4 * 64) * 4, "act_max_tensor_bytes": 256 * 4}

    class Biased(nn.Module):  # a parameter read in forward (an FX get_attr node) is a weight, not an activation
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(1, 3, 8, 8))

        def forward(self, x):
            return x + self.bias

    assert activation_bytes(Biased(), 8) == {"act_peak_bytes": 2 * 3 * 64 * 4, "act_max_tensor_bytes": 3 * 64 * 4}


def test_a_view_of_a_quantized_activation_adds_no_memory():
    # By hand (3 x 32 x 32): the input (12,288 B fp32) lives until it is quantized (q, 3,072 B); v is a
    # view of q; a and b are dequantized copies (12,288 B each). At b, q (v shares it), a and b are live:
    # 27,648 B; then a's sum (4 B) while a and b still live: 27,652 B, the peak. Counting the view as new
    # memory gives 30,720 B at b.
    class M(nn.Module):
        def forward(self, x):
            q = torch.quantize_per_tensor(x, 0.1, 128, torch.quint8)
            v = q.reshape(1, -1)
            a = q.dequantize()
            b = v.dequantize()
            return a.sum() + b.sum() + q.int_repr().sum()

    assert activation_bytes(M(), 32) == {"act_peak_bytes": 27_652, "act_max_tensor_bytes": 12_288}


def test_resnet56_macs_match_he_et_al():
    # He et al. quote ~125 M multiply-adds for the convolutions; fvcore also counts BN and the fc.
    macs = count_macs(build_model({"arch": "resnet56", "num_classes": 10}), 32)
    assert macs == 126_554_752


def test_size_and_latency_are_measured():
    net = tiny_net()
    assert 4 * count_params(net) < state_dict_bytes(net) < 4 * count_params(net) + 4096
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as training runs (train.threads), while latency is pinned to measure.threads
    try:
        row = measure(net, 8, MeasureConfig(batch_sizes=[1, 2], warmup=1, repeats=3, threads=1))
    finally:
        torch.set_num_threads(before)
    assert row["cpu_threads"] == 1 and row["latency_device"].startswith("cpu:") and row["latency_device"].endswith("(1 threads)")
    assert 0 < row["latency_ms_cpu_b1"] < 1000 and 0 < row["latency_ms_cpu_b2"] < 1000
    assert "gpu_images_per_s_b256" not in row or row["gpu_images_per_s_b256"] > 0


@pytest.mark.parametrize("arch", [a for a in model_names() if a.startswith(("resnet2", "cifar", "squeeze"))])
def test_every_count_is_positive_for_registry_models(arch):
    row = measure(build_model({"arch": arch, "num_classes": 10}), 32, MeasureConfig(latency=False))
    assert row["params"] > 0 and row["macs"] > 0 and row["size_bytes"] > 4 * row["params"]


# Latency with its spread (issue 15, point 5). Wrong versions these catch: models timed one after the
# other instead of interleaved; the spread rule ignored (always exactly `repeats` passes, or never
# stopping early when the spread is already small); the IQR computed on the wrong quartiles; a
# speed-up flagged as real when the two ranges overlap.

class _Scripted(nn.Module):
    """A model whose forward pass 'takes' scripted milliseconds on a fake clock, and logs its calls."""

    def __init__(self, name, durations, clock, log):
        super().__init__()
        self.name, self.durations, self.clock, self.log, self.i = name, durations, clock, log, 0
        self.nhwc: list[bool] = []  # per call: was its input in channels_last (NHWC) memory?

    def forward(self, x):
        self.log.append(self.name)
        self.nhwc.append(x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))
        self.clock[0] += self.durations[self.i % len(self.durations)] / 1e3
        self.i += 1
        return x


@pytest.fixture
def fake_clock(monkeypatch):
    import types

    import rescomp.measure as m

    clock = [0.0]
    monkeypatch.setattr(m, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(m.checkpoint, "copy_network", lambda model: model)  # keep the scripted counters
    return clock


def test_models_are_timed_interleaved_until_the_spread_is_small(fake_clock):
    from rescomp.measure import cpu_latency_stats

    log = []
    steady = _Scripted("steady", [2.0], fake_clock, log)
    noisy = _Scripted("noisy", [1.0, 5.0], fake_clock, log)
    st = cpu_latency_stats({"steady": (steady, False)}, 4, 1, warmup=0, repeats=4, max_spread=0.05)
    assert st["steady"] == pytest.approx({"median": 2.0, "q1": 2.0, "q3": 2.0, "n": 4})  # no spread: stops at `repeats`
    log.clear()
    st = cpu_latency_stats({"steady": (steady, False), "noisy": (noisy, False)}, 4, 1, warmup=1, repeats=4,
                           max_spread=0.05)
    assert log[:6] == ["steady", "noisy"] * 3  # one pass of each per round
    assert st["noisy"]["n"] == st["steady"]["n"] == 80  # spread never small: 20 x repeats rounds
    # 80 passes alternating 5 and 1 ms (after a warm-up pass of 1): 40 of each
    assert [st["noisy"][k] for k in ("median", "q1", "q3")] == pytest.approx([3.0, 1.0, 5.0])
    log.clear()
    st = cpu_latency_stats({"noisy": (noisy, False)}, 4, 1, warmup=0, repeats=4, max_spread=None)
    assert st["noisy"]["n"] == 4  # max_spread null: exactly `repeats`


def test_int8_speed_up_within_the_noise_is_flagged(fake_clock, monkeypatch):
    import rescomp.measure as m

    log = []
    fp32 = _Scripted("fp32", [10.0, 12.0], fake_clock, log)
    fast = _Scripted("int8", [5.0, 6.0], fake_clock, log)
    close = _Scripted("int8", [10.5, 11.5], fake_clock, log)
    monkeypatch.setattr(m, "state_dict_bytes", lambda model: 0)
    monkeypatch.setattr(m, "_activation_row", lambda model, size: {})
    cfg = MeasureConfig(batch_sizes=[1], warmup=0, repeats=4, max_spread=None)
    row = m.measure_int8(fast, 4, cfg, fp32=fp32)
    assert row["speedup_cpu_b1"] == pytest.approx(11.0 / 5.5) and not row["speedup_within_noise_cpu_b1"]
    assert row["fp32_latency_ms_cpu_b1"] == pytest.approx(11.0) and row["latency_iqr_ms_cpu_b1"] == pytest.approx(1.0)
    row = m.measure_int8(close, 4, cfg, fp32=fp32)
    assert row["speedup_within_noise_cpu_b1"]


# Wrong versions: a pruned or shortened network timed alone (at another moment than the network it is
# compared with), or the two timed one after the other; the speed-up inverted.
def test_a_network_is_timed_interleaved_with_its_reference(fake_clock, monkeypatch):
    import torch

    import rescomp.measure as m

    for name in ("count_params", "count_buffers", "count_bn_stats", "count_macs", "state_dict_bytes"):
        monkeypatch.setattr(m, name, lambda *a, **k: 0)
    monkeypatch.setattr(m, "_activation_row", lambda model, size: {})
    log = []
    small, big = _Scripted("small", [4.0], fake_clock, log), _Scripted("big", [8.0, 10.0], fake_clock, log)
    row = m.measure(small, 4, MeasureConfig(batch_sizes=[1], warmup=0, repeats=4, max_spread=None), reference=big)
    assert log == ["small", "big"] * 4
    assert row["speedup_cpu_b1"] == pytest.approx(9.0 / 4.0) and not row["speedup_within_noise_cpu_b1"]
    assert row["reference_latency_ms_cpu_b1"] == pytest.approx(9.0)
    # measure.channels_last (true by default) times both in NHWC: the input too, not the weights alone, and
    # the reference as the network, or the speed-up compares two layouts
    assert small.nhwc == big.nhwc == [True] * 4
    small.nhwc, big.nhwc = [], []
    m.measure(small, 4, MeasureConfig(batch_sizes=[1], warmup=0, repeats=2, max_spread=None, channels_last=False),
              reference=big)
    assert small.nhwc == big.nhwc == [False] * 2

    class Step(nn.Module):  # a training step: forward on the fake clock, then a linear head to backward through
        def __init__(self, name, ms):
            super().__init__()
            self.tick, self.head = _Scripted(name, [ms], fake_clock, log), nn.Linear(3, 2)

        def forward(self, x):
            threads.add(torch.get_num_threads())
            modes.add(self.training)
            return self.head(self.tick(x).mean(dim=(2, 3)))

    log.clear()
    threads, modes, before = set(), set(), torch.get_num_threads()
    torch.set_num_threads(2)  # training's threads; the steps are timed with measure.threads, as the latencies
    try:
        t = m.step_times_ms(Step("small", 2.0), 4, 2, torch.device("cpu"), runs=3, warmup=1, reference=Step("big", 6.0),
                            threads=1)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert log == ["small", "big"] * 4 and threads == {1} and after == 2  # training's threads given back
    assert modes == {True}  # a training step: BatchNorm and dropout as in training
    assert t["forward_ms_b2"] == pytest.approx(2.0) and t["reference_forward_ms_b2"] == pytest.approx(6.0)
    assert t["backward_ms_b2"] == 0.0  # the fake clock ticks in forward only: backward's time is its own
    assert set(t) == {"forward_ms_b2", "backward_ms_b2", "reference_forward_ms_b2", "reference_backward_ms_b2"}


# Wrong versions: ONNX Runtime timed with other threads than PyTorch (its default: every core); the
# fastest runtime chosen as the slowest; ONNX Runtime timed apart from eager (separate rounds); a
# runtime list without eager (the tables' latency columns would vanish).
def test_onnxruntime_is_timed_beside_eager_with_the_same_threads(monkeypatch):
    pytest.importorskip("onnxruntime")
    import rescomp.measure as m

    net = tiny_net()
    cfg = MeasureConfig(batch_sizes=[1, 2], warmup=1, repeats=3, threads=1, runtimes=["eager", "onnxruntime"])
    seen = []
    real = m.cpu_latency_stats

    def spy(models, *a, **kw):
        seen.append(sorted(models))
        return real(models, *a, **kw)

    monkeypatch.setattr(m, "cpu_latency_stats", spy)
    row = m.measure(net, 8, cfg)
    assert seen == [["m", "m@onnxruntime"]] * 2  # both runtimes in the same interleaved rounds, per batch size
    for b in (1, 2):
        assert row[f"latency_ms_ort_b{b}"] > 0 and row[f"latency_ms_cpu_b{b}"] > 0
        assert row[f"fastest_runtime_b{b}"] == min(("eager", "onnxruntime"),
                                                    key=lambda r: row[f"latency_ms_{m.RUNTIME_COLUMN[r]}_b{b}"])
    ort = m._ort_forward(net, 8, threads=1)
    assert ort.session.get_session_options().intra_op_num_threads == 1
    assert torch.allclose(ort(torch.ones(2, 3, 8, 8)), net.eval()(torch.ones(2, 3, 8, 8)), atol=1e-5)
    with pytest.raises(ValueError, match="must include eager"):
        MeasureConfig(runtimes=["onnxruntime"])


def test_the_fastest_runtime_is_the_one_with_the_lowest_median(monkeypatch):
    import rescomp.measure as m

    monkeypatch.setattr(m, "_ort_forward", lambda model, size, n: model)
    monkeypatch.setattr(m, "cpu_latency_stats", lambda models, *a, **kw: {
        k: {"median": 2.0 if "@" in k else 5.0, "q1": 1.0, "q3": 3.0, "n": 3} for k in models})
    rows = m._latency_row({"m": (tiny_net(), False)}, 8, MeasureConfig(batch_sizes=[1], runtimes=["eager", "onnxruntime"]),
                          runtimes=("m",))
    assert rows["m"]["fastest_runtime_b1"] == "onnxruntime" and rows["m"]["latency_ms_ort_b1"] == 2.0


# Wrong version: a pruned network's speed-up read on another runtime than its unpruned one (the
# unpruned network in ONNX Runtime against the pruned one in eager PyTorch).
def test_a_pruned_speed_up_compares_both_networks_on_one_runtime():
    from rescomp.measure import _speedup

    cfg = MeasureConfig(batch_sizes=[1])
    base = {"latency_ms_cpu_b1": 10.0, "latency_iqr_ms_cpu_b1": 0.1, "latency_ms_ort_b1": 2.0,
            "latency_iqr_ms_ort_b1": 0.1, "fastest_runtime_b1": "onnxruntime"}
    new = {"latency_ms_cpu_b1": 1.0, "latency_iqr_ms_cpu_b1": 0.1, "latency_ms_ort_b1": 1.6,
           "latency_iqr_ms_ort_b1": 0.1, "fastest_runtime_b1": "eager"}
    assert _speedup(base, new, cfg, "reference", same_runtime=True)["speedup_cpu_b1"] == pytest.approx(2.0 / 1.6)


# Wrong versions found by a mutation survey (each checked by mutating the code; scripts/mutants.py):
# "params + BN stats" counting every buffer (BN's batch counters too) or the means only, "buffers" only
# BN statistics; the timing loop past max_seconds; quartiles by another method than the inclusive one
# the tables state; warm-up passes skipped; a speed-up called within the noise when the gap exceeds the
# mean of the two IQRs; a training step timed in eval mode, its backward including its forward, or the
# caller's thread count not given back (test_a_network_is_timed_interleaved_with_its_reference); with
# channels_last, the input left NCHW or the reference timed in NCHW (same test); a parameter read in forward
# counted as an activation (test_counts_by_hand).
def test_bn_statistics_and_buffers_by_hand():
    cfg = MeasureConfig(latency=False, gpu_throughput=False)
    row = measure(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)), 8, cfg)
    assert (row["params"], row["params_with_bn_stats"], row["buffers"]) == (108 + 8, 108 + 8 + 8, 4 + 4 + 1)


def test_the_timing_loop_stops_at_max_seconds_and_reads_inclusive_quartiles(fake_clock):
    from rescomp.measure import _speedup, cpu_latency_stats

    slow = _Scripted("slow", [1000.0, 5000.0], fake_clock, [])  # never within 5 %: only the clock stops it
    st = cpu_latency_stats({"slow": (slow, False)}, 4, 1, warmup=0, repeats=4, max_spread=0.05, max_seconds=20)
    assert st["slow"]["n"] == 8  # 1 + 5 + 1 + 5 + 1 + 5 + 1 = 19 s, then one more round: 24 s
    passes = []
    ramp = _Scripted("ramp", [1.0, 2.0, 3.0, 4.0], fake_clock, passes)
    st = cpu_latency_stats({"ramp": (ramp, False)}, 4, 1, warmup=2, repeats=4, max_spread=None)
    assert len(passes) == 2 + 4 and st["ramp"]["n"] == 4  # the warm-up passes run, and are not timed
    assert (st["ramp"]["q1"], st["ramp"]["median"], st["ramp"]["q3"]) == pytest.approx((1.75, 2.5, 3.25))
    base = {"latency_ms_cpu_b1": 10.0, "latency_iqr_ms_cpu_b1": 2.0}
    within = lambda q, iqr: _speedup(base, {"latency_ms_cpu_b1": q, "latency_iqr_ms_cpu_b1": iqr},  # noqa: E731
                                     MeasureConfig(batch_sizes=[1]), "reference")["speedup_within_noise_cpu_b1"]
    assert not within(8.0, 1.0) and within(8.0, 2.0)  # the gap of 2 ms against (2 + 1) / 2 and (2 + 2) / 2
