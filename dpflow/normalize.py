"""Input normalisation: statistics of the training set, and the transform every batch gets.

numpy only. The statistics are accumulated in float64 over fixed chunks in row order, so
they are a pure function of the training set; the trainer still shares rank 0's
`Normalizer` so every rank applies bit-identical numbers, and checkpoints store it
(`state()`), so `eval` and `predict` transform their inputs exactly as training did.
"""

from dataclasses import dataclass

import numpy as np

KINDS = ("auto", "none", "scale", "standardize")
STATS_CHUNK_ROWS = 4096


@dataclass
class FeatureStats:
    """Per-feature count, mean and sum of squared deviations (Chan et al.'s parallel form),
    and the largest absolute value, of a training set viewed as (rows, features)."""

    count: int
    mean: np.ndarray  # (features,) float64
    m2: np.ndarray  # (features,) float64
    max_abs: float

    @classmethod
    def of(cls, x, rows=None):
        """Accumulate over `x` (examples first; memory-mapped is fine), or over its examples
        `rows` (sorted indices), one chunk at a time."""
        flat = x.reshape(len(x), -1)
        count, mean, m2 = 0, np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
        max_abs = 0.0
        n = len(flat) if rows is None else len(rows)
        for start in range(0, n, STATS_CHUNK_ROWS):
            which = slice(start, start + STATS_CHUNK_ROWS) if rows is None else rows[start:start + STATS_CHUNK_ROWS]
            chunk = np.asarray(flat[which], dtype=np.float64)
            size = len(chunk)
            chunk_mean = chunk.mean(axis=0)
            chunk_m2 = ((chunk - chunk_mean) ** 2).sum(axis=0)
            delta = chunk_mean - mean
            total = count + size
            mean = mean + delta * (size / total)
            m2 = m2 + chunk_m2 + delta ** 2 * (count * size / total)
            count = total
            max_abs = max(max_abs, float(np.abs(chunk).max()))
        return cls(count, mean, m2, max_abs)

    def per_channel(self, channels):
        """The same statistics pooled over the pixels of each channel (features in C order)."""
        pixels = self.mean.size // channels
        mean = self.mean.reshape(channels, pixels)
        m2 = self.m2.reshape(channels, pixels)
        pooled_mean = mean.mean(axis=1)
        pooled_m2 = m2.sum(axis=1) + self.count * ((mean - pooled_mean[:, None]) ** 2).sum(axis=1)
        return FeatureStats(self.count * pixels, pooled_mean, pooled_m2, self.max_abs)

    def std(self):
        return np.sqrt(self.m2 / max(self.count, 1))


@dataclass
class Normalizer:
    """x -> (x - shift) / scale, elementwise in the training dtype. `shift` and `scale` are
    1-D: one value per channel when `per_channel` (images, whether fed as images or flat
    rows), else one per feature, or a single value for `scale`."""

    kind: str = "none"
    shift: np.ndarray = None
    scale: np.ndarray = None
    per_channel: bool = False

    @classmethod
    def fit(cls, kind, stats, image_shape=None):
        """`auto`: `scale` for images, `none` for rows of features. `scale`: divide by the
        largest absolute training value (pixels 0..255 land in [0, 1]). `standardize`:
        per-channel mean and std for images, per-feature for rows (a constant feature keeps
        scale 1, as scikit-learn's StandardScaler does)."""
        if kind == "auto":
            kind = "scale" if image_shape else "none"
        if kind == "none":
            return cls("none")
        if kind == "scale":
            return cls("scale", np.zeros(1), np.array([stats.max_abs or 1.0]))
        if kind != "standardize":
            raise ValueError(f"normalisation must be one of {', '.join(KINDS)}, got {kind!r}")
        pooled = stats.per_channel(image_shape[0]) if image_shape else stats
        std = pooled.std()
        return cls("standardize", pooled.mean, np.where(std > 0, std, 1.0), bool(image_shape))

    def __call__(self, X):
        """Transform the batch `X` (C-contiguous, examples along the first axis, flat or
        image-shaped) in place and return it. A row comes out the same on any rank."""
        if self.kind == "none" or X.size == 0:
            return X
        assert X.flags.c_contiguous, "normalise a batch buffer, never a view of the dataset"
        if self.per_channel:
            view, shift, scale = X.reshape(len(X), len(self.shift), -1), self.shift[:, None], self.scale[:, None]
        else:
            view, shift, scale = X.reshape(len(X), -1), self.shift, self.scale
        if self.kind != "scale":
            np.subtract(view, shift.astype(X.dtype), out=view)
        np.divide(view, scale.astype(X.dtype), out=view)
        return X

    def describe(self):
        if self.kind == "none":
            return "none"
        if self.kind == "scale":
            return f"scale (x / {self.scale[0]:g})"
        return f"standardize (per-{'channel' if self.per_channel else 'feature'} mean and std of the training set)"

    def state(self):
        """JSON-ready; float64 values survive the round trip exactly."""
        if self.kind == "none":
            return {"kind": "none"}
        return {"kind": self.kind, "per_channel": self.per_channel,
                "shift": self.shift.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_state(cls, state):
        """The Normalizer whose `state()` this is; ValueError for one no Normalizer has (a
        checkpoint edited by hand or by another tool)."""
        try:
            if state["kind"] == "none":
                return cls("none")
            if state["kind"] not in ("scale", "standardize"):
                raise ValueError
            shift, scale = np.array(state["shift"], np.float64), np.array(state["scale"], np.float64)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{state!r:.100} is not a normaliser's state") from None
        if shift.ndim != 1 or shift.shape != scale.shape or not np.isfinite(shift).all() or not (
                np.isfinite(scale) & (scale > 0)).all():
            raise ValueError(f"its shift and scale {state!r:.100} are not finite 1-D arrays of one size, scale > 0")
        return cls(state["kind"], shift, scale, bool(state.get("per_channel")))

    def __eq__(self, other):
        return isinstance(other, Normalizer) and self.state() == other.state()
