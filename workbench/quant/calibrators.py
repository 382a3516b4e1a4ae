"""Histogram collection and amax selection for INT8 activation calibration.

Pure math, no modelopt dependency: the quantizers elsewhere in the package
collect an `AbsHistogram` per tensor and turn it into one amax with
`compute_amax`. Quantization is symmetric, signed int8 by default, so the
scale that follows from an amax is ``amax / 127``.

The entropy method reproduces modelopt 0.47's ``_compute_amax_entropy``
bit for bit (same candidate, same tie-breaking, same NaN/Inf quirks) while
being vectorised; the MSE method is written from its definition because
modelopt's histogram MSE is not usable.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "AbsHistogram",
    "NonFiniteError",
    "METHODS",
    "amax_max",
    "amax_percentile",
    "amax_entropy",
    "amax_mse",
    "compute_amax",
    "SignedHistogram",
    "affine_range",
    "power_of_two_amax",
    "power_of_two_weight_amax",
]

METHODS = ("max", "percentile", "entropy", "mse")

# torch.histc accumulates counts in the input dtype (float32). float32 holds
# every integer up to 2**24 exactly, so histogramming at most that many
# elements per call keeps each chunk's counts exact before they are summed in
# float64.
_HISTC_CHUNK = 1 << 24

# Candidate chunk sizes: bound the temporary (candidates x bins) matrices.
_ENTROPY_CHUNK = 1024  # candidates per chunk: (1024 x 129) arrays, ~1 MB each
_MSE_CHUNK_ELEMS = 1 << 18  # candidates x non-empty bins per chunk: 2 MB float64, cache friendly

# The vectorised KL values differ from the reference's (other summation
# order) by ~1e-13 at worst; every candidate within this much of the minimum
# is recomputed exactly the way the reference does to break ties like it.
_ENTROPY_TIE_TOL = 1e-9


class NonFiniteError(ValueError):
    """A calibration batch held NaN or Inf values."""


class AbsHistogram:
    """Histogram of |x| over calibration batches, growing its range as larger values arrive.

    Bins are uniform over ``[0, edges[-1]]``. The first batch with a non-zero
    maximum fixes the bin width (``max / num_bins``); a later batch with a
    larger maximum appends bins of the same width, as modelopt's
    HistogramCalibrator (torch path) does, so earlier counts never move. If
    that would exceed ``max_bins`` bins, adjacent bins are merged (the width
    doubles) until it fits.

    ``counts`` (float64, CPU, integer valued) and ``edges`` (float64, CPU,
    ``len(counts) + 1``) are ``None`` until the first update. While only
    zeros have been seen the histogram is a single degenerate bin
    ``[0, 0]`` holding them.
    """

    def __init__(self, num_bins: int = 2048, max_bins: int = 16384):
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        if max_bins < num_bins:
            raise ValueError(f"max_bins ({max_bins}) must be >= num_bins ({num_bins})")
        self.num_bins = int(num_bins)
        self.max_bins = int(max_bins)
        self.counts: torch.Tensor | None = None
        self.edges: torch.Tensor | None = None
        self._amax = 0.0

    # ------------------------------------------------------------------ state
    @property
    def amax(self) -> float:
        """Largest |x| seen so far (exact, not a bin edge); 0.0 before any data."""
        return self._amax

    @property
    def total(self) -> float:
        """Number of values histogrammed so far."""
        return 0.0 if self.counts is None else float(self.counts.sum())

    @property
    def width(self) -> float:
        """Bin width (0.0 while the range is not set)."""
        if self.edges is None or len(self.edges) < 2:
            return 0.0
        return float(self.edges[1] - self.edges[0])

    @property
    def is_empty(self) -> bool:
        """True if no value has been histogrammed yet."""
        return self.counts is None

    def _has_range(self) -> bool:
        return self.edges is not None and float(self.edges[-1]) > 0.0

    def __repr__(self) -> str:
        if self.counts is None:
            return f"AbsHistogram(num_bins={self.num_bins}, empty)"
        return (
            f"AbsHistogram(bins={len(self.counts)}, range=[0, {float(self.edges[-1]):.6g}], "
            f"amax={self._amax:.6g}, total={self.total:.0f})"
        )

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the absolute values of ``x`` (any shape, device, real dtype)."""
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        if x.is_complex():
            raise TypeError("AbsHistogram.update: complex tensors are not supported")
        x = x.detach()
        if x.numel() == 0:
            return  # nothing to count; an empty batch is not calibration data
        if x.is_floating_point():
            n_bad = int(x.numel() - torch.isfinite(x).sum().item())
            if n_bad:
                raise NonFiniteError(
                    f"calibration batch has {n_bad} non-finite value(s) (NaN or Inf) out of "
                    f"{x.numel()} ({tuple(x.shape)}, {x.dtype}); check the model/inputs"
                )
            xa = x.abs().float().reshape(-1)
        else:
            # Cast before abs: abs() of the most negative int8/int64 overflows.
            xa = x.float().abs().reshape(-1)
        hist_max = float(xa.max())  # what histc sees (float32)
        if math.isinf(hist_max):
            n_bad = int(torch.isinf(xa).sum().item())
            raise NonFiniteError(
                f"calibration batch has {n_bad} non-finite value(s) after the cast to float32 "
                f"(|x| up to {float(x.abs().max()):g} overflows it); check the model/inputs"
            )
        # The exact max in x's own dtype (float64 values may round in float32).
        batch_amax = float(x.abs().max()) if x.dtype == torch.float64 else hist_max
        self._amax = max(self._amax, batch_amax)

        if hist_max == 0.0:
            # All zeros: they belong to bin 0 whatever range comes later.
            self._add_zeros(float(xa.numel()))
            return

        if not self._has_range():
            # First data with a range: [0, max] in num_bins bins. Zeros seen so
            # far (degenerate histogram) go to bin 0.
            zeros = self.total
            n = self.num_bins
            width = hist_max / n
            edges = torch.arange(n + 1, dtype=torch.float64) * width
            edges[-1] = hist_max
            self.edges = edges
            self.counts = torch.zeros(n, dtype=torch.float64)
            self.counts[0] += zeros
        elif hist_max > float(self.edges[-1]):
            self._grow_to(hist_max)

        self.counts += _histc_counts(xa, len(self.counts), float(self.edges[-1]))

    def _add_zeros(self, n: float) -> None:
        if self.counts is None:
            self.counts = torch.tensor([n], dtype=torch.float64)
            self.edges = torch.zeros(2, dtype=torch.float64)
        else:
            self.counts[0] += n

    def _grow_to(self, new_max: float) -> None:
        """Extend the edges to cover ``new_max`` keeping (or doubling) the bin width."""
        if new_max <= float(self.edges[-1]):
            return
        width = self.width
        factor = 1
        n_new = _bins_needed(new_max, width)
        while n_new > self.max_bins:
            factor *= 2
            n_new = _bins_needed(new_max, width * factor)
        counts = self.counts
        if factor > 1:
            counts = _fold(counts, factor)
            width = width * factor
            edges = torch.arange(len(counts) + 1, dtype=torch.float64) * width
        else:
            edges = self.edges
        n_old = len(counts)
        if n_new > n_old:
            extra = torch.arange(n_old + 1, n_new + 1, dtype=torch.float64) * width
            edges = torch.cat([edges, extra])
            counts = torch.cat([counts, torch.zeros(n_new - n_old, dtype=torch.float64)])
        self.counts, self.edges = counts, edges

    # ------------------------------------------------------------------ merge
    def merge(self, other: "AbsHistogram") -> None:
        """Add ``other``'s counts (e.g. from another process) into this histogram.

        The result covers the wider of the two ranges with the coarser of the
        two bin widths (doubled further if needed to stay within max_bins).
        Each source bin is moved whole into the target bin holding its center:
        counts stay integers and totals are exact; with equal widths (same
        first-batch max) or power-of-two width ratios the rebinning is exact.
        """
        if other.counts is None:
            return
        self._amax = max(self._amax, other._amax)
        if self.counts is None:
            self.counts = other.counts.clone()
            self.edges = other.edges.clone()
            return
        if not other._has_range():
            self.counts[0] += float(other.counts.sum())
            return
        if not self._has_range():
            zeros = float(self.counts.sum())
            self.counts = other.counts.clone()
            self.edges = other.edges.clone()
            self.counts[0] += zeros
            return

        w_self, w_other = self.width, other.width
        width = max(w_self, w_other)
        hi = max(float(self.edges[-1]), float(other.edges[-1]))
        factor = 1
        n = _bins_needed(hi, width)
        while n > self.max_bins:
            factor *= 2
            n = _bins_needed(hi, width * factor)
        width *= factor
        if width == w_self:
            # Keep our own edges as they are (bit for bit), extended if needed.
            self._grow_to(hi)
            target_edges = self.edges
            n = len(target_edges) - 1
            new_counts = self.counts.clone()
        else:
            target_edges = torch.arange(n + 1, dtype=torch.float64) * width
            new_counts = _rebin(self.counts, self.edges, width, n)
        new_counts += _rebin(other.counts, other.edges, width, n)
        self.counts, self.edges = new_counts, target_edges


