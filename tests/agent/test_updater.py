"""The update engine end to end on one device, against a real TUF repository over loopback HTTP.

The committed pdm-classifier bundles are published as releases by a real
:class:`fleet.tuf_repo.TufRepository` and served by a small stdlib HTTP server (metadata public,
targets behind a device bearer token, Range support, switches for attacks). Desired documents
are signed with the repository's targets key. The device side is all real: A/B slots on disk,
the inference service with real runtimes under live traffic, the SQLite update store, ngclient.

Releases: v1 (installed at the factory), v2 (the good update), v3 (v2's model with v1's golden
set: fails health_check), v4 (a model that predicts almost only class 0 with a golden set that
matches it: passes health_check, fails trial on output drift), v5 (an artifact for another
profile), v6 (a target whose signed metadata names another release: mix-and-match), v10 (v2 with
a shadow step of 50 live rows: passes it), v11 (v4's one-class model with the same shadow step:
refused there, before it serves anything).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper
from securesystemslib.signer import CryptoSigner, Signer

from agent.bundle_install import install_bundle, read_bundle
from agent.drift import DriftAccumulator
from agent.health_check import run_health_check
from agent.inference import InferenceService, load_model
from agent.runtimes import load_runtime
from agent.slots import Slots
from agent.tuf_client import DeviceFetcher, ReleaseClient, RetryPolicy
from agent.update_states import MAX_ATTEMPTS, UpdateState
from agent.update_store import UpdateStore
from agent.updater import PauseHook, Updater, UpdaterConfig
from firmware_profiles import load_profile
from fleet.tuf_repo import TufRepository
from protocol.bundle import BundleMetadata, HealthThresholds
from protocol.desired import DesiredDocument, sign_desired
from protocol.golden import GoldenSet
from protocol.messages import ModelRef, UpdateBody
from protocol.release import release_targets

BUNDLES = Path(__file__).resolve().parents[2] / "models" / "bundles" / "pdm-classifier"
TOKEN = "device-1-secret"
DEVICE = "dev-1"
MODEL = "pdm-classifier"
S = UpdateState
HAPPY = [
    ("idle", "downloading"),
    ("downloading", "verifying"),
    ("verifying", "installing"),
    ("installing", "health_check"),
    ("health_check", "activating"),
    ("activating", "trial"),
    ("trial", "committed"),
]
TRIAL = HealthThresholds(
    trial_seconds=0.5, trial_min_requests=5, max_error_rate=0.01, max_latency_ratio=100.0
)
SHADOW = {"shadow_samples": 50, "min_shadow_agreement": 0.9}
SHADOW_HAPPY = [
    *HAPPY[:4],
    ("health_check", "shadow"),
    ("shadow", "activating"),
    *HAPPY[5:],
]
_serials = itertools.count(100)


# --- the repository and its server ------------------------------------------------------------


@dataclass
class Faults:
    overrides: dict[str, bytes] = field(default_factory=dict)  # URL path suffix -> body
    extra: dict[str, bytes] = field(default_factory=dict)  # URL path suffix -> appended bytes
    fail_first: dict[str, list[int]] = field(default_factory=dict)  # suffix -> statuses
    requests: list[str] = field(default_factory=list)


class RepoServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repo: TufRepository) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repo = repo
        self.faults = Faults()
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/tuf"


def _match(table: dict[str, object], path: str) -> str | None:
    return next((k for k in table if path.endswith(k)), None)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: RepoServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        faults = self.server.faults
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            faults.requests.append(path)
            key = _match(faults.fail_first, path)  # type: ignore[arg-type]
            status = faults.fail_first[key].pop(0) if key and faults.fail_first[key] else None
        if status is not None:
            self.send_error(status)
            return
        if path.startswith("/tuf/metadata/"):
            file = self.server.repo.metadata_file(path.removeprefix("/tuf/metadata/"))
        elif path.startswith("/tuf/targets/"):
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self.send_error(401)
                return
            file = self.server.repo.target_file(path.removeprefix("/tuf/targets/"))
        else:
            file = None
        key = _match(faults.overrides, path)  # type: ignore[arg-type]
        if key is not None:
            body = faults.overrides[key]
        elif file is None:
            self.send_error(404)
            return
        else:
            body = file.read_bytes()
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
        extra_key = _match(faults.extra, path)  # type: ignore[arg-type]
        extra = faults.extra[extra_key] if extra_key else b""
        part = body[start:] + extra
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        self.wfile.write(part)


@dataclass
class Fleet:
    repo: TufRepository
    server: RepoServer
    targets_key: CryptoSigner
    root_key: CryptoSigner
    pinned_root: bytes


def _now() -> datetime:
    return datetime.now(UTC)


def _collapsed_model(data: bytes) -> bytes:
    """The fp32 model with class 0's output bias raised: it predicts "normal" for nearly all."""
    model = onnx.load_from_string(data)
    for init in model.graph.initializer:
        if init.name == "dense_2.bias":
            bias = numpy_helper.to_array(init).copy()
            bias[0] += 40.0
            init.CopyFrom(numpy_helper.from_array(bias, init.name))
    return model.SerializeToString()


