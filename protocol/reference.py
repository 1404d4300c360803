"""The reference profile: the drift baseline shipped inside every release.

Per input feature it holds fixed bin edges (quantiles of the training data) and the reference
counts in those bins; for the output it holds the predicted-class counts. Binning rule, shared by
every producer and consumer of counts so that counts with the same edges merge exactly:

* ``edges`` is a strictly increasing list of ``m`` cut points (quantiles 0, 1/k, ..., 1 of the
  training data, duplicates removed), so there are ``m + 1`` bins:
* bin ``0`` is the underflow (``x < edges[0]``), bin ``m`` the overflow (``x > edges[-1]``),
* inner bin ``i`` (``1 <= i <= m - 1``) holds ``edges[i-1] <= x < edges[i]``, the last inner bin
  also holding ``x == edges[-1]``.

This module builds and (de)serialises profiles. It does not score drift (that is
:mod:`protocol.drift`) and reads no files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protocol.errors import ReferenceProfileError

FORMAT = "edgefleet-reference/1"


@dataclass(frozen=True)
class FeatureReference:
    name: str
    edges: tuple[float, ...]
    counts: tuple[int, ...]  # len(edges) + 1, under- and overflow included


@dataclass(frozen=True)
class ReferenceProfile:
    features: tuple[FeatureReference, ...]
    classes: tuple[str, ...]
    class_counts: tuple[int, ...]
    n: int

    @property
    def n_features(self) -> int:
        return len(self.features)

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "n": self.n,
            "features": [
                {"name": f.name, "edges": list(f.edges), "counts": list(f.counts)}
                for f in self.features
            ],
            "outputs": {"classes": list(self.classes), "counts": list(self.class_counts)},
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ReferenceProfile:
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise ReferenceProfileError(
                    f"reference profile format is {doc.get('format')!r}, expected {FORMAT!r}; "
                    "rebuild the bundle with this version of edgefleet"
                )
            features = tuple(
                FeatureReference(
                    name=str(f["name"]),
                    edges=tuple(float(e) for e in f["edges"]),
                    counts=tuple(int(c) for c in f["counts"]),
                )
                for f in doc["features"]
            )
            profile = cls(
                features=features,
                classes=tuple(str(c) for c in doc["outputs"]["classes"]),
                class_counts=tuple(int(c) for c in doc["outputs"]["counts"]),
                n=int(doc["n"]),
            )
        except ReferenceProfileError:
            raise
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            OverflowError,
            RecursionError,
        ) as exc:
            raise ReferenceProfileError(
                f"reference profile is malformed ({type(exc).__name__}: {exc}); "
                "rebuild it with `fleet models build`"
            ) from exc
        profile.validate()
        return profile

    def validate(self) -> None:
        for f in self.features:
            if len(f.edges) < 2:
                raise ReferenceProfileError(f"feature {f.name!r} has fewer than 2 bin edges")
            if not all(math.isfinite(e) for e in f.edges):
                raise ReferenceProfileError(f"feature {f.name!r}: edges must be finite numbers")
            if any(c < 0 for c in f.counts):
                raise ReferenceProfileError(f"feature {f.name!r}: counts must not be negative")
            if any(b <= a for a, b in zip(f.edges, f.edges[1:], strict=False)):
                raise ReferenceProfileError(f"feature {f.name!r}: edges are not increasing")
            if len(f.counts) != len(f.edges) + 1:
                raise ReferenceProfileError(
                    f"feature {f.name!r}: {len(f.counts)} counts for {len(f.edges)} edges "
                    f"(expected {len(f.edges) + 1}: inner bins plus under- and overflow)"
                )
        if len(self.class_counts) != len(self.classes):
            raise ReferenceProfileError("output class counts do not match the class names")


def bin_index(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bin indices of ``values`` (any shape) under the module's binning rule."""
    idx = np.searchsorted(edges, values, side="right")
    # x == edges[-1] belongs to the last inner bin, not the overflow
    idx[values == edges[-1]] = len(edges) - 1
    return idx


def build_reference_profile(
    x: np.ndarray,
    predicted: np.ndarray,
    feature_names: Sequence[str],
    class_names: Sequence[str],
    n_bins: int = 10,
) -> ReferenceProfile:
    """Build the profile from training inputs ``x`` [n, f] and predicted class ids [n]."""
    if x.ndim != 2 or x.shape[1] != len(feature_names):
        raise ReferenceProfileError(
            f"x has shape {x.shape}, expected [n, {len(feature_names)}] for the feature names"
        )
    if not 10 <= n_bins <= 20:
        raise ReferenceProfileError(f"n_bins={n_bins}: use 10 to 20 quantile bins")
    qs = np.linspace(0.0, 1.0, n_bins + 1)
    features = []
    for j, name in enumerate(feature_names):
        col = x[:, j].astype(np.float64)
        edges = np.unique(np.quantile(col, qs))
        counts = np.bincount(bin_index(edges, col), minlength=len(edges) + 1)
        features.append(
            FeatureReference(
                name=str(name),
                edges=tuple(float(e) for e in edges),
                counts=tuple(int(c) for c in counts),
            )
        )
    class_counts = np.bincount(predicted.astype(np.int64), minlength=len(class_names))
    return ReferenceProfile(
        features=tuple(features),
        classes=tuple(str(c) for c in class_names),
        class_counts=tuple(int(c) for c in class_counts),
        n=int(x.shape[0]),
    )