def _bins_needed(hi: float, width: float) -> int:
    """Smallest n with n * width >= hi (guarding against rounding in the division)."""
    n = max(1, math.ceil(hi / width))
    while n * width < hi:
        n += 1
    return n


def _fold(counts: torch.Tensor, factor: int) -> torch.Tensor:
    """Sum groups of ``factor`` adjacent bins (zero-padding the tail)."""
    pad = (-len(counts)) % factor
    if pad:
        counts = torch.cat([counts, torch.zeros(pad, dtype=counts.dtype)])
    return counts.reshape(-1, factor).sum(dim=1)


def _rebin(counts: torch.Tensor, edges: torch.Tensor, width: float, n: int) -> torch.Tensor:
    """Move each bin whole into the bin of width ``width`` (n bins from 0) holding its center."""
    centers = (edges[1:] + edges[:-1]) / 2
    idx = torch.floor(centers / width).long().clamp_(0, n - 1)
    out = torch.zeros(n, dtype=torch.float64)
    out.index_add_(0, idx, counts)
    return out


def _histc_counts(xa: torch.Tensor, bins: int, hi: float) -> torch.Tensor:
    """float64 CPU counts of the flat float32 tensor ``xa`` over [0, hi], exact per chunk."""
    acc = None
    for start in range(0, xa.numel(), _HISTC_CHUNK):
        h = torch.histc(xa[start : start + _HISTC_CHUNK], bins=bins, min=0.0, max=hi).double()
        acc = h if acc is None else acc + h
    return acc.cpu()


