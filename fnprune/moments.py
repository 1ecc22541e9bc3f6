"""Second moments of one layer's neurons, accumulated batch by batch (pure math; knows nothing of models).

Everything fnprune computes from sampled token activations is a function of their mean and d x d second
moment: the spatial-ICA whitening (the neuron correlation, `correlation_gram`) and the least-squares
reconstruction of removed neurons (`covariance` around the calibration mean). So capture can keep this one
matrix per layer instead of the tokens, which is smaller whenever the MLP width is below the number of sampled
tokens (SmolLM2: 1536 neurons, 4096 tokens).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SecondMoments", "constant_columns"]


def constant_columns(tokens: torch.Tensor) -> torch.Tensor:
    """(d,) bool: the columns of a (T, d) token sample that never vary (dead neurons, padding); an exact test, like
    `SecondMoments.constant`, so rounding cannot fake a variance."""
    return tokens.amax(0) == tokens.amin(0)


class SecondMoments:
    """Sum and outer-product sum of token activations (B, d), taken around the first batch's mean (`shift`),
    so float32 sums do not cancel. The outer-product sum is symmetric, so only its upper triangle of blocks is
    multiplied and kept: the neurons are cut into `PANELS` near-equal slices, and panel i holds slice i's rows
    from its diagonal block rightwards (slice_i^T [slice_i .. slice_last]), about 9/16 of a d x d matrix in
    `dtype` for 8 panels, packed in one flat buffer (`packed_size`). These products are most of capture's
    cost beyond the forward passes; fewer panels multiply more of the lower triangle, many narrow ones run
    below the machine's matrix rate.

    Rows are multiplied in by groups of `GROUP_ROWS`, cut at fixed positions of the row stream (rows left over
    wait in a small pending buffer): every product passes over the whole d x d sum, so the few sampled rows per
    batch of a long calibration ran up to twice as slow, and fixed groups make the result independent of how
    the rows arrive (batch size, resuming). Reading a result multiplies in the pending rows first.
    """

    # rows per float32 product: small groups are slow, and inside capture 256 beat 128 (measured: CHANGELOG)
    GROUP_ROWS = 256
    PANELS = 8  # slices of the upper triangle (see above); part of the cache key, as the packed layout

    def __init__(
        self, width: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
        out: torch.Tensor | None = None,
    ):
        """`out`: an existing zeroed flat buffer of `packed_size(width)` to accumulate into, e.g. a slice of
        one allocation for all layers (many separate allocations between a model's temporaries fragment the
        heap)."""
        size = self.packed_size(width)
        if out is not None and (out.shape != (size,) or out.dtype != dtype):
            raise ValueError(f"out must be a flat {dtype} tensor of {size} values")
        self.packed = out if out is not None else torch.zeros(size, dtype=dtype, device=device)
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.shift: torch.Tensor | None = None
        self.low = torch.full((width,), float("inf"), dtype=dtype, device=device)
        self.high = torch.full((width,), -float("inf"), dtype=dtype, device=device)
        self.count = 0  # rows added, pending ones included
        self.pending: torch.Tensor | None = None  # (GROUP_ROWS, d) rows of the group not yet multiplied in
        self.n_pending = 0

    @classmethod
    def bounds(cls, width: int) -> list[int]:
        """Where the neuron slices start and end: 0 = b_0 < b_1 < ... = width (fewer slices when narrow)."""
        return sorted({width * i // cls.PANELS for i in range(cls.PANELS + 1)})

    @classmethod
    def packed_size(cls, width: int) -> int:
        b = cls.bounds(width)
        return sum((hi - lo) * (width - lo) for lo, hi in zip(b, b[1:]))

    def _panels(self) -> list[tuple[int, int, torch.Tensor]]:
        """(first neuron, end neuron, view) of every panel: rows lo..hi-1 of the sum, columns lo..d-1."""
        b = self.bounds(self.width)
        sizes = [(hi - lo) * (self.width - lo) for lo, hi in zip(b, b[1:])]
        return [(lo, hi, flat.view(hi - lo, self.width - lo))
                for lo, hi, flat in zip(b, b[1:], self.packed.split(sizes))]

    @classmethod
    def of(cls, tokens: torch.Tensor | np.ndarray, dtype: torch.dtype = torch.float64) -> SecondMoments:
        """The moments of a token sample (T, d) in one go (in 512-row groups: all rows are here, none wait)."""
        t = torch.as_tensor(tokens)
        moments = cls(t.shape[1], t.device, dtype)
        with torch.inference_mode():
            t = t.to(moments.packed.device, moments.packed.dtype)
            if t.shape[0]:
                moments.shift, moments.count = t.mean(0), t.shape[0]
                for start in range(0, t.shape[0], 512):
                    moments._multiply(t[start : start + 512])
        return moments

    @property
    def width(self) -> int:
        return self.sum.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.packed.dtype

    @torch.inference_mode()  # capture's hooks make these tensors in inference mode; updates may come later
    def update(self, tokens: torch.Tensor | np.ndarray) -> None:
        """Add a batch of token activations (B, d)."""
        t = torch.as_tensor(tokens).to(self.packed.device, self.packed.dtype)
        if t.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = t.mean(0)
        self.count += t.shape[0]
        group = self.GROUP_ROWS
        start = 0
        if self.n_pending:  # complete the waiting group first
            start = min(group - self.n_pending, t.shape[0])
            self._hold(t[:start])
        whole = start + (t.shape[0] - start) // group * group
        for first in range(start, whole, group):  # whole groups straight from the batch, no copy
            self._multiply(t[first : first + group])
        self._hold(t[whole:])

    def _hold(self, rows: torch.Tensor) -> None:
        """Add rows to the pending group; multiply it in once it is full."""
        if rows.shape[0] == 0:
            return
        if self.pending is None:
            self.pending = torch.empty(self.GROUP_ROWS, self.width, dtype=self.packed.dtype, device=self.packed.device)
        self.pending[self.n_pending : self.n_pending + rows.shape[0]] = rows
        self.n_pending += rows.shape[0]
        if self.n_pending == self.GROUP_ROWS:
            self.flush()

    @torch.inference_mode()
    def flush(self) -> None:
        """Multiply the pending rows in now (a shorter last group) and free their buffer."""
        if self.n_pending:
            self._multiply(self.pending[: self.n_pending])
        self.pending, self.n_pending = None, 0

    def _multiply(self, rows: torch.Tensor) -> None:
        """Add one group of rows (at most GROUP_ROWS) to the sums, extremes and packed products."""
        low, high = torch.aminmax(rows, dim=0)  # one pass
        self.low = torch.minimum(self.low, low)
        self.high = torch.maximum(self.high, high)
        c = rows - self.shift
        self.sum += c.sum(0, dtype=torch.float64)
        for lo, hi, panel in self._panels():
            panel.addmm_(c[:, lo:hi].T, c[:, lo:])

    @property
    def constant(self) -> torch.Tensor:
        """(d,) bool: neurons that never varied (dead); an exact test, so rounding cannot fake a variance."""
        self.flush()
        return self.high == self.low

    def finite(self) -> bool:
        """No NaN or inf was added (min/max carry them)."""
        self.flush()
        return bool(torch.isfinite(self.low).all() and torch.isfinite(self.high).all())

    def mean(self) -> torch.Tensor:
        """(d,) float64 mean of the added tokens."""
        self._check()
        return self.sum / self.count + self.shift.to(torch.float64)

    def covariance(self, centre: torch.Tensor | None = None) -> torch.Tensor:
        """(d, d) float64 E[(a - centre)(a - centre)^T] over the added tokens; centre None: their own mean."""
        self._check()
        m = torch.empty(self.width, self.width, dtype=torch.float64, device=self.packed.device)
        for lo, hi, panel in self._panels():
            m[lo:hi, lo:] = panel
            m[hi:, lo:hi] = panel[:, hi - lo :].T  # below the diagonal block: the panel's transpose
        m /= self.count
        around = self.sum / self.count  # mean minus shift
        if centre is None:
            return m.addr_(around, around, alpha=-1)
        delta = self.shift.to(torch.float64) - centre.to(m.device, torch.float64)  # shift - centre
        # E[(y + delta)(y + delta)^T] with y = a - shift; rank-one updates in place (no d x d temporaries)
        return m.addr_(around, delta).addr_(delta, around).addr_(delta, delta)

    def covariance_rows(self, rows: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `rows` (r,) of `covariance(centre)`, (r, d) float64, read straight from the packed blocks: the
        reconstruction needs only the kept neurons' rows, and building all d x d took most of its time."""
        self._check()
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.packed.device)
        panels = self._panels()
        m = torch.empty(len(rows), self.width, dtype=torch.float64, device=self.packed.device)
        for i, (lo, hi, panel) in enumerate(panels):
            inside = (rows >= lo) & (rows < hi)
            mine = rows[inside]
            # columns left of the panel: earlier panels' columns for these neurons; the rest: the panel's rows
            left = [p[:, mine - first] for first, _, p in panels[:i]]
            m[inside] = torch.cat([*(x.T for x in left), panel[mine - lo]], 1).to(torch.float64)
        m /= self.count
        around = self.sum / self.count  # mean minus shift
        if centre is None:
            return m.addr_(around[rows], around, alpha=-1)
        delta = self.shift.to(torch.float64) - centre.to(m.device, torch.float64)
        return m.addr_(around[rows], delta).addr_(delta[rows], around).addr_(delta[rows], delta)

    def correlation_gram(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(d, d) P R P: R the neuron correlation (dead neurons 0), P centres across the live neurons.

        This is the Gram of fnprune's spatial-ICA data (each neuron z-scored over tokens, each token centred
        across neurons) divided by the token count, all the whitening needs.
        """
        gram = self.covariance().to(dtype)
        inv = torch.where(~self.constant, gram.diagonal().clamp(min=torch.finfo(dtype).tiny).rsqrt(), 0.0)
        gram.mul_(inv[:, None]).mul_(inv[None, :])  # correlation R
        if self.constant.any():  # centred across the live neurons only: dead ones stay 0, not an outlier cluster
            live = (~self.constant).to(gram.device)
            row = gram.sum(1) / live.sum()  # dead columns are 0
            gram.sub_(row[:, None]).sub_(row[None, :]).add_(row.sum() / live.sum())
            return gram.mul_(live[:, None]).mul_(live[None, :])
        row = gram.mean(1)  # (d,) = column means too: R is symmetric
        return gram.sub_(row[:, None]).sub_(row[None, :]).add_(row.mean())

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that rebuild these moments (`from_state`), e.g. for the on-disk cache or a capture's saved
        progress. Pending rows are saved as they are, not multiplied in, so continuing from the state adds the
        later rows in the same groups as without the stop."""
        if self.count == 0 or self.shift is None:
            raise ValueError("no tokens were added")
        out = {"packed": self.packed, "sum": self.sum, "shift": self.shift, "low": self.low, "high": self.high,
               "count": torch.tensor(self.count)}
        if self.n_pending:
            out["pending"] = self.pending[: self.n_pending]
        return out

    def load_state_(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from `state` (as `state()` gives it) in place, keeping this object's packed buffer."""
        if state["packed"].shape != self.packed.shape:
            raise ValueError(f"moments state of {state['packed'].numel()} values, buffer of {self.packed.numel()}")
        self.packed.copy_(state["packed"])
        self._restore(state)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> SecondMoments:
        moments = cls.__new__(cls)
        # Pending rows will be multiplied in: into a copy, so the moments the state came from stay as they are
        moments.packed = state["packed"].clone() if "pending" in state else state["packed"]
        moments._restore(state)
        return moments

    @torch.inference_mode()
    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        if state["packed"].numel() != self.packed_size(state["sum"].shape[0]):
            raise ValueError("moments state packed in another layout")
        self.sum, self.shift = state["sum"].clone(), state["shift"].clone()
        self.low, self.high, self.count = state["low"].clone(), state["high"].clone(), int(state["count"])
        self.pending, self.n_pending = None, 0
        if "pending" in state:
            self._hold(state["pending"].to(self.packed.device, self.packed.dtype))

    def _check(self) -> None:
        if self.count == 0 or self.shift is None:
            raise ValueError("no tokens were added")
        self.flush()
