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

__all__ = ["SecondMoments"]


class SecondMoments:
    """Sum and outer-product sum of token activations (B, d), taken around the first batch's mean (`shift`),
    so float32 sums do not cancel. The outer-product sum is symmetric, so only its upper block triangle is
    kept: with a = the first h = d // 2 neurons and b = the rest, the blocks a^T a, a^T b and b^T b, about
    3/4 of a d x d matrix in `dtype`, packed in one flat buffer (`packed_size`).
    """

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
        self.count = 0

    @staticmethod
    def packed_size(width: int) -> int:
        h = width // 2
        return h * h + h * (width - h) + (width - h) ** 2

    def _blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (a^T a, a^T b, b^T b) into the packed buffer."""
        h, r = self.width // 2, self.width - self.width // 2
        aa, ab, bb = self.packed.split([h * h, h * r, r * r])
        return aa.view(h, h), ab.view(h, r), bb.view(r, r)

    @classmethod
    def of(cls, tokens: torch.Tensor | np.ndarray, dtype: torch.dtype = torch.float64) -> SecondMoments:
        """The moments of a token sample (T, d) in one go."""
        t = torch.as_tensor(tokens)
        moments = cls(t.shape[1], t.device, dtype)
        moments.update(t)
        return moments

    @property
    def width(self) -> int:
        return self.sum.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.packed.dtype

    def update(self, tokens: torch.Tensor | np.ndarray) -> None:
        """Add a batch of token activations (B, d)."""
        t = torch.as_tensor(tokens).to(self.packed.device, self.packed.dtype)
        if t.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = t.mean(0)
        self.low = torch.minimum(self.low, t.amin(0))
        self.high = torch.maximum(self.high, t.amax(0))
        h = self.width // 2
        aa, ab, bb = self._blocks()
        for start in range(0, t.shape[0], 512):  # in row chunks: the temporaries stay small
            c = t[start : start + 512] - self.shift  # (<=512, d)
            self.sum += c.sum(0, dtype=torch.float64)
            a, b = c[:, :h], c[:, h:]
            aa.addmm_(a.T, a)
            ab.addmm_(a.T, b)
            bb.addmm_(b.T, b)
        self.count += t.shape[0]

    @property
    def constant(self) -> torch.Tensor:
        """(d,) bool: neurons that never varied (dead); an exact test, so rounding cannot fake a variance."""
        return self.high == self.low

    def finite(self) -> bool:
        """No NaN or inf was added (min/max carry them)."""
        return bool(torch.isfinite(self.low).all() and torch.isfinite(self.high).all())

    def mean(self) -> torch.Tensor:
        """(d,) float64 mean of the added tokens."""
        self._check()
        return self.sum / self.count + self.shift.to(torch.float64)

    def covariance(self, centre: torch.Tensor | None = None) -> torch.Tensor:
        """(d, d) float64 E[(a - centre)(a - centre)^T] over the added tokens; centre None: their own mean."""
        self._check()
        h = self.width // 2
        aa, ab, bb = self._blocks()
        m = torch.empty(self.width, self.width, dtype=torch.float64, device=self.packed.device)
        m[:h, :h], m[:h, h:], m[h:, h:] = aa, ab, bb
        m[h:, :h] = m[:h, h:].T  # the lower block is the upper one's transpose
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
        h = self.width // 2
        aa, ab, bb = self._blocks()
        first, second = rows < h, rows >= h
        m = torch.empty(len(rows), self.width, dtype=torch.float64, device=self.packed.device)
        top, low = rows[first], rows[second] - h
        m[first] = torch.cat([aa[top], ab[top]], 1).to(torch.float64)
        m[second] = torch.cat([ab[:, low].T, bb[low]], 1).to(torch.float64)
        m /= self.count
        around = self.sum / self.count  # mean minus shift
        if centre is None:
            return m.addr_(around[rows], around, alpha=-1)
        delta = self.shift.to(torch.float64) - centre.to(m.device, torch.float64)
        return m.addr_(around[rows], delta).addr_(delta[rows], around).addr_(delta[rows], delta)

    def correlation_gram(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(d, d) P R P: R the neuron correlation (dead neurons 0), P = I - 11^T/d centres across neurons.

        This is the Gram of fnprune's spatial-ICA data (each neuron z-scored over tokens, each token centred
        across neurons) divided by the token count, all the whitening needs.
        """
        gram = self.covariance().to(dtype)
        inv = torch.where(~self.constant, gram.diagonal().clamp(min=torch.finfo(dtype).tiny).rsqrt(), 0.0)
        gram.mul_(inv[:, None]).mul_(inv[None, :])  # correlation R
        row = gram.mean(1)  # (d,) = column means too: R is symmetric
        return gram.sub_(row[:, None]).sub_(row[None, :]).add_(row.mean())

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that rebuild these moments (`from_state`), e.g. for the on-disk cache."""
        self._check()
        return {"packed": self.packed, "sum": self.sum, "shift": self.shift, "low": self.low, "high": self.high,
                "count": torch.tensor(self.count)}

    def load_state_(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from `state` (as `state()` gives it) in place, keeping this object's packed buffer."""
        if state["packed"].shape != self.packed.shape:
            raise ValueError(f"moments state of {state['packed'].numel()} values, buffer of {self.packed.numel()}")
        self.packed.copy_(state["packed"])
        self.sum, self.shift = state["sum"].clone(), state["shift"].clone()
        self.low, self.high, self.count = state["low"].clone(), state["high"].clone(), int(state["count"])

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> SecondMoments:
        moments = cls.__new__(cls)
        moments.packed, moments.sum, moments.shift = state["packed"], state["sum"], state["shift"]
        moments.low, moments.high, moments.count = state["low"], state["high"], int(state["count"])
        return moments

    def _check(self) -> None:
        if self.count == 0 or self.shift is None:
            raise ValueError("no tokens were added")
