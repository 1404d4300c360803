"""Synthetic data, numpy training and the quantization plan: deterministic and well-formed."""

from __future__ import annotations

import numpy as np
import pytest

from models import mlp, pdm_data, quantize

SMALL = mlp.TrainConfig(seed=5, epochs=4)


@pytest.fixture(scope="module")
def data() -> pdm_data.Dataset:
    return pdm_data.generate(3000, seed=7)


def test_data_is_deterministic_per_seed(data: pdm_data.Dataset) -> None:
    again = pdm_data.generate(3000, seed=7)
    assert np.array_equal(again.x, data.x) and np.array_equal(again.y, data.y)
    other = pdm_data.generate(3000, seed=8)
    assert not np.array_equal(other.x, data.x)


def test_data_shape_classes_and_raw_scales(data: pdm_data.Dataset) -> None:
    assert data.x.shape == (3000, len(pdm_data.FEATURE_NAMES)) and data.x.dtype == np.float32
    assert data.y.dtype == np.int64
    shares = np.bincount(data.y, minlength=5) / len(data.y)
    assert np.allclose(shares, pdm_data.CLASS_PRIORS, atol=0.03)
    assert np.all(np.isfinite(data.x))
    spread = np.abs(data.x).mean(axis=0)
    assert spread.max() / spread.min() > 1e3  # raw units: rpm next to g and power factor


def test_generate_refuses_too_few_rows() -> None:
    with pytest.raises(ValueError, match="at least 5 rows"):
        pdm_data.generate(3, seed=1)


def test_training_is_deterministic_and_on_grid(data: pdm_data.Dataset) -> None:
    a = mlp.train(data.x, data.y, 5, SMALL)
    b = mlp.train(data.x, data.y, 5, SMALL)
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert np.array_equal(la.w, lb.w) and np.array_equal(la.b, lb.b)
        assert la.w.dtype == np.float32
        assert np.all(la.w.astype(np.float64) * 2**20 == np.round(la.w.astype(np.float64) * 2**20))
    assert [layer.relu for layer in a.layers] == [True, True, False]
    assert mlp.accuracy(mlp.forward(a, data.x), data.y) > 0.85


def test_training_shrugs_off_last_bit_float_differences(
    data: pdm_data.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    # another CPU's float64 kernels differ in the last bit; the weight grid absorbs that
    base = mlp.train(data.x, data.y, 5, SMALL)
    exact = mlp._gradients
    rng = np.random.default_rng(0)

    def last_bit_noise(*args: object) -> list[np.ndarray]:
        return [g * (1 + 4e-16 * rng.standard_normal(g.shape)) for g in exact(*args)]

    monkeypatch.setattr(mlp, "_gradients", last_bit_noise)
    noisy = mlp.train(data.x, data.y, 5, SMALL)
    for la, lb in zip(base.layers, noisy.layers, strict=True):
        assert np.array_equal(la.w, lb.w) and np.array_equal(la.b, lb.b)


def test_quantization_plan(data: pdm_data.Dataset) -> None:
    model = mlp.train(data.x, data.y, 5, SMALL)
    plan = quantize.plan(model, data.x[:500])
    acts = mlp.activations(model, data.x[:500])
    for params, a in zip((plan.input, *plan.outputs), acts, strict=True):
        assert -128 <= params.zero_point <= 127
        lo = (-128 - params.zero_point) * params.scale
        hi = (127 - params.zero_point) * params.scale
        assert lo <= a.min() + 1e-6 and a.max() <= hi + params.scale  # covers calibration
        assert lo <= 0.0 <= hi
    for hidden in plan.outputs[:-1]:
        assert hidden.zero_point == -128  # after ReLU: the whole range is >= 0
    assert (plan.softmax.scale, plan.softmax.zero_point) == (1 / 256, -128)
    w = model.layers[0].w
    q = quantize.quantize_weights(w, plan.weight_scales[0])
    assert q.dtype == np.int8 and q.min() >= -127 and np.abs(q).max() == 127
    bias = quantize.quantize_bias(model.layers[0].b, plan.input.scale, plan.weight_scales[0])
    assert bias.dtype == np.int32
    recovered = bias * np.float32(plan.input.scale) * np.float32(plan.weight_scales[0])
    assert np.abs(recovered - model.layers[0].b).max() <= plan.input.scale * plan.weight_scales[0]


def test_standardised_features_share_one_int8_range(data: pdm_data.Dataset) -> None:
    # why standardisation stays ahead of the first quantize: raw inputs would need one scale
    # across rpm and g; standardised ones fit 256 levels finely
    model = mlp.train(data.x, data.y, 5, SMALL)
    plan = quantize.plan(model, data.x)
    levels_per_std = 1.0 / plan.input.scale
    assert levels_per_std > 10
    raw_scale = (data.x.max() - min(0.0, data.x.min())) / 255
    assert raw_scale > data.x[:, 0].std() * 10  # a raw int8 step dwarfs a vibration feature