def _publish(
    repo: TufRepository,
    meta: BundleMetadata,
    files: dict[str, bytes],
    version: int,
    *,
    replace_files: dict[str, bytes] | None = None,
    profiles: tuple[str, ...] | None = None,
    custom_version: int | None = None,
    now: datetime | None = None,
    health: dict[str, float] | None = None,
) -> None:
    files = dict(files, **(replace_files or {}))
    lengths = {name: (hashlib.sha256(d).hexdigest(), len(d)) for name, d in files.items()}
    artifacts = meta.artifacts
    if profiles is not None:
        artifacts = tuple(dataclasses.replace(a, profiles=profiles) for a in artifacts)
    new = dataclasses.replace(
        meta,
        version=version,
        files={**meta.files, **lengths},
        health=dataclasses.replace(
            meta.health,
            trial_seconds=TRIAL.trial_seconds,
            trial_min_requests=TRIAL.trial_min_requests,
            max_latency_ratio=TRIAL.max_latency_ratio,
            **(health or {}),
        ),
        artifacts=artifacts,
    )
    items = []
    for target in release_targets(new):
        custom = dict(target.custom)
        if custom_version is not None and custom.get("kind") == "artifact":
            custom["version"] = custom_version
            for ref in ("golden", "reference"):
                custom[ref] = dict(
                    custom[ref],
                    path=custom[ref]["path"].replace(f"/{version}/", f"/{custom_version}/"),
                )
        items.append((target.path, files[target.bundle_file], custom))
    repo.add_targets(items, now or _now())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root_key = CryptoSigner.generate_ed25519()
    online = {r: CryptoSigner.generate_ed25519() for r in ("targets", "snapshot", "timestamp")}
    repo = TufRepository(tmp_path_factory.mktemp("repo"), online)
    repo.init(root_key, _now())
    meta1, files1 = read_bundle(BUNDLES / "1")
    meta2, files2 = read_bundle(BUNDLES / "2")
    _publish(repo, meta1, files1, 1)
    _publish(repo, meta2, files2, 2)
    # v3: v2's artifacts with v1's golden sets -> refused at health_check
    _publish(
        repo,
        meta2,
        files2,
        3,
        replace_files={a.golden: files1[a.golden] for a in meta2.artifacts},
    )
    # v4: collapsed fp32 model + its own golden set -> passes health_check, fails trial
    fp32 = next(a for a in meta2.artifacts if a.file == "model.fp32.onnx")
    bad = _collapsed_model(files2[fp32.file])
    old_golden = GoldenSet.from_json(files2[fp32.golden])
    runtime = load_runtime_bytes(bad, tmp_path_factory.mktemp("bad"))
    golden = GoldenSet(old_golden.inputs, runtime.predict(old_golden.inputs), 1e-4, 1.0)
    runtime.close()
    _publish(repo, meta2, files2, 4, replace_files={fp32.file: bad, fp32.golden: golden.to_json()})
    _publish(repo, meta2, files2, 10, health=SHADOW)
    one_class = {fp32.file: bad, fp32.golden: golden.to_json()}
    _publish(repo, meta2, files2, 11, replace_files=one_class, health=SHADOW)
    _publish(repo, meta2, files2, 5, profiles=("rpi3-armv7l",))
    _publish(repo, meta2, files2, 6, custom_version=7)  # path says v6, signed metadata v7
    server = RepoServer(repo)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield Fleet(repo, server, online["targets"], root_key, repo.root_bytes(1))
    server.shutdown()
    server.server_close()


