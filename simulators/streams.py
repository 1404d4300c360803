"""Sensor streams for virtual devices: raw feature rows with their true machine states, and
covariate drift injected on purpose.

A :class:`SensorStream` draws windows from :func:`models.pdm_data.generate` (the distribution the
sample model was trained on) and adds a per-feature offset that depends on the scenario of its
:class:`StreamSpec`:

* ``stable``: no offset;
* ``gradual``: chosen features drift linearly with simulated time, ``sigma_per_hour`` standard
  deviations per hour from ``at_s`` on;
* ``sudden``: chosen features step by ``shift_sigma`` standard deviations at ``at_s``;
* ``environment``: the devices in ``devices`` (a hotter site, say) have chosen features offset by
  ``shift_sigma`` standard deviations at all times; every other device is stable.

Offsets are in units of each feature's standard deviation (:func:`feature_sigma`, measured once
on the generator itself), so "1σ" means the same thing for g, dB and °C. The drift moves inputs
only (covariate shift): the labels stay the states the rows were drawn from.

Everything is deterministic from (seed, device, time), at the spec's window rate. A device's
sensors make a tape of windows, ``windows_per_s`` of them each simulated second (a field of the
spec); :meth:`SensorStream.at` at time ``t`` reads ``n`` windows of that tape from position
``floor(t * windows_per_s)`` and adds the scenario's offset at ``t``. Two streams that differ
only in scenario therefore differ only by the offset, calls at the stream's rate read
consecutive windows, and calls closer together than ``n / windows_per_s`` share windows.

The tape is drawn in blocks of :data:`BLOCK_ROWS` windows, each from (seed, device, block), and a
stream keeps its last blocks: :func:`models.pdm_data.generate` costs about the same for 8 rows as
for 500 (its ~60 numpy calls), so a hosted device reading a few windows a second draws once per
block instead of once per call (8 rows a second at 12 windows a second: 0.025 ms a call, against
0.24 ms when every call drew its own rows).

Pure: numpy and :mod:`models.pdm_data` only; simulated time is passed in, nothing is read from a
clock or a file. Running models on the rows and binning them for drift is the caller's job
(:mod:`agent.runtimes`, :func:`protocol.drift.count_rows`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from models import pdm_data

FEATURE_NAMES = pdm_data.FEATURE_NAMES
N_FEATURES = len(FEATURE_NAMES)
TEMPERATURE_FEATURES: tuple[str, ...] = ("bearing_temp_c", "ambient_temp_c")

SIGMA_ROWS = 20_000  # rows behind feature_sigma(): its estimate is within ~1% of the truth
SIGMA_SEED = 0
BLOCK_ROWS = 512  # windows drawn at once (pdm_data.generate: ~0.35 ms + ~1 us a row)
KEPT_BLOCKS = 2  # a stream read forward in time needs the current block and, across an edge,
# the one before
DEFAULT_WINDOWS_PER_S = 32.0


class StreamSpecError(ValueError):
    """A stream specification that cannot be run; the message says what to change."""


class Scenario(StrEnum):
    STABLE = "stable"
    GRADUAL = "gradual"
    SUDDEN = "sudden"
    ENVIRONMENT = "environment"


@dataclass(frozen=True)
class StreamSpec:
    """One device's stream: whose it is (seed, device) and what drift it carries."""

    seed: int
    device: int
    scenario: Scenario = Scenario.STABLE
    features: tuple[str, ...] = ()  # names in pdm_data.FEATURE_NAMES that drift
    shift_sigma: float = 0.0  # sudden: size of the step; environment: the fixed offset
    sigma_per_hour: float = 0.0  # gradual: growth of the offset per simulated hour
    at_s: float = 0.0  # sudden: time of the step; gradual: time the drift starts
    devices: frozenset[int] = frozenset()  # environment: the devices in the other environment
    windows_per_s: float = DEFAULT_WINDOWS_PER_S  # the device's windows a simulated second

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "scenario", Scenario(self.scenario))
        except ValueError:
            raise StreamSpecError(
                f"scenario {self.scenario!r}: use one of {', '.join(s.value for s in Scenario)}"
            ) from None
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "devices", frozenset(self.devices))
        for name, value in (("seed", self.seed), ("device", self.device)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise StreamSpecError(f"{name}={value!r}: use an integer >= 0")
        unknown = [f for f in self.features if f not in FEATURE_NAMES]
        if unknown:
            raise StreamSpecError(
                f"unknown features {unknown}: use names from models.pdm_data.FEATURE_NAMES"
            )
        if len(set(self.features)) != len(self.features):
            raise StreamSpecError(f"features {list(self.features)} repeat a name: list each once")
        for name, number in (
            ("shift_sigma", self.shift_sigma),
            ("sigma_per_hour", self.sigma_per_hour),
            ("at_s", self.at_s),
        ):
            if not _is_number(number) or not math.isfinite(number):
                raise StreamSpecError(f"{name}={number!r}: use a finite number")
        if self.at_s < 0:
            raise StreamSpecError(f"at_s={self.at_s}: simulated time starts at 0")
        rate = self.windows_per_s
        if not _is_number(rate) or not math.isfinite(rate) or rate <= 0:
            raise StreamSpecError(
                f"windows_per_s={rate!r}: use a positive number of windows a simulated second"
            )
        self._check_scenario()

    def _check_scenario(self) -> None:
        s = self.scenario
        if s is Scenario.STABLE:
            if self.features or self.shift_sigma or self.sigma_per_hour or self.devices:
                raise StreamSpecError(
                    "a stable stream has no drift: drop features, shift_sigma, sigma_per_hour "
                    "and devices, or choose another scenario"
                )
            return
        if not self.features:
            raise StreamSpecError(f"a {s.value} stream needs features: name the ones that drift")
        if s is Scenario.GRADUAL:
            if self.shift_sigma or self.devices:
                raise StreamSpecError(
                    "a gradual stream drifts by sigma_per_hour from at_s: "
                    "drop shift_sigma and devices"
                )
        elif self.sigma_per_hour:
            raise StreamSpecError(
                f"sigma_per_hour is for gradual streams; a {s.value} stream uses shift_sigma"
            )
        if s is Scenario.SUDDEN and self.devices:
            raise StreamSpecError("a sudden stream shifts every device: drop devices")
        if s is Scenario.ENVIRONMENT and self.at_s:
            raise StreamSpecError("an environment offset holds at all times: drop at_s")
        if s is Scenario.ENVIRONMENT and not self.devices:
            raise StreamSpecError("an environment stream needs devices: name the shifted ones")

    @classmethod
    def stable(cls, seed: int, device: int) -> StreamSpec:
        return cls(seed, device)

    @classmethod
    def gradual(
        cls,
        seed: int,
        device: int,
        features: tuple[str, ...],
        sigma_per_hour: float,
        start_s: float = 0.0,
    ) -> StreamSpec:
        return cls(
            seed,
            device,
            Scenario.GRADUAL,
            features=features,
            sigma_per_hour=sigma_per_hour,
            at_s=start_s,
        )

    @classmethod
    def sudden(
        cls, seed: int, device: int, features: tuple[str, ...], shift_sigma: float, at_s: float
    ) -> StreamSpec:
        return cls(
            seed, device, Scenario.SUDDEN, features=features, shift_sigma=shift_sigma, at_s=at_s
        )

    @classmethod
    def environment(
        cls,
        seed: int,
        device: int,
        devices: frozenset[int],
        shift_sigma: float,
        features: tuple[str, ...] = TEMPERATURE_FEATURES,
    ) -> StreamSpec:
        return cls(
            seed,
            device,
            Scenario.ENVIRONMENT,
            features=features,
            shift_sigma=shift_sigma,
            devices=devices,
        )

    def shift_sigmas(self, t_s: float) -> float:
        """The offset of the drifting features at ``t_s``, in standard deviations."""
        s = self.scenario
        if s is Scenario.GRADUAL:
            return self.sigma_per_hour * max(0.0, t_s - self.at_s) / 3600.0
        if s is Scenario.SUDDEN:
            return self.shift_sigma if t_s >= self.at_s else 0.0
        if s is Scenario.ENVIRONMENT:
            return self.shift_sigma if self.device in self.devices else 0.0
        return 0.0


@dataclass(frozen=True)
class Batch:
    t_s: float  # simulated time of the window
    x: np.ndarray  # [n, 24] float32, raw sensor units, offset included
    y: np.ndarray  # [n] int64 true states (ids into pdm_data.CLASS_NAMES)


@functools.cache
def _sigma() -> np.ndarray:
    sigma = pdm_data.generate(SIGMA_ROWS, SIGMA_SEED).x.astype(np.float64).std(axis=0)
    sigma.setflags(write=False)
    return sigma


def feature_sigma() -> np.ndarray:
    """Per-feature standard deviation [24] of the generator (read-only), the unit of offsets."""
    return _sigma()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)


