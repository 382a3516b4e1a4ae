"""Tests for workbench.quant.calibrators (histogram collection and amax selection)."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch

from workbench.quant.calibrators import (
    METHODS,
    AbsHistogram,
    NonFiniteError,
    amax_entropy,
    amax_max,
    amax_mse,
    amax_percentile,
    compute_amax,
)


def _modelopt_histogram_module():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from modelopt.torch.quantization.calib import histogram
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        pytest.skip(f"modelopt is not importable ({type(exc).__name__}: {exc})")
    return histogram


def _hist(batches, num_bins=2048, max_bins=16384):
    h = AbsHistogram(num_bins=num_bins, max_bins=max_bins)
    for b in batches:
        h.update(b)
    return h


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _student_t(n, df, seed):
    # Student-t from its definition, so the sample only depends on our generator.
    g = _gen(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    chi2 = (torch.randn(n, df, generator=g, dtype=torch.float64) ** 2).sum(1)
    return (z / torch.sqrt(chi2 / df)).float()


def _laplace(n, seed):
    u = torch.rand(n, generator=_gen(seed), dtype=torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()


def _make_histograms(num_bins):
    n = 200_000
    gap_data = torch.cat(
        [
            torch.rand(20_000, generator=_gen(5)) * 0.2,  # dense low region
            0.9 + torch.rand(300, generator=_gen(6)) * 0.05,  # isolated cluster
            torch.tensor([2.5, 3.0]),  # far outliers: bins in between stay empty
        ]
    )
    return {
        "gaussian": _hist([torch.randn(n, generator=_gen(1))], num_bins),
        "relu": _hist([torch.relu(torch.randn(n, generator=_gen(2)))], num_bins),  # half zeros
        "laplace": _hist([_laplace(n, 3)], num_bins),
        "student_t": _hist([_student_t(n, 3, 4)], num_bins),
        "empty_bins": _hist([gap_data], num_bins),
        # Second batch reaches 1.3x further: the edges grow with the same width.
        "grown": _hist(
            [torch.randn(n // 2, generator=_gen(7)), 1.3 * torch.randn(n // 2, generator=_gen(8))],
            num_bins,
        ),
    }


@pytest.fixture(scope="module")
def hists_2048():
    return _make_histograms(2048)


@pytest.fixture(scope="module")
def hists_512():
    return _make_histograms(512)


def _np(h):
    return h.counts.numpy().copy(), h.edges.numpy().copy()


def _assert_same_edge(mine, ref, edges):
    """modelopt returns a float32 tensor of the chosen edge: check we chose the very same edge."""
    ref = float(ref)
    idx = int(np.argmin(np.abs(edges - ref)))
    assert np.float32(mine) == np.float32(ref), (mine, ref)
    assert mine == edges[idx], (mine, edges[idx])


# --------------------------------------------------------------- entropy
# (histogram set, name, num_bits, unsigned, stride): 2048-bin histograms with
# stride 4 (the reference costs ~0.5 s each), stride 1 on one 2048-bin and on
# 512-bin histograms (stride 1 on 2048 bins costs the reference ~2 s).
ENTROPY_CASES = [
    ("2048", "gaussian", 8, False, 1),
    ("2048", "relu", 8, False, 4),
    ("2048", "laplace", 8, False, 4),
    ("2048", "empty_bins", 8, False, 4),
    ("512", "student_t", 8, False, 1),
    ("512", "empty_bins", 8, False, 1),
    ("512", "relu", 8, False, 1),
    ("512", "grown", 8, False, 1),
    ("512", "laplace", 7, False, 1),
    ("512", "student_t", 8, True, 4),
    ("512", "relu", 8, True, 1),
]


@pytest.mark.parametrize("which,name,num_bits,unsigned,stride", ENTROPY_CASES)
def test_entropy_matches_modelopt(hists_2048, hists_512, which, name, num_bits, unsigned, stride):
    ref_mod = _modelopt_histogram_module()
    h = (hists_2048 if which == "2048" else hists_512)[name]
    counts, edges = _np(h)
    mine = amax_entropy(h, num_bits=num_bits, unsigned=unsigned, stride=stride)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reference divides 0/0 on empty prefixes
        ref = ref_mod._compute_amax_entropy(counts.copy(), edges, num_bits, unsigned, stride, 128)
    _assert_same_edge(mine, ref, edges)
    # our own histogram was not modified by the bins[0] = bins[1] step
    assert torch.equal(h.counts, torch.from_numpy(counts))


def test_entropy_reference_quirks_sparse_histograms():
    """Histograms where the reference produces Inf/NaN divergences and exact ties."""
    ref_mod = _modelopt_histogram_module()
    cases = [
        # everything in bin 0 except one outlier: bins[0] = bins[1] = 0 -> NaN prefix
        torch.cat([torch.zeros(1000), torch.tensor([1.0])]),
        # a constant value: all mass in the last bin
        torch.full((500,), 0.7),
        # values on a few distinct levels (quantized activations): exact ties
        torch.tensor([0.0, 1.0, 2.0, 3.0]).repeat(250),
        torch.tensor([0.25, 0.5, 3.0]).repeat_interleave(torch.tensor([100, 50, 1])),
    ]
    for x in cases:
        h = _hist([x], num_bins=300)  # small: the reference is slow at stride 1
        counts, edges = _np(h)
        for num_bits, unsigned, stride in [(8, False, 1), (8, True, 3)]:
            mine = amax_entropy(h, num_bits=num_bits, unsigned=unsigned, stride=stride)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = ref_mod._compute_amax_entropy(
                    counts.copy(), edges, num_bits, unsigned, stride, 128
                )
            _assert_same_edge(mine, ref, edges)


def test_entropy_is_fast_on_2048_bins(hists_2048):
    h = hists_2048["laplace"]
    assert len(h.counts) == 2048
    amax_entropy(h)  # warm up (first call imports scipy for the tie-break)
    best = min(_timed(lambda: amax_entropy(h)) for _ in range(3))
    assert best < 0.2, f"vectorised entropy took {best:.3f} s on 2048 bins"


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------ percentile
@pytest.mark.parametrize("name", ["gaussian", "relu", "laplace", "student_t", "empty_bins", "grown"])
def test_percentile_matches_modelopt(hists_2048, name):
    ref_mod = _modelopt_histogram_module()
    h = hists_2048[name]
    counts, edges = _np(h)
    for p in (50.0, 99.0, 99.9, 99.99, 99.999, 100.0):
        mine = amax_percentile(h, p)
        ref = ref_mod._compute_amax_percentile(counts.copy(), edges, p)
        _assert_same_edge(mine, ref, edges)


def test_percentile_rejects_bad_values(hists_2048):
    for p in (0.0, -1.0, 100.5):
        with pytest.raises(ValueError, match="percentile"):
            amax_percentile(hists_2048["gaussian"], p)


# ------------------------------------------------------------------- mse
def _brute_force_mse_amax(samples, candidates, num_bits=8):
    """argmin over candidates of sum((fake_quant(x) - x)**2) on the raw samples."""
    qmax = 2 ** (num_bits - 1) - 1
    x = samples.double()[None, :]
    scale = (candidates.double() / qmax)[:, None]
    q = torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale
    err = ((q - x) ** 2).sum(dim=1)
    return float(candidates[int(torch.argmin(err))])


@pytest.mark.parametrize("num_bits", [8, 4])
def test_mse_matches_brute_force_on_raw_samples(num_bits):
    # Samples sit on the centers of a 256-bin grid over [0, 4], so the histogram
    # represents them (almost) exactly; the single sample at 4.0 fixes the range.
    num_bins, top = 256, 4.0
    width = top / num_bins
    g = _gen(11)
    idx = (torch.randn(30_000, generator=g).abs() * 40).long().clamp_(max=num_bins - 1)
    samples = torch.cat([(idx.double() + 0.5) * width, torch.tensor([top], dtype=torch.float64)])
    h = _hist([samples.float()], num_bins=num_bins)
    assert h.edges[-1] == top

    mine = amax_mse(h, num_bits=num_bits, start_bin=8)
    centers = (h.edges[1:] + h.edges[:-1]) / 2
    brute = _brute_force_mse_amax(samples, centers[8:], num_bits)
    assert abs(mine - brute) <= width + 1e-12, (mine, brute)


def test_mse_matches_brute_force_on_continuous_samples():
    # Continuous data: the histogram only approximates the samples, so compare
    # with the brute-force optimum over a fine grid within a couple of bins.
    num_bins = 2048
    x = torch.randn(5_000, generator=_gen(12)).abs()
    h = _hist([x], num_bins=num_bins)
    mine = amax_mse(h, num_bits=4)
    width = float(h.edges[1])
    candidates = torch.linspace(float(h.edges[128]), float(h.edges[-1]), 800, dtype=torch.float64)
    brute = _brute_force_mse_amax(x, candidates, num_bits=4)
    assert abs(mine - brute) <= 3 * width, (mine, brute, width)


def test_mse_gaussian_is_between_two_sigma_and_max(hists_2048):
    h = hists_2048["gaussian"]  # sigma = 1
    a = amax_mse(h)
    assert 2.0 < a < amax_max(h)
    # 4-bit clips much harder than 8-bit
    assert amax_mse(h, num_bits=4) < a


def test_mse_and_entropy_strides_and_unsigned_run(hists_2048):
    h = hists_2048["relu"]
    for stride in (1, 4):
        for unsigned in (False, True):
            a = amax_mse(h, unsigned=unsigned, stride=stride)
            assert 0 < a <= amax_max(h)
            e = amax_entropy(h, unsigned=unsigned, stride=stride)
            assert 0 < e <= float(h.edges[-1])


# ----------------------------------------------------------- histogram
def test_growth_keeps_counts_amax_and_bounds():
    max_bins = 4096
    h = AbsHistogram(num_bins=2048, max_bins=max_bins)
    g = _gen(21)
    raw, n_total, true_amax = [], 0, 0.0
    for scale in (1.0, 1.5, 3.0, 10.0, 1000.0, 2.0):
        x = torch.randn(40_000, generator=g) * scale
        h.update(x)
        raw.append(x.abs())
        n_total += x.numel()
        true_amax = max(true_amax, float(x.abs().max()))
        assert h.total == n_total
        assert h.amax == true_amax
        assert len(h.counts) <= max_bins
        assert len(h.edges) == len(h.counts) + 1
        assert float(h.edges[-1]) >= h.amax
        assert h.counts.dtype == torch.float64 and h.edges.dtype == torch.float64
        assert h.counts.device.type == "cpu" and h.edges.device.type == "cpu"
        assert torch.equal(h.counts, h.counts.round()) and bool((h.counts >= 0).all())
        widths = h.edges.diff()
        assert torch.allclose(widths, widths[0].expand_as(widths), rtol=1e-9, atol=0)
    # The counts agree with the raw data: per-edge CDF, up to a few values that
    # sit within float32 rounding of a bin edge.
    allx = torch.cat(raw).double()
    cdf_hist = torch.cumsum(h.counts, 0)
    cdf_raw = torch.searchsorted(allx.sort().values, h.edges[1:], right=True).double()
    assert float((cdf_hist - cdf_raw).abs().max()) <= 5


def test_growth_without_merge_keeps_earlier_edges():
    h = _hist([torch.randn(10_000, generator=_gen(22))])
    edges0 = h.edges.clone()
    counts0 = h.counts.clone()
    x = torch.tensor([float(edges0[-1]) * 1.5])
    new_max = float(x)  # the float32 value is what the histogram sees
    h.update(x)
    assert torch.equal(h.edges[: len(edges0)], edges0)
    assert torch.equal(h.counts[: len(counts0)], counts0)
    # same width, just enough bins to hold the new max (in the last bin)
    assert abs(len(h.counts) - 1.5 * 2048) <= 1
    assert h.edges[-2] < new_max <= h.edges[-1] and h.counts[-1] == 1
    assert torch.allclose(h.edges.diff(), h.edges[1].expand(len(h.counts)), rtol=1e-9, atol=0)


def test_histogram_counts_beyond_float32_integer_range():
    # > 2**24 identical values land in one bin: float32 histc counts would
    # saturate at 16777216; the chunked histogram stays exact.
    n = (1 << 24) + 1000
    x = torch.ones(n)
    x[0] = 2.0
    h = _hist([x])
    assert h.total == n
    assert float(h.counts.max()) == n - 1


def test_merge_equal_widths_is_exact():
    a_data = torch.randn(50_000, generator=_gen(31))
    b_data = torch.randn(50_000, generator=_gen(32)) * 0.8
    top = float(a_data.abs().max())
    b_data[0] = top  # same first max -> same bin width on both sides
    a, b = _hist([a_data]), _hist([b_data])
    both = _hist([a_data, b_data])
    a.merge(b)
    assert torch.equal(a.edges, both.edges)
    assert torch.equal(a.counts, both.counts)
    assert a.amax == both.amax and a.total == both.total


def test_merge_different_ranges_matches_single_histogram():
    a_data = torch.randn(60_000, generator=_gen(33))
    b_data = torch.randn(40_000, generator=_gen(34)) * 2.5  # wider: coarser bins
    a, b = _hist([a_data]), _hist([b_data])
    both = _hist([a_data, b_data])
    a.merge(b)
    assert a.total == both.total == a_data.numel() + b_data.numel()
    assert a.amax == both.amax == max(float(a_data.abs().max()), float(b_data.abs().max()))
    assert len(a.edges) == len(a.counts) + 1 and len(a.counts) <= a.max_bins
    w = max(a.width, both.width)
    for p in (90.0, 99.0, 99.9, 99.99):
        assert abs(amax_percentile(a, p) - amax_percentile(both, p)) <= 2 * w, p
    # the other way round as well (merging a wider histogram into a narrow one)
    b2 = _hist([b_data])
    b2.merge(_hist([a_data]))
    assert b2.total == both.total and torch.equal(b2.counts, a.counts)


def test_merge_with_empty_and_zero_histograms():
    data = torch.randn(1000, generator=_gen(35))
    h = _hist([data])
    h.merge(AbsHistogram())  # nothing collected: no-op
    assert h.total == 1000
    zeros = _hist([torch.zeros(7)])
    h.merge(zeros)
    assert h.total == 1007 and h.counts[0] >= 7
    e = AbsHistogram()
    e.merge(h)
    assert torch.equal(e.counts, h.counts) and e.amax == h.amax
    z = _hist([torch.zeros(3)])
    z.merge(h)
    assert z.total == 1010 and z.amax == h.amax


def test_zeros_then_data():
    h = AbsHistogram(num_bins=64)
    h.update(torch.zeros(10))
    assert h.total == 10 and h.amax == 0.0
    for m in METHODS:
        assert compute_amax(h, m) == 0.0  # all-zero data -> 0 amax
    h.update(torch.tensor([0.5, -1.0]))
    assert h.total == 12 and h.amax == 1.0 and len(h.counts) == 64
    assert h.counts[0] == 10 and h.counts[-1] == 1


def test_input_dtypes_and_shapes():
    h = AbsHistogram(num_bins=16)
    h.update(torch.tensor([[-128, 5], [7, 0]], dtype=torch.int8))  # abs(-128) overflows in int8
    assert h.amax == 128.0 and h.total == 4
    h.update(torch.tensor([1.5, -300.25], dtype=torch.float64))
    assert h.amax == 300.25
    h.update(torch.randn(3, 4, 5).half())
    h.update(torch.randn(8).bfloat16())
    h.update(torch.empty(0))  # ignored
    assert h.total == 4 + 2 + 60 + 8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_input_matches_cpu():
    xs = [torch.randn(100_000, generator=_gen(41)) * s for s in (1.0, 3.0)]
    cpu = _hist(xs)
    gpu = _hist([x.cuda() for x in xs])
    assert torch.equal(gpu.edges, cpu.edges)
    assert gpu.counts.device.type == "cpu" and gpu.counts.dtype == torch.float64
    assert gpu.total == cpu.total and gpu.amax == cpu.amax
    assert float((gpu.counts - cpu.counts).abs().sum()) <= 10  # edge rounding only


# ------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(bad):
    h = _hist([torch.randn(100, generator=_gen(51))])
    before = h.counts.clone()
    x = torch.randn(10, 10)
    x[1, 2] = bad
    x[3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match=r"2 non-finite value") as info:
        h.update(x)
    assert isinstance(info.value, ValueError)
    assert "NaN or Inf" in str(info.value)
    assert torch.equal(h.counts, before) and h.total == 100  # batch was not counted


def test_float64_beyond_float32_range_raises():
    h = AbsHistogram()
    with pytest.raises(NonFiniteError, match="1 non-finite value"):
        h.update(torch.tensor([1.0, -1e39], dtype=torch.float64))
    assert h.is_empty


def test_no_data_raises_and_unknown_method():
    h = AbsHistogram()
    for m in METHODS:
        with pytest.raises(ValueError, match="no calibration data was collected"):
            compute_amax(h, m)
    h.update(torch.randn(100, generator=_gen(52)))
    with pytest.raises(ValueError, match="max, percentile, entropy, mse"):
        compute_amax(h, "minmax")


def test_compute_amax_dispatch(hists_2048):
    h = hists_2048["laplace"]
    assert compute_amax(h, "max") == amax_max(h) == h.amax
    assert compute_amax(h, "percentile", percentile=99.9) == amax_percentile(h, 99.9)
    assert compute_amax(h, "entropy") == amax_entropy(h)
    assert compute_amax(h, "mse", num_bits=4) == amax_mse(h, num_bits=4)
    assert compute_amax(h, "entropy", unsigned=True) == amax_entropy(h, unsigned=True)