def load_runtime_bytes(data: bytes, where: Path):  # type: ignore[no-untyped-def]
    path = where / "model.onnx"
    path.write_bytes(data)
    return load_runtime(path, "onnxruntime", 1)


@pytest.fixture(autouse=True)
def _clean_faults(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "fleet" in request.fixturenames:
        request.getfixturevalue("fleet").server.faults = Faults()


def desired(
    fleet: Fleet,
    version: int,
    file: str = "model.int8.onnx",
    *,
    rollback: bool = False,
    serial: int | None = None,
    device: str = DEVICE,
    signer: Signer | None = None,
    expires: timedelta = timedelta(hours=1),
    model: str = MODEL,
) -> bytes:
    now = _now()
    doc = DesiredDocument(
        device_id=device,
        serial=next(_serials) if serial is None else serial,
        issued_at=now - timedelta(minutes=1),
        expires=now + expires,
        model=model,
        model_version=version,
        target_path=f"{model}/{version}/{file}",
        rollback=rollback,
    )
    return sign_desired(doc, signer or fleet.targets_key)


# --- the device -------------------------------------------------------------------------------


@dataclass
class Device:
    root: Path
    slots: Slots
    service: InferenceService
    store: UpdateStore
    updater: Updater
    reports: list[UpdateBody]
    stop_traffic: threading.Event
    traffic: threading.Thread
    served: list[int]

    def transitions(self) -> list[tuple[str, str]]:
        return [(b.from_state, b.to_state) for b in self.reports]

    def active_version(self) -> int | None:
        installed = self.slots.active_release()
        return None if installed is None else installed.release.version

    def serving_version(self) -> int | None:
        model = self.service.current()
        return None if model is None else model.release.version

    def run(self, wire: bytes, timeout: float = 60.0) -> tuple[S, str]:
        self.reports.clear()
        self.updater.submit(wire)
        record = self.updater.wait_settled(timeout)
        assert record is not None
        return record.state, record.reason


def build_updater(
    root: Path,
    fleet: Fleet,
    slots: Slots,
    service: InferenceService,
    store: UpdateStore,
    reports: list[UpdateBody],
    pause: PauseHook | None = None,
) -> Updater:
    fetcher = DeviceFetcher(
        auth=lambda method, target: {"Authorization": f"Bearer {TOKEN}"},
        retry=RetryPolicy(attempts=2, base_delay=0.0, jitter=0.0, timeout=5.0),
    )
    client = ReleaseClient(
        root / "trust" / "metadata", fleet.pinned_root, fleet.server.base_url, fetcher
    )
    return Updater(
        store=store,
        slots=slots,
        service=service,
        client=client,
        profile=dataclasses.replace(load_profile("x86_64-gateway"), latency_budget_ms=1000.0),
        device_id=DEVICE,
        report=reports.append,
        config=UpdaterConfig(
            downloads_dir=root / "downloads",
            retry_base_seconds=0.01,
            max_transient_failures=3,
            trial_sample_seconds=0.05,
            pause=pause,
        ),
        drift_factory=DriftAccumulator,
    )


def make_device(root: Path, fleet: Fleet, version: int = 1, start: bool = True) -> Device:
    profile = dataclasses.replace(load_profile("x86_64-gateway"), latency_budget_ms=1000.0)
    slots = Slots(root / "slots")
    install_bundle(BUNDLES / str(version), slots, profile)
    service = InferenceService()
    installed = slots.active_release()
    assert installed is not None
    service.swap(load_model(installed, 1, DriftAccumulator))
    store = UpdateStore(root / "agent.db")
    reports: list[UpdateBody] = []
    updater = build_updater(root, fleet, slots, service, store, reports)
    golden = GoldenSet.from_json((BUNDLES / "1" / "golden" / "model.int8.onnx.json").read_bytes())
    stop = threading.Event()
    served: list[int] = []

    def traffic() -> None:
        for i in itertools.cycle(range(golden.n)):
            if stop.wait(0.002):
                return
            try:
                served.append(service.predict(golden.inputs[i : i + 1]).model_version)
            except Exception:  # noqa: BLE001 - the test asserts on `served` instead
                served.append(-1)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    device = Device(root, slots, service, store, updater, reports, stop, thread, served)
    if start:
        updater.start()
    return device


@pytest.fixture
def device(tmp_path: Path, fleet: Fleet) -> Iterator[Device]:
    d = make_device(tmp_path, fleet)
    time.sleep(0.1)  # some traffic on v1: the trial's yardstick
    yield d
    d.stop_traffic.set()
    d.traffic.join()
    d.updater.stop()
    d.service.close()
    d.store.close()


# --- the tests --------------------------------------------------------------------------------


def test_update_commits_and_serves_without_a_failed_request(device: Device, fleet: Fleet) -> None:
    wire = desired(fleet, 2)
    state, reason = device.run(wire)
    assert (state, reason) == (S.COMMITTED, "")
    assert device.transitions() == HAPPY
    assert device.active_version() == 2 and device.serving_version() == 2
    assert -1 not in device.served and {1, 2} <= set(device.served)
    record = device.store.load()
    assert record is not None and record.from_slot == "a" and record.to_slot == "b"
    assert set(device.reports[-1].elapsed_s) >= {"downloading", "health_check", "trial"}
    assert not (device.root / "downloads" / str(record.update_id)).exists()
    # the same retained document delivered again after a reconnect: ignored, nothing reported
    device.updater.submit(wire)
    device.updater.wait_settled(10)
    assert device.reports == device.reports[:7]


def test_transient_network_errors_are_retried(device: Device, fleet: Fleet) -> None:
    fleet.server.faults.fail_first["model.int8.onnx"] = [503, 503, 503]
    state, _ = device.run(desired(fleet, 2))
    assert state is S.COMMITTED
    assert device.transitions() == HAPPY  # retries stay inside downloading


def test_golden_failure_is_refused_at_health_check(device: Device, fleet: Fleet) -> None:
    state, reason = device.run(desired(fleet, 3))
    assert state is S.FAILED
    assert reason.startswith("health_check: golden set failed")
    assert device.transitions()[-1] == ("health_check", "failed")
    assert device.active_version() == 1 and device.serving_version() == 1


def test_trial_failure_is_rolled_back_by_the_device(device: Device, fleet: Fleet) -> None:
    state, reason = device.run(desired(fleet, 4, "model.fp32.onnx"))
    assert state is S.ROLLED_BACK
    assert "trial: predicted classes drift" in reason
    assert device.transitions()[-3:] == [
        ("activating", "trial"),
        ("trial", "rolling_back"),
        ("rolling_back", "rolled_back"),
    ]
    assert device.active_version() == 1 and device.serving_version() == 1
    assert -1 not in device.served and 4 in device.served


def test_shadow_step_passes_a_good_model_and_reports_its_figures(
    device: Device, fleet: Fleet
) -> None:
    state, reason = device.run(desired(fleet, 10))
    assert (state, reason) == (S.COMMITTED, "")
    assert device.transitions() == SHADOW_HAPPY
    out = next(b for b in device.reports if b.from_state == "shadow")
    assert out.reason is not None and out.reason.startswith("shadow passed: agreement ")
    match = re.search(r"agreement ([0-9.]+) \((\d+) of (\d+) live rows\)", out.reason)
    assert match is not None, out.reason
    assert float(match[1]) >= 0.9 and match[3] == "50"
    assert re.search(r"candidate [0-9.]+ ms vs active [0-9.]+ ms", out.reason), out.reason
    assert out.elapsed_s["shadow"] > 0
    assert device.active_version() == 10 and device.serving_version() == 10
    assert -1 not in device.served
    # the tap is gone from the old model and the new one serves without one
    assert device.service.current() is not None


def test_one_class_model_is_refused_at_shadow(device: Device, fleet: Fleet) -> None:
    before = device.service.current()
    state, reason = device.run(desired(fleet, 11, "model.fp32.onnx"))
    assert state is S.FAILED
    assert reason.startswith("shadow: agreement with the active model "), reason
    assert "below the release's min_shadow_agreement 0.9" in reason
    assert device.transitions()[-2:] == [("health_check", "shadow"), ("shadow", "failed")]
    # the candidate never served and the active slot was never touched
    assert device.active_version() == 1 and device.serving_version() == 1
    assert device.service.current() is before
    assert before is not None and before.state.drift is not None and not before.state.drift.taps
    assert -1 not in device.served and 11 not in device.served


def test_shadow_without_traffic_fails_closed(device: Device, fleet: Fleet) -> None:
    device.stop_traffic.set()
    device.traffic.join()
    device.updater.config = dataclasses.replace(device.updater.config, shadow_max_seconds=0.5)
    state, reason = device.run(desired(fleet, 10))
    assert state is S.FAILED
    assert reason.startswith("shadow: only 0 of 50 live rows"), reason
    assert "fail closed" in reason
    assert device.active_version() == 1 and device.serving_version() == 1


def test_restart_inside_shadow_redoes_it(tmp_path: Path, fleet: Fleet) -> None:
    d = make_device(tmp_path, fleet, start=False)
    try:
        marker = tmp_path / "paused"
        first = build_updater(
            tmp_path, fleet, d.slots, d.service, d.store, d.reports, PauseHook("shadow", marker)
        )
        first.start()
        first.submit(desired(fleet, 11, "model.fp32.onnx"))
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first.stop()  # the power cut, as the engine sees it: the saved state is shadow
        saved = d.store.load()
        assert saved is not None and saved.state is S.SHADOW
        assert d.active_version() == 1 and d.serving_version() == 1
        d.reports.clear()
        again = build_updater(tmp_path, fleet, d.slots, d.service, d.store, d.reports)
        again.start()
        record = again.wait_settled(30)
        again.stop()
        assert record is not None and record.state is S.FAILED and record.attempt == 2
        assert record.reason.startswith("shadow: agreement with the active model")
        assert d.transitions() == [("shadow", "failed")]  # resumed in shadow, judged again
        assert d.active_version() == 1 and d.serving_version() == 1
        assert -1 not in d.served
    finally:
        d.stop_traffic.set()
        d.service.close()
        d.store.close()


def test_signed_rollback_is_accepted_plain_downgrade_is_not(tmp_path: Path, fleet: Fleet) -> None:
    d = make_device(tmp_path, fleet, version=2)
    try:
        state, reason = d.run(desired(fleet, 1))
        assert (state, reason.split(":")[0]) == (S.FAILED, "downgrade")
        assert d.active_version() == 2
        state, reason = d.run(desired(fleet, 1, rollback=True))
        assert (state, reason) == (S.COMMITTED, "")
        assert d.active_version() == 1 and d.serving_version() == 1
        assert d.reports[0].rollback
    finally:
        d.stop_traffic.set()
        d.updater.stop()
        d.service.close()


def _flip(fleet: Fleet) -> None:
    info = fleet.repo.get_target(f"{MODEL}/2/model.int8.onnx")
    assert info is not None
    data = bytearray(
        fleet.repo.target_file(f"{MODEL}/2/{info.hashes['sha256']}.model.int8.onnx").read_bytes()
    )  # type: ignore[union-attr]
    data[100] ^= 1
    fleet.server.faults.overrides["model.int8.onnx"] = bytes(data)


ATTACKS = {
    "flipped_byte": (lambda f: (_flip(f), desired(f, 2))[1], "verification"),
    "oversized": (
        lambda f: (f.server.faults.extra.__setitem__("model.int8.onnx", b"x" * 10), desired(f, 2))[
            1
        ],
        "verification",
    ),
    "unknown_key": (
        lambda f: desired(f, 2, signer=CryptoSigner.generate_ed25519()),
        "bad_signature",
    ),
    "wrong_device": (lambda f: desired(f, 2, device="dev-2"), "wrong_device"),
    "expired": (lambda f: desired(f, 2, expires=timedelta(seconds=-1)), "expired"),
    "other_profile": (lambda f: desired(f, 5), "wrong_profile"),
    "mix_and_match": (lambda f: desired(f, 6), "mix_and_match"),
    "unpublished": (lambda f: desired(f, 9), "verification"),
    "other_model": (lambda f: desired(f, 2, model="other-model"), "wrong_model"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_are_refused_with_their_reason(device: Device, fleet: Fleet, attack: str) -> None:
    make, why = ATTACKS[attack]
    state, reason = device.run(make(fleet))
    assert state is S.FAILED
    assert reason.split(":")[0] == why, reason
    assert device.active_version() == 1 and device.serving_version() == 1
    assert device.transitions()[-1][1] == "failed"
    assert -1 not in device.served


@pytest.mark.parametrize(
    "claims",
    [
        {"model": "x" * 200, "model_version": 2**70, "serial": 2**80},
        {"model": "bad\nname", "model_version": -3, "serial": "7", "rollback": "yes"},
        {"model": ["pdm"], "model_version": 1.5},
    ],
)
def test_a_forged_document_with_unreportable_claims_is_refused_and_reported(
    device: Device, claims: dict[str, object]
) -> None:
    """The refusal's report carries what the document claims only where a report can carry it
    (else ``unknown`` / 0): an attacker cannot keep a refusal from reaching the fleet."""
    wire = json.dumps({"signatures": [{"keyid": "ab", "sig": "cd"}], "signed": claims}).encode()
    state, reason = device.run(wire)
    assert state is S.FAILED and reason.startswith("malformed"), reason
    assert device.transitions() == [("idle", "failed")]
    assert device.reports[-1].release == ModelRef("unknown", 0)
    assert device.active_version() == 1 and device.serving_version() == 1


def test_replayed_older_document_is_refused(device: Device, fleet: Fleet) -> None:
    old = desired(fleet, 2)
    newer = desired(fleet, 3)
    assert device.run(newer)[0] is S.FAILED  # v3 fails health_check, its serial is accepted
    state, reason = device.run(old)
    assert (state, reason.split(":")[0]) == (S.FAILED, "replayed")


def test_rollback_of_metadata_is_refused(device: Device, fleet: Fleet) -> None:
    old_timestamp = fleet.repo.metadata_file("timestamp.json").read_bytes()  # type: ignore[union-attr]
    meta1, files1 = read_bundle(BUNDLES / "1")
    _publish(fleet.repo, meta1, files1, 8)  # newer targets, snapshot and timestamp
    assert device.run(desired(fleet, 5))[0] is S.FAILED  # refreshed: trusts the newest now
    fleet.server.faults.overrides["/metadata/timestamp.json"] = old_timestamp
    state, reason = device.run(desired(fleet, 2))
    assert (state, reason.split(":")[0]) == (S.FAILED, "verification")
    assert "TUF verification failed" in reason
    assert device.active_version() == 1 and device.serving_version() == 1


def test_restart_loop_in_trial_rolls_back(tmp_path: Path, fleet: Fleet) -> None:
    d = make_device(tmp_path, fleet, start=False)
    try:
        marker = tmp_path / "paused"
        first = build_updater(
            tmp_path, fleet, d.slots, d.service, d.store, d.reports, PauseHook("trial", marker)
        )
        first.start()
        first.submit(desired(fleet, 2))
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first.stop()  # as if the new model had killed the agent inside the trial
        assert d.serving_version() == 2
        saved = d.store.load()
        assert saved is not None and saved.state is S.TRIAL
        d.store.save(dataclasses.replace(saved, attempt=MAX_ATTEMPTS))  # it happened before
        d.reports.clear()
        again = build_updater(tmp_path, fleet, d.slots, d.service, d.store, d.reports)
        again.start()
        record = again.wait_settled(30)
        again.stop()
        assert record is not None and record.state is S.ROLLED_BACK
        assert "restarted 3 times" in record.reason
        assert d.transitions() == [("trial", "rolling_back"), ("rolling_back", "rolled_back")]
        assert d.active_version() == 1 and d.serving_version() == 1
    finally:
        d.stop_traffic.set()
        d.service.close()
        d.store.close()


def _small_fleet(tmp: Path, now: datetime) -> Fleet:
    """A repository of its own (published at ``now``) with v2, for tests that change its keys."""
    root_key = CryptoSigner.generate_ed25519()
    online = {r: CryptoSigner.generate_ed25519() for r in ("targets", "snapshot", "timestamp")}
    repo = TufRepository(tmp / "repo", online)
    repo.init(root_key, now)
    meta2, files2 = read_bundle(BUNDLES / "2")
    _publish(repo, meta2, files2, 2, now=now)
    server = RepoServer(repo)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return Fleet(repo, server, online["targets"], root_key, repo.root_bytes(1))


def _close(d: Device, fleet: Fleet) -> None:
    d.stop_traffic.set()
    d.updater.stop()
    d.service.close()
    d.store.close()
    fleet.server.shutdown()
    fleet.server.server_close()


def test_revoked_targets_key_no_longer_signs_desired_documents(tmp_path: Path) -> None:
    small = _small_fleet(tmp_path, _now())
    d = make_device(tmp_path / "device", small)
    try:
        old_key = small.targets_key
        new_key = CryptoSigner.generate_ed25519()
        small.repo.revoke_key("targets", old_key.public_key.keyid, small.root_key, _now(), new_key)
        state, reason = d.run(desired(small, 2, signer=old_key))
        assert (state, reason.split(":")[0]) == (S.FAILED, "bad_signature")
        assert "root v2" in reason  # checked against the keys of the root it refreshed to
        assert d.active_version() == 1
        small.targets_key = new_key
        assert d.run(desired(small, 2, signer=new_key)) == (S.COMMITTED, "")
    finally:
        _close(d, small)


def test_frozen_metadata_is_refused(tmp_path: Path) -> None:
    # a mirror (or attacker) that keeps serving metadata signed two days ago: the timestamp
    # (1 day) has expired, so nothing it names may be installed
    small = _small_fleet(tmp_path, _now() - timedelta(days=2))
    d = make_device(tmp_path / "device", small)
    try:
        state, reason = d.run(desired(small, 2))
        assert (state, reason.split(":")[0]) == (S.FAILED, "verification")
        assert "Expired" in reason
        assert d.active_version() == 1 and d.serving_version() == 1
    finally:
        _close(d, small)


# --- power loss: SIGKILL inside each state, restart, end on a working model ----------------------

AGENT = Path(__file__).with_name("update_agent.py")


@pytest.mark.parametrize(
    ("pause_in", "version", "file", "final", "serving"),
    [
        ("downloading", 2, "model.int8.onnx", "committed", 2),
        ("verifying", 2, "model.int8.onnx", "committed", 2),
        ("installing", 2, "model.int8.onnx", "committed", 2),
        ("health_check", 2, "model.int8.onnx", "committed", 2),
        ("shadow", 10, "model.int8.onnx", "committed", 10),
        ("shadow", 11, "model.fp32.onnx", "failed", 1),
        ("activating", 2, "model.int8.onnx", "committed", 2),
        ("trial", 2, "model.int8.onnx", "committed", 2),
        ("trial", 4, "model.fp32.onnx", "rolled_back", 1),
        ("rolling_back", 4, "model.fp32.onnx", "rolled_back", 1),
    ],
)
def test_power_loss_in_each_state(
    tmp_path: Path, fleet: Fleet, pause_in: str, version: int, file: str, final: str, serving: int
) -> None:
    profile = load_profile("x86_64-gateway")
    install_bundle(BUNDLES / "1", Slots(tmp_path / "slots"), profile)
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "root.json").write_bytes(fleet.pinned_root)
    (tmp_path / "desired.bin").write_bytes(desired(fleet, version, file))
    (tmp_path / "traffic.json").write_bytes(
        (BUNDLES / "1" / "golden" / "model.int8.onnx.json").read_bytes()
    )
    marker = tmp_path / "paused"
    argv = [sys.executable, str(AGENT), str(tmp_path), fleet.server.base_url, TOKEN]
    env = dict(
        os.environ, EDGEFLEET_TEST_PAUSE_IN=pause_in, EDGEFLEET_TEST_PAUSE_MARKER=str(marker)
    )
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert first.poll() is None, first.communicate()[0].decode()
            assert time.monotonic() < deadline, f"never reached {pause_in}"
            time.sleep(0.02)
        assert marker.read_text() == pause_in
        first.send_signal(signal.SIGKILL)  # the power cut
    finally:
        first.kill()
        first.wait()
    store = UpdateStore(tmp_path / "agent.db")
    saved = store.load()
    store.close()
    assert saved is not None and saved.state.value == pause_in  # saved before its action
    env.pop("EDGEFLEET_TEST_PAUSE_IN")
    second = subprocess.run(argv, env=env, capture_output=True, timeout=120)
    out = second.stdout.decode()
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    assert f"FINAL {final}" in out, out
    installed = Slots(tmp_path / "slots").active_release()
    assert installed is not None and installed.release.version == serving
    verdict = run_health_check(installed, 1, 1000.0)  # the model left active works
    assert verdict.passed, verdict.reason