def _time_ms(t_s: float) -> int:
    if not _is_number(t_s) or not math.isfinite(t_s) or t_s < 0:
        raise StreamSpecError(f"t_s={t_s!r}: simulated time is a finite number of seconds >= 0")
    return round(t_s * 1000.0)


class SensorStream:
    """Rows for one :class:`StreamSpec`. What it keeps beyond the spec is a cache of the
    tape's last blocks, so calls may come in any order and repeat and get the same rows; one
    stream is for one thread at a time (a host's feeder)."""

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        mask = np.zeros(N_FEATURES, dtype=np.float64)
        for name in spec.features:
            mask[FEATURE_NAMES.index(name)] = 1.0
        self._unit = mask * feature_sigma()  # raw offset of 1σ in the drifting features
        self._blocks: dict[int, pdm_data.Dataset] = {}
        self.blocks_drawn = 0  # blocks generated so far (a block read again is not drawn again)

    def offset(self, t_s: float) -> np.ndarray:
        """The raw per-feature offset [24] (float64) added to the rows at ``t_s``."""
        _time_ms(t_s)
        return self._unit * self.spec.shift_sigmas(t_s)

    def _block(self, index: int) -> pdm_data.Dataset:
        block = self._blocks.get(index)
        if block is None:
            entropy = (self.spec.seed, self.spec.device, index)
            seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])
            block = pdm_data.generate(BLOCK_ROWS, seed)
            self.blocks_drawn += 1
            if len(self._blocks) >= KEPT_BLOCKS:
                del self._blocks[min(self._blocks)]
            self._blocks[index] = block
        return block

    def at(self, t_s: float, n: int) -> Batch:
        """The ``n`` windows of the tape from simulated time ``t_s`` on (resolution 1 ms), with
        the scenario's offset at ``t_s``."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise StreamSpecError(f"n={n!r}: ask for at least 1 row")
        ms = _time_ms(t_s)
        start = math.floor(ms * self.spec.windows_per_s / 1000.0)
        first, end = start // BLOCK_ROWS, start + n
        if end <= (first + 1) * BLOCK_ROWS:  # the common case: one block
            block, i = self._block(first), start - first * BLOCK_ROWS
            x, y = block.x[i : i + n].copy(), block.y[i : i + n].copy()
        else:
            parts = [self._block(b) for b in range(first, -(-end // BLOCK_ROWS))]
            i = start - first * BLOCK_ROWS
            x = np.concatenate([p.x for p in parts])[i : i + n]
            y = np.concatenate([p.y for p in parts])[i : i + n]
        shift = self.spec.shift_sigmas(t_s)
        if shift:
            x = (x.astype(np.float64) + self._unit * shift).astype(np.float32)
        return Batch(t_s=t_s, x=x, y=y)

    def batches(
        self, n: int, every_s: float, start_s: float = 0.0, count: int | None = None
    ) -> Iterator[Batch]:
        """Batches of ``n`` rows at ``start_s``, ``start_s + every_s``, ... (``count`` of them,
        or without end)."""
        if not (math.isfinite(every_s) and every_s > 0):
            raise StreamSpecError(f"every_s={every_s!r}: use a positive number of seconds")
        k = 0
        while count is None or k < count:
            yield self.at(start_s + k * every_s, n)
            k += 1