# ---------------------------------------------------------------- amax methods
def _arrays(hist: AbsHistogram) -> tuple[np.ndarray, np.ndarray] | None:
    """(counts, edges) as float64 numpy copies, or None if the data were all zeros."""
    if hist.counts is None:
        raise ValueError("no calibration data was collected")
    if hist.amax == 0.0 or not hist._has_range():
        return None
    return hist.counts.numpy().astype(np.float64, copy=True), hist.edges.numpy().astype(np.float64)


def amax_max(hist: AbsHistogram) -> float:
    """The largest |x| seen (exact)."""
    if hist.counts is None:
        raise ValueError("no calibration data was collected")
    return float(hist.amax)


def amax_percentile(hist: AbsHistogram, percentile: float) -> float:
    """Edge where the CDF first reaches ``percentile / 100`` (modelopt's convention).

    ``edges[searchsorted(cumsum(counts / total), percentile / 100)]``, i.e. the
    left edge of the bin in which the CDF crosses, exactly as modelopt's
    ``_compute_amax_percentile`` computes it.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    arrs = _arrays(hist)
    if arrs is None:
        return 0.0
    counts, edges = arrs
    cdf = np.cumsum(counts / counts.sum())
    idx = int(np.searchsorted(cdf, percentile / 100))
    return float(edges[min(idx, len(edges) - 1)])


def _num_levels(num_bits: int, unsigned: bool) -> int:
    if not isinstance(num_bits, int) or num_bits < 2:
        raise ValueError(f"num_bits must be an integer >= 2, got {num_bits!r}")
    return 1 << (num_bits - 1 + int(unsigned))


def amax_entropy(
    hist: AbsHistogram,
    num_bits: int = 8,
    unsigned: bool = False,
    start_bin: int = 128,
    stride: int = 1,
) -> float:
    """amax minimising KL(P || Q), identical to modelopt 0.47's ``_compute_amax_entropy``.

    For each candidate i in ``range(start_bin, len(bins) + 1, stride)`` (with
    ``bins[0] = bins[1]`` as the reference does): P = bins[:i] with the mass
    beyond i folded into its last bin; Q = bins[:i] merged into
    ``2**(num_bits-1)`` (+unsigned) groups, each group's mass spread evenly
    over its non-empty bins. The last candidate with the smallest divergence
    wins and its left edge ``edges[i]`` is returned.

    Vectorised with a closed form: with T = total, S_i = sum(bins[:i]),
    G_j / n_j = mass / non-empty bins of group j and O_i = T - S_i,
    ``KL_i = (sum P log P - sum_j G_j log(G_j/n_j) - O_i log Q_{i-1}) / T
    - log T + log S_i``, where every sum comes from cumulative sums. Only the
    few candidates within ``_ENTROPY_TIE_TOL`` of the minimum are recomputed the
    reference's way, so that floating-point ties break identically.
    Reference quirks kept on purpose: Inf when bin i-1 is empty but mass lies
    beyond it; NaN (which np.argmin picks first) when bins[:i] are all empty.
    If the histogram has fewer than ``start_bin`` bins (where the reference
    fails), ``start_bin`` is lowered to the bin count.
    """
    nb = _num_levels(num_bits, unsigned)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    arrs = _arrays(hist)
    if arrs is None:
        return 0.0
    counts, edges = arrs
    bins = counts
    bins[0] = bins[1] if len(bins) > 1 else bins[0]  # reference quirk; `counts` is our copy
    n = len(bins)
    start = min(start_bin, n)
    cands = np.arange(start, n + 1, stride, dtype=np.int64)

    div = _entropy_divergences(bins, cands, nb)

    nan = np.isnan(div)
    if nan.any():
        # np.argmin over the reversed divergences returns the first NaN: the
        # reference therefore answers with the last NaN candidate.
        return float(edges[cands[np.nonzero(nan)[0][-1]]])
    dmin = div.min()
    if not np.isfinite(dmin):
        return float(edges[cands[-1]])  # all Inf: reversed argmin picks the last one
    near = np.nonzero(div <= dmin + _ENTROPY_TIE_TOL * (1.0 + abs(dmin)))[0]
    if len(near) == 1:
        best = near[0]
    else:
        exact = np.array([_reference_divergence(bins, int(cands[k]), nb) for k in near])
        best = near[len(exact) - 1 - int(np.argmin(exact[::-1]))]
    return float(edges[cands[best]])


def _entropy_divergences(bins: np.ndarray, cands: np.ndarray, nb: int) -> np.ndarray:
    """KL divergence of every candidate (closed form, float64), NaN/Inf like the reference."""
    n = len(bins)
    csum = np.concatenate([[0.0], np.cumsum(bins)])  # csum[m] = sum(bins[:m]); exact for integer counts
    nonzero = bins > 0
    znum = np.concatenate([[0], np.cumsum(nonzero)])  # number of non-empty bins below m
    blogb = np.zeros(n)
    blogb[nonzero] = bins[nonzero] * np.log(bins[nonzero])
    lsum = np.concatenate([[0.0], np.cumsum(blogb)])
    total = csum[-1]
    log_total = math.log(total)
    grp = np.arange(nb + 1, dtype=np.int64)

    out = np.empty(len(cands))
    for c0 in range(0, len(cands), _ENTROPY_CHUNK):
        i = cands[c0 : c0 + _ENTROPY_CHUNK]
        # np.digitize(range(i), linspace(0, i, nb + 1)) - 1 == floor(idx * nb / i):
        # nb is a power of two so the linspace points k * i / nb are exact. Group
        # j therefore spans bins [ceil(j * i / nb), ceil((j + 1) * i / nb)).
        lo = (grp[None, :] * i[:, None] + nb - 1) // nb  # (C, nb + 1), last column == i
        g_sum = np.diff(csum[lo], axis=1)  # mass of each group
        g_cnt = np.diff(znum[lo], axis=1)  # non-empty bins of each group
        # Q of every non-empty bin in group j is g_sum / g_cnt; empty groups get log 1 = 0.
        log_q = np.log(np.divide(g_sum, g_cnt, out=np.ones_like(g_sum), where=g_cnt > 0))
        cross = np.einsum("ij,ij->i", g_sum, log_q)  # sum over bins < i of bins * log Q

        s_in = csum[i]
        outl = total - s_in  # mass beyond the candidate, folded into P's last bin
        last = i - 1
        b_last = bins[last]
        p_last = b_last + outl
        rows = np.arange(len(i))
        log_q_last = log_q[rows, (last * nb) // i]
        plogp = lsum[last] + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
        cross = cross + np.where(outl > 0, outl * log_q_last, 0.0)
        with np.errstate(divide="ignore"):
            d = (plogp - cross) / total - log_total + np.log(s_in)
        d[(b_last == 0) & (outl > 0)] = np.inf  # P > 0 where Q == 0
        d[s_in == 0] = np.nan  # Q is all zeros: 0/0 in the reference's normalisation
        out[c0 : c0 + len(i)] = d
    return out


def _reference_divergence(bins: np.ndarray, i: int, nb: int) -> float:
    """One candidate's divergence computed with the reference's exact floating-point steps."""
    from scipy.stats import entropy  # local: only needed to break near-ties

    space = np.linspace(0, i, num=nb + 1)
    dig = np.digitize(np.arange(i), space) - 1
    head = bins[:i]
    dig[head == 0] = -1
    keep = dig != -1
    g = dig[keep]
    sums = np.zeros(nb, dtype=np.float64)
    np.add.at(sums, g, head[keep])  # unbuffered, in index order: same additions as the reference loop
    cnt = np.bincount(g, minlength=nb)
    q = np.zeros(i, dtype=np.float64)
    q[keep] = (sums / np.maximum(cnt, 1))[g]
    p = np.array(head)
    p[-1] += np.sum(bins[i:])
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(entropy(p, q))


def amax_mse(
    hist: AbsHistogram,
    num_bits: int = 8,
    unsigned: bool = False,
    start_bin: int = 128,
    stride: int = 1,
) -> float:
    """Bin center minimising the histogram-weighted fake-quantization MSE.

    Candidates are ``centers[i]`` for i in ``range(start_bin, len(centers), stride)``.
    Each candidate amax gives ``scale = amax / qmax`` (qmax = 2**(num_bits-1) - 1,
    or 2**num_bits - 1 unsigned); every bin center c is fake-quantized to
    ``clamp(round(c / scale), qmin, qmax) * scale`` (round half to even, like
    torch.round) and the error is ``sum(counts * (q - c)**2)``. The first
    minimum wins. Vectorised over chunks of candidates; empty bins are skipped
    since they add nothing. ``start_bin`` is lowered if the histogram is smaller.
    """
    _num_levels(num_bits, unsigned)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    arrs = _arrays(hist)
    if arrs is None:
        return 0.0
    counts, edges = arrs
    centers = (edges[1:] + edges[:-1]) / 2
    n = len(centers)
    cand = np.arange(min(start_bin, n - 1), n, stride)

    qmax = float(2 ** (num_bits - 1 + int(unsigned)) - 1)
    qmin = 0.0 if unsigned else -float(2 ** (num_bits - 1))
    nz = counts > 0
    c = centers[nz]  # sorted ascending
    w = counts[nz]
    # numpy rather than torch: single-threaded elementwise work does not stall
    # when the CPU is shared (torch's intra-op threads were 50x slower then).
    chunk = max(1, _MSE_CHUNK_ELEMS // max(1, len(c)))
    err = np.empty(len(cand))
    for k in range(0, len(cand), chunk):
        amax = centers[cand[k : k + chunk]]
        scale = (amax / qmax)[:, None]
        # Bins above the chunk's largest candidate are clipped by every
        # candidate in it (clamp(round(c/scale)) == qmax): skip the rounding
        # there; it yields the very same q = qmax * scale.
        m = int(np.searchsorted(c, amax[-1], side="right"))
        t = c[:m] / scale
        np.rint(t, out=t)  # round half to even, like torch.round
        np.clip(t, qmin, qmax, out=t)
        t *= scale
        t -= c[:m]
        np.square(t, out=t)
        e = t @ w[:m]
        if m < len(c):
            u = qmax * scale - c[m:]
            np.square(u, out=u)
            e += u @ w[m:]
        err[k : k + len(amax)] = e
    return float(centers[cand[int(np.argmin(err))]])


def compute_amax(
    hist: AbsHistogram,
    method: str,
    *,
    percentile: float = 99.99,
    num_bits: int = 8,
    unsigned: bool = False,
) -> float:
    """amax for ``hist`` with ``method`` in "max" | "percentile" | "entropy" | "mse".

    Returns 0.0 if only zeros were seen (callers treat a 0 amax specially);
    raises ValueError if nothing was collected or the method is unknown.
    """
    if method == "max":
        return amax_max(hist)
    if method == "percentile":
        return amax_percentile(hist, percentile)
    if method == "entropy":
        return amax_entropy(hist, num_bits=num_bits, unsigned=unsigned)
    if method == "mse":
        return amax_mse(hist, num_bits=num_bits, unsigned=unsigned)
    raise ValueError(
        f"unknown calibration method {method!r}; valid methods: {', '.join(METHODS)}"
    )


# ------------------------------------------------------ asymmetric and power-of-two ranges
class SignedHistogram:
    """Histograms of both signs of x, for asymmetric ranges [lo, hi] (unsigned 8-bit with a zero point).

    The |x| histogram above cannot tell a SiLU's [-0.28, 6] from [-6, 6]; this keeps the positive values and the
    magnitudes of the negative ones apart (each an AbsHistogram, growing as it does), plus the exact extremes.
    """

    def __init__(self, num_bins: int = 2048):
        self.positive = AbsHistogram(num_bins=num_bins)
        self.negative = AbsHistogram(num_bins=num_bins)
        self.min = 0.0
        self.max = 0.0
        self.seen = False

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            n_bad = int(x.numel() - torch.isfinite(x).sum().item())
            raise NonFiniteError(f"calibration batch has {n_bad} non-finite value(s) (NaN or Inf) out of {x.numel()}")
        x = x.float().reshape(-1)
        self.seen = True
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
        # Zeros go to the positive side (one bin or the other: they are quantized exactly either way).
        self.positive.update(x.clamp(min=0))
        if self.min < 0:
            negative = x[x < 0]
            if negative.numel():
                self.negative.update(negative)

    @property
    def is_empty(self) -> bool:
        return not self.seen

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        """(bin centers with their sign, counts) of both sides, the non-empty bins only."""
        parts = []
        for hist, sign in ((self.positive, 1.0), (self.negative, -1.0)):
            arrs = _arrays(hist) if not hist.is_empty else None
            if arrs is None:
                if not hist.is_empty and sign > 0:  # only zeros on this side
                    parts.append((np.zeros(1), np.array([hist.total])))
                continue
            counts, edges = arrs
            centers = (edges[1:] + edges[:-1]) / 2
            nz = counts > 0
            parts.append((sign * centers[nz], counts[nz]))
        if not parts:
            return np.zeros(1), np.zeros(1)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _affine_errors(values: np.ndarray, weights: np.ndarray, lo: np.ndarray, hi: np.ndarray, levels: int) -> np.ndarray:
    """Histogram-weighted squared error of u8-with-zero-point fake quantization over [lo[i], hi[i]], per candidate."""
    err = np.empty(len(lo))
    chunk = max(1, _MSE_CHUNK_ELEMS // max(1, len(values)))
    for k in range(0, len(lo), chunk):
        a, b = lo[k:k + chunk, None], hi[k:k + chunk, None]
        scale = (b - a) / levels
        zero_point = np.clip(np.rint(-a / scale), 0, levels)
        q = np.clip(np.rint(values[None, :] / scale) + zero_point, 0, levels)
        d = (q - zero_point) * scale - values[None, :]
        err[k:k + len(a)] = np.square(d) @ weights
    return err


def affine_range(hist: SignedHistogram, method: str, *, percentile: float = 99.99, num_bits: int = 8,
                 rounds: int = 2) -> tuple[float, float]:
    """(lo, hi) of an unsigned `num_bits` quantizer with a zero point, lo <= 0 <= hi, for `method`.

    max: the extremes seen. percentile / entropy: each side on its own by the symmetric method (entropy with the
    unsigned grid on the positive side). mse: the range minimising the histogram-weighted error of the actual affine
    grid (both sides share one step), by alternating one-dimensional searches: hi over the positive bins with lo fixed
    at the smallest value seen, then lo over the negative bins with that hi, `rounds` times. An activation with no
    negative values gets lo = 0, zero point 0 and all 2^bits levels on [0, hi].
    """
    if hist.is_empty:
        raise ValueError("no calibration data was collected")
    lo, hi = min(hist.min, 0.0), max(hist.max, 0.0)
    negative = not hist.negative.is_empty and hist.min < 0
    if method == "max" or hi == lo:
        return lo, hi
    if method in ("percentile", "entropy"):
        upper = compute_amax(hist.positive, method, percentile=percentile, num_bits=num_bits, unsigned=True)
        lower = compute_amax(hist.negative, method, percentile=percentile, num_bits=num_bits) if negative else 0.0
        return -lower, upper if upper > 0 else hi
    if method != "mse":
        raise ValueError(f"unknown calibration method {method!r}; valid methods: {', '.join(METHODS)}")
    values, weights = hist.values()
    levels = (1 << num_bits) - 1
    pos = np.unique(values[values > 0])
    neg = np.unique(values[values < 0])
    for _ in range(rounds):
        if len(pos):
            cand = pos[min(128, len(pos) - 1):] if len(pos) > 128 else pos
            cand = np.append(cand, hi)
            err = _affine_errors(values, weights, np.full(len(cand), lo), cand, levels)
            hi = float(cand[int(np.argmin(err))])
        if negative and len(neg):
            cand = neg[: max(1, len(neg) - 128)] if len(neg) > 128 else neg
            cand = np.append(cand, lo)
            err = _affine_errors(values, weights, cand, np.full(len(cand), hi), levels)
            lo = float(min(cand[int(np.argmin(err))], 0.0))
    return lo, hi


def power_of_two_amax(hist: AbsHistogram, amax: float, *, num_bits: int = 8, nearest: bool = True) -> float:
    """The range 2^k * qmax of a symmetric power-of-two quantizer near `amax`: of the two powers of two around
    amax / qmax, the one with the smaller histogram-weighted error (`nearest`), else the one above (never clips
    below amax; calibration method max)."""
    qmax = float(2 ** (num_bits - 1) - 1)
    if amax <= 0:
        return amax
    k = math.ceil(math.log2(amax / qmax))
    above = qmax * 2.0 ** k
    if not nearest or hist.is_empty:
        return above
    below = qmax * 2.0 ** (k - 1)
    arrs = _arrays(hist)
    if arrs is None:
        return above
    counts, edges = arrs
    centers = (edges[1:] + edges[:-1]) / 2
    errors = [float(counts @ np.square(np.clip(np.rint(centers / (a / qmax)), -qmax - 1, qmax) * (a / qmax) - centers))
              for a in (below, above)]
    return below if errors[0] < errors[1] else above


def power_of_two_weight_amax(weights: torch.Tensor, num_bits: int = 8) -> float:
    """The range 2^k * qmax of a per-tensor power-of-two weight quantizer: the power of two around max|w| / qmax
    with the smaller squared error on the weights themselves."""
    qmax = float(2 ** (num_bits - 1) - 1)
    w = weights.detach().float().reshape(-1)
    amax = float(w.abs().max())
    if amax <= 0:
        return amax
    k = math.ceil(math.log2(amax / qmax))
    best, best_err = None, math.inf
    for a in (qmax * 2.0 ** (k - 1), qmax * 2.0 ** k):
        s = a / qmax
        err = float(torch.square(torch.clamp(torch.round(w / s), -qmax - 1, qmax) * s - w).sum())
        if err < best_err:
            best, best_err = a, err
    return best
