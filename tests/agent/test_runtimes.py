"""The runtime interface on real runtimes: every committed artifact, small ONNX models built here
with onnx.helper, every kind of bad file, batch validation, the LiteRT lock and resize path."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.errors import BatchError, InferenceError, ModelLoadError
from agent.runtimes import (
    LiteRtRuntime,
    OnnxRuntime,
    load_runtime,
    runtime_for_path,
)
from protocol.bundle import METADATA_FILE, ArtifactInfo, BundleMetadata, TensorSpec, parse_bundle

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "models" / "bundles"


def _committed() -> list[tuple[Path, BundleMetadata, ArtifactInfo]]:
    found: list[tuple[Path, BundleMetadata, ArtifactInfo]] = []
    for meta_path in sorted(BUNDLES.glob(f"*/*/{METADATA_FILE}")):
        meta = parse_bundle(meta_path.read_bytes())
        found.extend((meta_path.parent, meta, a) for a in meta.artifacts)
    return found


COMMITTED = _committed()
COMMITTED_IDS = [f"{d.parent.name}-v{d.name}-{a.file}" for d, _, a in COMMITTED]


def _first(runtime: str) -> Path:
    for bundle_dir, _, artifact in COMMITTED:
        if artifact.runtime == runtime:
            return bundle_dir / artifact.file
    pytest.skip(f"no committed {runtime} artifact under {BUNDLES}")


# --- small ONNX models built here -----------------------------------------------------------

F, C = 8, 3


def _weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(F, C)).astype(np.float32), rng.normal(size=C).astype(np.float32)


def _softmax_model(
    path: Path,
    *,
    features: int = F,
    batch: str | int = "batch",
    in_name: str = "features",
    out_name: str = "probabilities",
    dtype: int = TensorProto.FLOAT,
    extra_input: bool = False,
    in_shape: list[int | str] | None = None,
) -> Path:
    """softmax(x @ W + b) as ONNX; the variants make the bad signatures tests need."""
    w, b = _weights()
    w = np.resize(w, (features, C)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["xf", "W"], ["z"]),
        helper.make_node("Add", ["z", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [out_name], axis=-1),
    ]
    if dtype == TensorProto.FLOAT:
        nodes.insert(0, helper.make_node("Identity", [in_name], ["xf"]))
    else:
        nodes.insert(0, helper.make_node("Cast", [in_name], ["xf"], to=TensorProto.FLOAT))
    inputs = [helper.make_tensor_value_info(in_name, dtype, in_shape or [batch, features])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [batch, features]))
        nodes.append(helper.make_node("Identity", ["mask"], ["unused"]))
    graph = helper.make_graph(
        nodes,
        "softmax-classifier",
        inputs,
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, C])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _expected(x: np.ndarray) -> np.ndarray:
    w, b = _weights()
    z = x.astype(np.float64) @ w.astype(np.float64) + b
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _softmax_model(tmp_path_factory.mktemp("onnx") / "softmax.onnx")


@pytest.fixture
def rows() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(64, F)).astype(np.float32)


# --- the interface on a built ONNX model ----------------------------------------------------


def test_onnx_signature_and_predictions_match_numpy(onnx_path: Path, rows: np.ndarray) -> None:
    rt = load_runtime(onnx_path, "onnxruntime", 2)
    assert isinstance(rt, OnnxRuntime)
    assert (rt.name, rt.path, rt.threads) == ("onnxruntime", onnx_path, 2)
    assert rt.input == TensorSpec("features", "float32", (None, F))
    assert rt.output == TensorSpec("probabilities", "float32", (None, C))
    options = rt._session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    for n in (1, 7, 64, 1):
        out = rt.predict(rows[:n])
        assert out.dtype == np.float32 and out.shape == (n, C)
        np.testing.assert_allclose(out, _expected(rows[:n]), rtol=1e-5, atol=1e-6)
    rt.close()


def test_onnx_fixed_batch_model_takes_only_that_batch(tmp_path: Path, rows: np.ndarray) -> None:
    rt = load_runtime(_softmax_model(tmp_path / "b1.onnx", batch=1), "onnxruntime", 1)
    assert rt.input.shape == (1, F)
    np.testing.assert_allclose(rt.predict(rows[:1]), _expected(rows[:1]), rtol=1e-5, atol=1e-6)
    with pytest.raises(BatchError, match=r"b1\.onnx: batch has 2 rows; this model takes exactly 1"):
        rt.predict(rows[:2])


# --- the interface on every committed artifact ----------------------------------------------


@pytest.mark.parametrize(("bundle_dir", "meta", "artifact"), COMMITTED, ids=COMMITTED_IDS)
def test_committed_artifact_passes_its_golden_set(
    bundle_dir: Path, meta: BundleMetadata, artifact: ArtifactInfo
) -> None:
    from protocol.golden import GoldenSet, check_golden

    path = bundle_dir / artifact.file
    rt = load_runtime(path, artifact.runtime, 2, expect_input=meta.input, expect_output=meta.output)
    assert rt.name == artifact.runtime
    assert (rt.input, rt.output) == (meta.input, meta.output)
    golden = GoldenSet.from_json((bundle_dir / artifact.golden).read_bytes())
    result = check_golden(golden, rt.predict(golden.inputs))
    assert result.passed, result.reason
    # Batch sizes that change on every call: LiteRT resizes, results stay the same per row.
    features = meta.input.shape[1]
    assert features is not None
    x = np.random.default_rng(7).normal(size=(33, features)).astype(np.float32)
    full = rt.predict(x)
    for n in (1, 33, 5, 1, 0, 17):
        np.testing.assert_allclose(rt.predict(x[:n]), full[:n], rtol=1e-5, atol=1e-6)
    # run(), the inference service's unchecked call, gives the same, between resizes too
    for n in (33, 1, 1, 5):
        np.testing.assert_allclose(rt.run(x[:n]), full[:n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rt.predict(x[: n + 1]), full[: n + 1], rtol=1e-5, atol=1e-6)
    # Layouts and dtypes the runtime gets through the slow path or takes as they are.
    for batch in (
        np.asfortranarray(x),
        np.repeat(x, 2, axis=0)[::2],
        x.astype(">f4"),
        x.astype(np.float64),
    ):
        np.testing.assert_allclose(rt.predict(batch), full, rtol=1e-5, atol=1e-6)
    rt.close()


@pytest.mark.parametrize(("bundle_dir", "meta", "artifact"), COMMITTED, ids=COMMITTED_IDS)
def test_committed_artifact_refuses_another_signature(
    bundle_dir: Path, meta: BundleMetadata, artifact: ArtifactInfo
) -> None:
    features = meta.input.shape[1]
    assert features is not None
    wider = TensorSpec(meta.input.name, meta.input.dtype, (None, features + 1))
    with pytest.raises(ModelLoadError) as err:
        load_runtime(bundle_dir / artifact.file, artifact.runtime, 1, expect_input=wider)
    assert str(err.value) == (
        f"{bundle_dir / artifact.file}: input signature does not match the bundle: shape "
        f"(None, {features}) (expected (None, {features + 1})); this file belongs to another "
        "model or version — use the artifact the bundle lists"
    )
    renamed = TensorSpec("scores", meta.output.dtype, meta.output.shape)
    with pytest.raises(ModelLoadError, match=r"output signature does not match.*name"):
        load_runtime(bundle_dir / artifact.file, artifact.runtime, 1, expect_output=renamed)


def test_litert_does_not_import_onnxruntime() -> None:
    """A LiteRT-only device (armv7l) has no onnxruntime; loading a .tflite must not need it."""
    path = _first("litert")
    code = (
        "import sys, numpy as np\n"
        "from agent.runtimes import load_runtime\n"
        f"rt = load_runtime({str(path)!r}, 'litert', 1)\n"
        "rt.predict(np.zeros((4, rt.input.shape[1]), np.float32))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'onnx')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.usefixtures("implementation")
def test_litert_concurrent_callers_get_their_own_rows() -> None:
    """The lock keeps resize/set/invoke/get of one caller together under contention."""
    rt = load_runtime(_first("litert"), "litert", 1)
    assert isinstance(rt, LiteRtRuntime)
    features = rt.input.shape[1]
    assert features is not None
    x = np.random.default_rng(3).normal(size=(48, features)).astype(np.float32)
    expected = rt.predict(x)
    failures: list[str] = []

    def worker(n: int) -> None:
        for _ in range(50):
            out = rt.predict(x[:n])
            if out.shape != (n, expected.shape[1]) or not np.allclose(out, expected[:n], atol=1e-6):
                failures.append(f"batch {n}")
                return

    threads = [threading.Thread(target=worker, args=(n,)) for n in (1, 5, 48, 16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.usefixtures("implementation")
def test_litert_failure_inside_a_run_is_the_runtimes_error() -> None:
    """A batch the interpreter refuses at the allocated size fails as an InferenceError naming
    the file and LiteRT's reason, the lock is free again and the next batch is served (the C
    runner raises through the same _run_failed as the Python run)."""
    path = _first("litert")
    rt = load_runtime(path, "litert", 1)
    assert isinstance(rt, LiteRtRuntime)
    x = np.random.default_rng(4).normal(size=(1, rt._features)).astype(np.float32)
    want = rt.predict(x)
    wrong = np.zeros((1, rt._features + 1), np.float32)  # run() trusts its caller's checks
    with pytest.raises(InferenceError, match=rf"^{path}: litert failed to run the batch") as err:
        rt.run(wrong)
    assert err.value.__cause__ is not None
    assert rt._allocated_rows == -1 and not rt._lock.locked()
    np.testing.assert_array_equal(rt.run(x), want)


# --- batches ----------------------------------------------------------------------------------


def test_batch_conversions_give_the_same_answer(onnx_path: Path, rows: np.ndarray) -> None:
    rt = load_runtime(onnx_path, "onnxruntime", 1)
    want = rt.predict(rows)
    for batch in (
        rows.astype(np.float64),
        rows.astype(">f4"),  # big-endian float32
        np.asfortranarray(rows),
        np.repeat(rows, 2, axis=0)[::2],  # strided view
    ):
        np.testing.assert_allclose(rt.predict(batch), want, rtol=1e-6)
    ints = np.arange(2 * F).reshape(2, F)
    np.testing.assert_allclose(rt.predict(ints), rt.predict(ints.astype(np.float32)))
    assert rt.predict(rows[:0]).shape == (0, C)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (np.zeros(F, np.float32), r"batch has shape \(8,\); the model takes \(rows, 8\) — wrap"),
        (np.zeros((2, 5), np.float32), r"batch has shape \(2, 5\); the model takes \(rows, 8\)$"),
        (np.zeros((1, 2, F), np.float32), r"batch has shape \(1, 2, 8\)"),
        (np.zeros((2, F), dtype="U3"), r"batch has dtype <U3; pass float32 numbers"),
        (np.zeros((2, F), dtype=complex), r"batch has dtype complex128"),
        ([[0.0] * F], r"batch is a list; pass a numpy array of shape \(rows, 8\)"),
    ],
    ids=["1d", "width", "3d", "str", "complex", "list"],
)
def test_bad_batches_say_what_is_wrong(onnx_path: Path, batch: np.ndarray, message: str) -> None:
    rt = load_runtime(onnx_path, "onnxruntime", 1)
    with pytest.raises(BatchError, match=r"^softmax\.onnx: " + message):
        rt.predict(batch)


@pytest.mark.usefixtures("implementation")
def test_closed_runtime_says_so(onnx_path: Path, rows: np.ndarray) -> None:
    with OnnxRuntime(onnx_path, 1) as rt:
        rt.predict(rows[:1])
    for call in (rt.predict, rt.run):
        with pytest.raises(InferenceError, match=r"softmax\.onnx: the model was closed; load it"):
            call(rows[:1])
    tflite = _first("litert")
    with LiteRtRuntime(tflite, 1) as lite:
        x = np.zeros((2, lite._features), np.float32)
        lite.predict(x)
    for batch in (x, x[:1]):  # same size, and a size that would resize
        for call in (lite.predict, lite.run):
            with pytest.raises(InferenceError, match=rf"{tflite.name}: the model was closed; load"):
                call(batch)


# --- bad files --------------------------------------------------------------------------------


def _bad(path: Path, runtime: str, match: str, **kwargs: object) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as err:
        load_runtime(path, runtime, 1, **kwargs)  # type: ignore[arg-type]
    assert err.value.path == str(path)
    assert str(err.value).startswith(f"{path}: ")
    assert err.value.reason == str(err.value)[len(str(path)) + 2 :]
    assert __import__("re").search(match, err.value.reason), err.value.reason
    return err.value


@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
def test_missing_empty_and_directory(tmp_path: Path, runtime: str) -> None:
    suffix = ".onnx" if runtime == "onnxruntime" else ".tflite"
    _bad(tmp_path / f"gone{suffix}", runtime, r"^no such file")
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    _bad(tmp_path / f"empty{suffix}", runtime, r"^is empty; the download or build was cut short")
    (tmp_path / f"dir{suffix}").mkdir()
    _bad(tmp_path / f"dir{suffix}", runtime, r"^is not a regular file")


@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(tmp_path: Path, runtime: str, seed: int) -> None:
    suffix = ".onnx" if runtime == "onnxruntime" else ".tflite"
    path = tmp_path / f"noise{suffix}"
    data = np.random.default_rng(seed).bytes(4096)
    path.write_bytes(data)
    _bad(path, runtime, r"^(not a valid ONNX model|is not a TFLite flatbuffer)")


def _artifacts_and_built(onnx_path: Path) -> list[tuple[Path, str]]:
    found = [(onnx_path, "onnxruntime")]
    found += [(d / a.file, a.runtime) for d, _, a in COMMITTED]
    return found


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.6, 0.95])
def test_truncated_files(tmp_path: Path, onnx_path: Path, fraction: float) -> None:
    for source, runtime in _artifacts_and_built(onnx_path):
        data = source.read_bytes()
        cut = tmp_path / f"cut-{source.parent.name}-{source.name}"
        cut.write_bytes(data[: max(1, int(len(data) * fraction))])
        _bad(cut, runtime, r"^(not a valid|is not a TFLite flatbuffer)")


def test_flipped_header_bytes(tmp_path: Path, onnx_path: Path) -> None:
    """Flip the bytes that frame the file: the first protobuf tag, the flatbuffer root offset."""
    for source, runtime in _artifacts_and_built(onnx_path):
        data = bytearray(source.read_bytes())
        for i in range(4):
            data[i] ^= 0xFF
        flipped = tmp_path / f"flip-{source.parent.name}-{source.name}"
        flipped.write_bytes(bytes(data))
        _bad(flipped, runtime, r"^not a valid (ONNX|TFLite) model")


_FLIP_SWEEP = """
import json, os, sys, tempfile
import numpy as np
from agent.errors import InferenceError, ModelLoadError
from agent.runtimes import load_runtime

