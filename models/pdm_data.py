"""Synthetic predictive-maintenance data: sensor-window features of a pump motor and its state.

Each row summarises one window of a rotating machine's sensors (tri-axial accelerometer on the
bearing housing, bearing temperature, motor current, speed, a microphone) into 24 numbers on
their natural scales (g, dB, degrees C, A, rpm...), so the ranges differ by four orders of
magnitude, as they do on a real device. The label is the machine's state: normal or one of four
developing faults, each with a random severity; mild faults overlap normal operation, so the
task is learnable but not trivial.

This module only generates data from a seed (numpy ``Generator``); it trains nothing and writes
no files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURE_NAMES: tuple[str, ...] = (
    "vib_x_rms_g",
    "vib_y_rms_g",
    "vib_z_rms_g",
    "vib_x_peak_g",
    "vib_y_peak_g",
    "vib_z_peak_g",
    "vib_x_kurtosis",
    "vib_y_kurtosis",
    "vib_z_kurtosis",
    "vib_x_crest",
    "vib_y_crest",
    "vib_z_crest",
    "band_1x_db",
    "band_2x_db",
    "band_bearing_db",
    "band_hf_envelope_db",
    "bearing_temp_c",
    "temp_rise_c_per_min",
    "ambient_temp_c",
    "motor_current_a",
    "current_imbalance_pct",
    "speed_rpm",
    "power_factor",
    "sound_db",
)

CLASS_NAMES: tuple[str, ...] = (
    "normal",
    "imbalance",
    "misalignment",
    "bearing_wear",
    "overheating",
)

# share of windows per state: a healthy fleet is mostly normal
CLASS_PRIORS: tuple[float, ...] = (0.40, 0.15, 0.15, 0.15, 0.15)


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # [n, 24] float32, raw sensor units
    y: np.ndarray  # [n] int64 class ids into CLASS_NAMES


def generate(n: int, seed: int) -> Dataset:
    """``n`` labelled windows drawn from the generative model with ``seed``."""
    if n < len(CLASS_NAMES):
        raise ValueError(f"n={n}: ask for at least {len(CLASS_NAMES)} rows")
    rng = np.random.default_rng(seed)
    y = rng.choice(len(CLASS_NAMES), size=n, p=np.asarray(CLASS_PRIORS))
    # severity of the fault in [0, 1]; mild faults (< ~0.2) look almost normal
    severity = np.where(y == 0, 0.0, rng.beta(1.6, 1.4, size=n))

    def sev(cls: int) -> np.ndarray:
        return np.where(y == cls, severity, 0.0)

    imb, mis, brg, hot = sev(1), sev(2), sev(3), sev(4)

    load = rng.uniform(0.3, 1.0, size=n)  # share of rated load
    speed = rng.normal(1480.0, 12.0, size=n) - 25.0 * load
    ambient = rng.normal(24.0, 6.0, size=n)

    def noise(scale: float) -> np.ndarray:
        return np.exp(rng.normal(0.0, scale, size=n))

    base = 0.18 + 0.12 * load
    rms_x = base * (1.0 + 1.6 * imb + 0.5 * mis + 0.35 * brg) * noise(0.22)
    rms_y = base * (1.0 + 1.3 * imb + 0.5 * mis + 0.35 * brg) * noise(0.22)
    rms_z = 0.7 * base * (1.0 + 0.3 * imb + 1.7 * mis + 0.3 * brg) * noise(0.22)

    kurt_base = 3.0 + 0.35 * rng.standard_normal(n) ** 2
    kurt = [kurt_base + 5.5 * brg**1.3 * noise(0.3) + 0.3 * rng.standard_normal(n) for _ in "xyz"]
    crest = [
        np.sqrt(2.0) * (1.0 + 0.09 * (k - 3.0)) * noise(0.08) + 0.5 * brg * noise(0.3) for k in kurt
    ]
    peak = [r * c for r, c in zip((rms_x, rms_y, rms_z), crest, strict=True)]

    band_1x = 0.02 * (1.0 + 9.0 * imb**1.4 + 1.2 * mis) * load * noise(0.35)
    band_2x = 0.008 * (1.0 + 0.4 * imb + 8.0 * mis**1.3) * noise(0.35)
    band_bearing = 0.002 * (1.0 + 14.0 * brg**1.5 + 0.2 * hot) * noise(0.45)
    band_hf = 0.001 * (1.0 + 10.0 * brg**1.2 + 1.5 * hot) * noise(0.5)

    current = 11.0 * (0.35 + 0.65 * load) * (1.0 + 0.04 * mis + 0.12 * hot) * noise(0.04)
    current_imbalance = 1.2 + 0.6 * mis + 2.2 * hot * noise(0.3) + 0.5 * rng.random(n)
    bearing_temp = (
        ambient
        + 18.0 * load
        + 6.0 * brg
        + 4.0 * mis
        + 28.0 * hot**1.1
        + rng.normal(0.0, 3.0, size=n)
    )
    temp_rise = 0.05 * rng.standard_normal(n) + 0.02 * brg + 0.9 * hot**1.5 * noise(0.3)
    power_factor = np.clip(
        0.86 - 0.05 * (1.0 - load) - 0.07 * hot + 0.012 * rng.standard_normal(n), 0.5, 0.99
    )
    sound = (
        62.0
        + 6.0 * load
        + 10.0 * np.log10(1.0 + 3.0 * imb + 2.5 * mis + 4.0 * brg)
        + rng.normal(0.0, 1.8, size=n)
    )

    columns = [
        rms_x,
        rms_y,
        rms_z,
        *peak,
        *kurt,
        *crest,
        10.0 * np.log10(band_1x),
        10.0 * np.log10(band_2x),
        10.0 * np.log10(band_bearing),
        10.0 * np.log10(band_hf),
        bearing_temp,
        temp_rise,
        ambient,
        current,
        current_imbalance,
        speed,
        power_factor,
        sound,
    ]
    x = np.stack(columns, axis=1).astype(np.float32)
    return Dataset(x=x, y=y.astype(np.int64))