n = int(sys.argv[1])
report = {}
for source, runtime in zip(sys.argv[2::2], sys.argv[3::2]):
    data = open(source, "rb").read()
    seen = report[source] = {"load_error": 0, "loaded": 0, "inference_error": 0, "escaped": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(source))
        for pos in sorted(set(np.linspace(0, len(data) - 1, n).astype(int).tolist())):
            flipped = bytearray(data)
            flipped[pos] ^= 0xFF
            with open(path, "wb") as f:
                f.write(flipped)
            try:
                rt = load_runtime(path, runtime, 1)
            except ModelLoadError:
                seen["load_error"] += 1
                continue
            except Exception as exc:
                seen["escaped"].append(f"load, byte {pos}: {type(exc).__name__}: {exc}")
                continue
            seen["loaded"] += 1
            try:
                rt.predict(np.ones((3, rt.input.shape[1]), np.float32))
            except InferenceError:
                seen["inference_error"] += 1
            except Exception as exc:
                seen["escaped"].append(f"predict, byte {pos}: {type(exc).__name__}: {exc}")
            rt.close()
print(json.dumps(report))
"""


def test_flipped_bytes_anywhere_never_escape_as_other_errors(onnx_path: Path) -> None:
    """Flip one byte at 40 offsets spread over each file (the built ONNX model and v1's
    artifacts), in a child process (a crash inside a runtime shows there as a non-zero exit):
    each load fails with ModelLoadError, or gives a model whose predict works or raises
    InferenceError — never anything else."""
    targets = [(str(onnx_path), "onnxruntime")]
    targets += [(str(d / a.file), a.runtime) for d, _, a in COMMITTED if d.name == "1"]
    assert len(targets) == 4
    out = subprocess.run(
        [sys.executable, "-c", _FLIP_SWEEP, "40", *(x for t in targets for x in t)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stderr[-3000:]}"
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(report) == sorted(path for path, _ in targets)
    for path, seen in report.items():
        assert seen["escaped"] == [], (path, seen)
        assert seen["load_error"] > 0, (path, seen)  # the sweep does hit the file's structure


def test_other_runtimes_format_by_content(tmp_path: Path, onnx_path: Path) -> None:
    as_bin = tmp_path / "model.bin"
    as_bin.write_bytes(onnx_path.read_bytes())
    _bad(
        as_bin,
        "litert",
        r"^is not a TFLite flatbuffer .*looks like an ONNX model; load it "
        r"with runtime 'onnxruntime'",
    )
    tflite = _first("litert")
    tflite_bin = tmp_path / "tflite.bin"
    tflite_bin.write_bytes(tflite.read_bytes())
    _bad(
        tflite_bin,
        "onnxruntime",
        r"^is a TFLite flatbuffer, not an ONNX model; load it with "
        r"runtime 'litert'",
    )


def test_wrong_extension(tmp_path: Path, onnx_path: Path) -> None:
    renamed = tmp_path / "model.tflite"
    renamed.write_bytes(onnx_path.read_bytes())
    _bad(
        renamed,
        "onnxruntime",
        r"^the file name says \.tflite \(runtime 'litert'\) but runtime "
        r"'onnxruntime' was asked; load it with runtime 'litert'",
    )
    _bad(renamed, "litert", r"looks like an ONNX model; load it with runtime 'onnxruntime'")
    tflite = tmp_path / "model.onnx"
    tflite.write_bytes(_first("litert").read_bytes())
    _bad(tflite, "litert", r"^the file name says \.onnx \(runtime 'onnxruntime'\)")


def test_unknown_runtime_and_bad_threads(onnx_path: Path) -> None:
    _bad(onnx_path, "tensorrt", r"^unknown runtime 'tensorrt'; use one of onnxruntime, litert")
    with pytest.raises(ModelLoadError, match=r"threads must be a positive integer, got 0"):
        load_runtime(onnx_path, "onnxruntime", 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"extra_input": True},
            r"^has 2 inputs \(features, mask\); the agent serves models with "
            r"exactly one input",
        ),
        ({"dtype": TensorProto.INT8}, r"^input 'features' is int8; the agent exchanges float32"),
        (
            {"batch": 1, "features": 0},
            r"^input 'features' has shape \(1, 0\); the agent serves "
            r"models of shape \(batch, width\) with a fixed width",
        ),
        ({"in_shape": ["batch", "width"]}, r"^input 'features' has shape \(\?, \?\)"),
        ({"in_shape": ["batch", 2, F]}, r"^input 'features' has shape \(\?, 2, 8\)"),
    ],
    ids=["two-inputs", "int8-input", "empty-width", "dynamic-width", "rank-3"],
)
def test_signatures_the_agent_cannot_serve(
    tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    path = _softmax_model(tmp_path / "odd.onnx", **kwargs)  # type: ignore[arg-type]
    _bad(path, "onnxruntime", match)


def test_expected_signature_of_a_built_model(onnx_path: Path) -> None:
    spec = TensorSpec("features", "float32", (None, F))
    rt = load_runtime(onnx_path, "onnxruntime", 1, expect_input=spec)
    rt.close()
    err = _bad(
        onnx_path,
        "onnxruntime",
        r"^input signature does not match the bundle: name 'features' \(expected 'x'\), "
        r"shape \(None, 8\) \(expected \(None, 4\)\)",
        expect_input=TensorSpec("x", "float32", (None, 4)),
    )
    assert isinstance(err, ValueError)


def test_runtime_for_path() -> None:
    assert runtime_for_path("a/model.int8.ONNX") == "onnxruntime"
    assert runtime_for_path(Path("m.tflite")) == "litert"
    with pytest.raises(ModelLoadError, match=r"m\.bin: cannot tell the runtime"):
        runtime_for_path("m.bin")


# --- edge-agent model check -------------------------------------------------------------------


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from agent.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("bundle_dir", "meta", "artifact"), COMMITTED, ids=COMMITTED_IDS)
def test_model_check_passes_each_committed_artifact(
    bundle_dir: Path,
    meta: BundleMetadata,
    artifact: ArtifactInfo,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, golden = bundle_dir / artifact.file, bundle_dir / artifact.golden
    code, out, _ = _cli(["model", "check", str(path), "--golden", str(golden)], capsys)
    assert code == 0, out
    assert f"runtime  {artifact.runtime}, 1 thread\n" in out
    assert f"input    {meta.input.name} float32 (?, {meta.input.shape[1]})\n" in out
    assert out.rstrip().endswith("— pass")
    code, out, _ = _cli(["model", "check", str(path), "--json", "--threads", "2"], capsys)
    doc = json.loads(out)
    assert (code, doc["runtime"], doc["threads"], doc["golden"]) == (0, artifact.runtime, 2, None)
    assert doc["output"] == meta.output.to_dict()


def test_model_check_fails_a_golden_set_that_does_not_match(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from protocol.golden import GoldenSet

    bundle_dir, _, artifact = next(c for c in COMMITTED if c[2].runtime == "litert")
    golden = GoldenSet.from_json((bundle_dir / artifact.golden).read_bytes())
    shifted = GoldenSet(golden.inputs, golden.expected + 0.2, golden.atol, golden.min_agreement)
    bad = tmp_path / "shifted.json"
    bad.write_bytes(shifted.to_json())
    path = str(bundle_dir / artifact.file)
    code, out, _ = _cli(["model", "check", path, "--golden", str(bad)], capsys)
    assert code == 1
    assert "— FAIL: max |output - expected| = 0.2" in out
    code, out, _ = _cli(["model", "check", path, "--golden", str(bad), "--json"], capsys)
    assert (code, json.loads(out)["golden"]["passed"]) == (1, False)


def test_model_check_errors_name_the_file(
    tmp_path: Path, onnx_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    noise = tmp_path / "noise.tflite"
    noise.write_bytes(b"\x01" * 100)
    code, out, err = _cli(["model", "check", str(noise)], capsys)
    assert (code, out) == (2, "")
    assert err.startswith(f"edge-agent: error: {noise}: is not a TFLite flatbuffer")
    bundle_dir, _, artifact = COMMITTED[0]
    golden = str(bundle_dir / artifact.golden)
    code, _, err = _cli(["model", "check", str(onnx_path), "--golden", golden], capsys)
    assert code == 2
    assert "golden inputs have 24 features but" in err and "takes 8" in err
    code, _, err = _cli(["model", "check", str(onnx_path), "--golden", str(noise)], capsys)
    assert (code, err.startswith(f"edge-agent: error: {noise}: golden set is not JSON")) == (
        2,
        True,
    )
    code, _, err = _cli(["model", "check", str(tmp_path / "model.pt")], capsys)
    assert code == 2 and "cannot tell the runtime from the extension '.pt'" in err


def test_every_runtime_has_committed_artifacts() -> None:
    """The tests above run on the committed bundles; without them they would prove little."""
    assert {a.runtime for _, _, a in COMMITTED} == {"onnxruntime", "litert"}
    assert {(d.parent.name, d.name) for d, _, _ in COMMITTED} >= {
        ("pdm-classifier", "1"),
        ("pdm-classifier", "2"),
    }


def test_missing_runtime_packages_give_a_clear_error(
    onnx_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An armv7l device has no onnxruntime; a device may lack LiteRT. A module set to None in
    sys.modules is what Python's import system reports as not installed."""
    from agent.errors import RuntimeUnavailableError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RuntimeUnavailableError, match=r"onnxruntime is not installed on this "
                       r"device .*use a \.tflite artifact with runtime 'litert'"):  # fmt: skip
        load_runtime(onnx_path, "onnxruntime", 1)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(RuntimeUnavailableError, match=r"no LiteRT runtime is installed"):
        load_runtime(_first("litert"), "litert", 1)
