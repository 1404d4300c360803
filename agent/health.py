"""The device's health snapshot and its three renderings: JSON, an HTML page, Prometheus text.

:func:`assemble` builds one frozen :class:`HealthSnapshot` from figures the parts report
(inference counters, the link and outbox, the last drift verdict, the update state, disk and
memory) and lists the problems a technician should look at first. ``to_dict``/``from_dict``
are the ``GET /health`` JSON (``edge-agent status`` reads it back), :func:`render_html` is the
``GET /`` page (plain, readable on a phone, refreshes itself), :func:`render_text` the terminal
form, :func:`render_prometheus` the ``GET /metrics`` text exposition format 0.0.4.

Pure: no sockets, no files, no psutil; ``now`` is passed in. Gathering the figures is the
composition root's job (:mod:`agent.main`), serving them :mod:`agent.http_server`'s.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

OUTBOX_BACKLOG_SECONDS = 3600.0  # older unsent reports than this are a problem worth showing


@dataclass(frozen=True)
class ModelFigures:
    name: str
    version: int
    slot: str
    runtime: str
    format: str
    loaded_at: float  # wall clock


@dataclass(frozen=True)
class InferenceFigures:
    requests: int = 0
    rows: int = 0
    rejected: int = 0  # bad input (4xx)
    errors: int = 0  # runtime failures (5xx)
    p50_ms: float | None = None  # over the active model's recent requests
    p95_ms: float | None = None
    p99_ms: float | None = None
    latency_count: int = 0  # cumulative histogram since start, for Prometheus
    latency_seconds_total: float = 0.0
    latency_buckets: tuple[tuple[float, int], ...] = ()  # (le seconds, cumulative count)


@dataclass(frozen=True)
class FeatureVerdict:
    name: str
    drifted: bool
    psi: float | None = None
    js: float | None = None
    ks: float | None = None


@dataclass(frozen=True)
class DriftFigures:
    """The last closed drift window's verdict."""

    window_end: float  # wall clock
    rows: int
    drifted: bool  # the dataset verdict
    features: tuple[FeatureVerdict, ...] = ()
    note: str = ""  # e.g. "too few rows for a verdict"


@dataclass(frozen=True)
class UpdateFigures:
    state: str  # a state of the update state machine
    result: str = ""  # the last finished update's outcome, e.g. "committed v3"
    reason: str = ""
    at: float | None = None  # wall clock of the last transition


@dataclass(frozen=True)
class SystemFigures:
    rss_bytes: int = 0
    memory_total_bytes: int = 0
    memory_available_bytes: int = 0
    disk_total_bytes: int = 0
    disk_free_bytes: int = 0
    cpu_percent: float = 0.0


@dataclass(frozen=True)
class HealthSnapshot:
    agent_version: str
    device_id: str
    profile: str
    at: float  # wall clock of the snapshot
    uptime_seconds: float
    model: ModelFigures | None
    broker_connected: bool
    outbox_depth: int
    outbox_oldest_age_seconds: float | None
    inference: InferenceFigures = field(default_factory=InferenceFigures)
    drift: DriftFigures | None = None
    update: UpdateFigures | None = None
    system: SystemFigures = field(default_factory=SystemFigures)
    model_error: str = ""  # why the active slot's model could not be loaded
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["status"] = "ok" if self.ok else "degraded"
        doc["inference"]["latency_buckets"] = [list(b) for b in self.inference.latency_buckets]
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> HealthSnapshot:
        """Read back :meth:`to_dict` (``edge-agent status``); KeyError/TypeError if malformed."""
        d = dict(doc)
        d.pop("status", None)
        inference = dict(d["inference"])
        inference["latency_buckets"] = tuple(
            (float(le), int(c)) for le, c in inference["latency_buckets"]
        )
        drift = d["drift"]
        if drift is not None:
            drift = DriftFigures(
                **{
                    **drift,
                    "features": tuple(FeatureVerdict(**f) for f in drift["features"]),
                }
            )
        return cls(
            **{
                **d,
                "model": None if d["model"] is None else ModelFigures(**d["model"]),
                "inference": InferenceFigures(**inference),
                "drift": drift,
                "update": None if d["update"] is None else UpdateFigures(**d["update"]),
                "system": SystemFigures(**d["system"]),
                "problems": tuple(d["problems"]),
            }
        )


def _problems(
    model: ModelFigures | None,
    model_error: str,
    broker_connected: bool,
    outbox_oldest_age: float | None,
    inference: InferenceFigures,
    drift: DriftFigures | None,
    update: UpdateFigures | None,
) -> tuple[str, ...]:
    found = []
    if model_error:
        found.append(f"the active model cannot be loaded: {model_error}")
    elif model is None:
        found.append(
            "no model is installed (edge-agent model install BUNDLE_DIR, or wait for "
            "the fleet's first release)"
        )
    if not broker_connected:
        found.append("not connected to the MQTT broker (reports wait in the outbox)")
    if outbox_oldest_age is not None and outbox_oldest_age > OUTBOX_BACKLOG_SECONDS:
        found.append(f"oldest unsent report is {_duration(outbox_oldest_age)} old")
    if inference.errors:
        found.append(f"{inference.errors} inference error(s) since start")
    if drift is not None and drift.drifted:
        names = [f.name for f in drift.features if f.drifted]
        found.append("input drift in the last window: " + (", ".join(names) or "dataset"))
    if update is not None and update.state in ("failed", "rolled_back", "rolling_back"):
        found.append(
            f"last update {update.state}" + (f": {update.reason}" if update.reason else "")
        )
    return tuple(found)


def assemble(
    *,
    agent_version: str,
    device_id: str,
    profile: str,
    now: float,
    started_at: float,
    model: ModelFigures | None,
    broker_connected: bool,
    outbox_depth: int,
    outbox_oldest_age_seconds: float | None,
    inference: InferenceFigures,
    drift: DriftFigures | None,
    update: UpdateFigures | None,
    system: SystemFigures,
    model_error: str = "",
) -> HealthSnapshot:
    """One snapshot of the parts' figures at ``now`` (wall clock)."""
    return HealthSnapshot(
        agent_version=agent_version,
        device_id=device_id,
        profile=profile,
        at=now,
        uptime_seconds=max(0.0, now - started_at),
        model=model,
        broker_connected=broker_connected,
        outbox_depth=outbox_depth,
        outbox_oldest_age_seconds=outbox_oldest_age_seconds,
        inference=inference,
        drift=drift,
        update=update,
        system=system,
        model_error=model_error,
        problems=_problems(
            model,
            model_error,
            broker_connected,
            outbox_oldest_age_seconds,
            inference,
            drift,
            update,
        ),
    )


# --- text helpers -------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # unreachable


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} ms"


def _when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def sections(s: HealthSnapshot) -> list[tuple[str, list[tuple[str, str]]]]:
    """The snapshot as titled lists of (label, value) lines, shared by the HTML and text forms."""
    m = s.model
    inf = s.inference
    sysf = s.system
    model_lines = (
        [
            ("model", f"{m.name} v{m.version}"),
            ("slot", m.slot),
            ("runtime", f"{m.runtime} ({m.format})"),
            ("loaded", _when(m.loaded_at)),
        ]
        if m
        else [("model", "none installed")]
    )
    update_lines = (
        [
            ("state", s.update.state),
            ("last result", s.update.result or "—"),
            ("reason", s.update.reason or "—"),
            ("at", _when(s.update.at)),
        ]
        if s.update
        else [("state", "no update yet")]
    )
    drift_lines = (
        [
            ("window end", _when(s.drift.window_end)),
            ("rows", str(s.drift.rows)),
            ("verdict", "DRIFT" if s.drift.drifted else "no drift"),
        ]
        + ([("note", s.drift.note)] if s.drift.note else [])
        if s.drift
        else [("verdict", "no window closed yet")]
    )
    return [
        (
            "Device",
            [
                ("status", "ok" if s.ok else "degraded"),
                ("device id", s.device_id),
                ("profile", s.profile),
                ("agent version", s.agent_version),
                ("uptime", _duration(s.uptime_seconds)),
                ("at", _when(s.at)),
            ],
        ),
        ("Model", model_lines),
        (
            "Connectivity",
            [
                ("broker", "connected" if s.broker_connected else "DISCONNECTED"),
                ("outbox depth", str(s.outbox_depth)),
                (
                    "oldest unsent",
                    "—"
                    if s.outbox_oldest_age_seconds is None
                    else _duration(s.outbox_oldest_age_seconds),
                ),
            ],
        ),
        (
            "Inference",
            [
                ("requests", str(inf.requests)),
                ("rows", str(inf.rows)),
                ("rejected (bad input)", str(inf.rejected)),
                ("errors", str(inf.errors)),
                ("latency p50", _ms(inf.p50_ms)),
                ("latency p95", _ms(inf.p95_ms)),
                ("latency p99", _ms(inf.p99_ms)),
            ],
        ),
        ("Drift", drift_lines),
        ("Update", update_lines),
        (
            "System",
            [
                ("agent memory (RSS)", _bytes(sysf.rss_bytes)),
                (
                    "memory available",
                    f"{_bytes(sysf.memory_available_bytes)} of {_bytes(sysf.memory_total_bytes)}",
                ),
                ("disk free", f"{_bytes(sysf.disk_free_bytes)} of {_bytes(sysf.disk_total_bytes)}"),
                ("agent CPU", f"{sysf.cpu_percent:.1f} %"),
            ],
        ),
    ]


def render_text(s: HealthSnapshot) -> str:
    """The terminal form (``edge-agent status``)."""
    out: list[str] = []
    if s.problems:
        out.append("Problems:")
        out.extend(f"  ! {p}" for p in s.problems)
        out.append("")
    for title, lines in sections(s):
        out.append(title)
        width = max(len(label) for label, _ in lines)
        out.extend(f"  {label.ljust(width)}  {value}" for label, value in lines)
        if title == "Drift" and s.drift and s.drift.features:
            out.append("  feature                drifted  psi     js      ks")
            for f in s.drift.features:
                out.append(
                    f"  {f.name[:22].ljust(22)} {('yes' if f.drifted else 'no').ljust(8)} "
                    f"{_num(f.psi).ljust(7)} {_num(f.js).ljust(7)} {_num(f.ks)}"
                )
        out.append("")
    return "\n".join(out)


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:0 auto;max-width:40em;padding:.5em;"
    "line-height:1.4}h1{font-size:1.3em}h2{font-size:1.05em;margin:1em 0 .2em;"
    "border-bottom:1px solid #ccc}table{border-collapse:collapse;width:100%}"
    "td,th{padding:.15em .4em;text-align:left;vertical-align:top}td:first-child{color:#555;"
    "width:45%}.bad{color:#b00;font-weight:bold}.ok{color:#070;font-weight:bold}"
)


def render_html(s: HealthSnapshot, refresh_seconds: int = 10) -> str:
    """The ``GET /`` page: plain HTML, no scripts, readable on a phone."""
    e = html.escape
    status = (
        '<p class="ok">All good.</p>'
        if s.ok
        else '<p class="bad">Needs attention:</p><ul>'
        + "".join(f"<li>{e(p)}</li>" for p in s.problems)
        + "</ul>"
    )
    body = [
        f"<h1>edgefleet agent — {e(s.device_id)}</h1>",
        status,
    ]
    for title, lines in sections(s):
        body.append(f"<h2>{e(title)}</h2><table>")
        body.extend(f"<tr><td>{e(label)}</td><td>{e(value)}</td></tr>" for label, value in lines)
        body.append("</table>")
        if title == "Drift" and s.drift and s.drift.features:
            body.append(
                "<table><tr><th>feature</th><th>drifted</th><th>PSI</th><th>JS</th><th>KS</th></tr>"
            )
            for f in s.drift.features:
                flag = '<span class="bad">yes</span>' if f.drifted else "no"
                body.append(
                    f"<tr><td>{e(f.name)}</td><td>{flag}</td><td>{_num(f.psi)}</td>"
                    f"<td>{_num(f.js)}</td><td>{_num(f.ks)}</td></tr>"
                )
            body.append("</table>")
    body.append('<p><a href="/health">JSON</a> · <a href="/metrics">metrics</a></p>')
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="refresh" content="{refresh_seconds}">'
        f"<title>{e(s.device_id)} — edgefleet</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


# --- Prometheus ---------------------------------------------------------------------------------


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_label(str(v))}"' for k, v in labels.items()) + "}"


def _value(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[str, Mapping[str, str], float]],
    ) -> None:
        rows = list(samples)
        if not rows:
            return
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in rows:
            self.lines.append(f"{name}{suffix}{_labels(labels)} {_value(value)}")


def render_prometheus(s: HealthSnapshot) -> str:
    """``GET /metrics``: the Prometheus text exposition format, version 0.0.4."""
    x = _Exposition()
    p = "edgefleet_agent_"
    x.family(
        p + "info",
        "gauge",
        "The agent's identity (always 1).",
        [("", {"version": s.agent_version, "device_id": s.device_id, "profile": s.profile}, 1)],
    )
    x.family(
        p + "up", "gauge", "1 when no problem is listed on the health page.", [("", {}, int(s.ok))]
    )
    x.family(
        p + "uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
        [("", {}, s.uptime_seconds)],
    )
    if s.model:
        m = s.model
        labels = {"name": m.name, "slot": m.slot, "runtime": m.runtime, "format": m.format}
        x.family(
            p + "model_version", "gauge", "Version of the active model.", [("", labels, m.version)]
        )
    x.family(
        p + "broker_connected",
        "gauge",
        "1 while connected to the MQTT broker.",
        [("", {}, int(s.broker_connected))],
    )
    x.family(
        p + "outbox_depth", "gauge", "Reports waiting in the outbox.", [("", {}, s.outbox_depth)]
    )
    x.family(
        p + "outbox_oldest_age_seconds",
        "gauge",
        "Age of the oldest unsent report (0 when the outbox is empty).",
        [("", {}, s.outbox_oldest_age_seconds or 0.0)],
    )
    inf = s.inference
    x.family(p + "inference_requests_total", "counter", "Batches served.", [("", {}, inf.requests)])
    x.family(p + "inference_rows_total", "counter", "Rows served.", [("", {}, inf.rows)])
    x.family(
        p + "inference_rejected_total",
        "counter",
        "Batches refused for bad input.",
        [("", {}, inf.rejected)],
    )
    x.family(
        p + "inference_errors_total",
        "counter",
        "Batches the runtime failed on.",
        [("", {}, inf.errors)],
    )
    x.family(
        p + "inference_latency_seconds",
        "histogram",
        "Predict latency in the agent (validation, runtime, drift feed).",
        [("_bucket", {"le": _value(le)}, c) for le, c in inf.latency_buckets]
        + [
            ("_bucket", {"le": "+Inf"}, inf.latency_count),
            ("_sum", {}, inf.latency_seconds_total),
            ("_count", {}, inf.latency_count),
        ],
    )
    x.family(
        p + "inference_latency_recent_seconds",
        "gauge",
        "Latency quantiles over the active model's recent requests.",
        [
            ("", {"quantile": q}, v / 1000.0)
            for q, v in (("0.5", inf.p50_ms), ("0.95", inf.p95_ms), ("0.99", inf.p99_ms))
            if v is not None
        ],
    )
    if s.drift:
        d = s.drift
        x.family(
            p + "drift_dataset_drifted",
            "gauge",
            "1 if the last window drifted.",
            [("", {}, int(d.drifted))],
        )
        x.family(
            p + "drift_window_rows", "gauge", "Rows in the last drift window.", [("", {}, d.rows)]
        )
        x.family(
            p + "drift_feature_drifted",
            "gauge",
            "1 if the feature drifted in the last window.",
            [("", {"feature": f.name}, int(f.drifted)) for f in d.features],
        )
        for stat in ("psi", "js", "ks"):
            x.family(
                p + f"drift_{stat}",
                "gauge",
                f"{stat.upper()} of the feature in the last window.",
                [
                    ("", {"feature": f.name}, v)
                    for f in d.features
                    if (v := getattr(f, stat)) is not None
                ],
            )
    if s.update:
        x.family(
            p + "update_state",
            "gauge",
            "The update state machine's current state (always 1).",
            [("", {"state": s.update.state, "result": s.update.result}, 1)],
        )
    sysf = s.system
    for name, help_text, v in (
        ("memory_rss_bytes", "Resident memory of the agent process.", sysf.rss_bytes),
        ("memory_available_bytes", "Memory available on the device.", sysf.memory_available_bytes),
        ("memory_total_bytes", "Memory of the device.", sysf.memory_total_bytes),
        ("disk_free_bytes", "Free space on the state directory's disk.", sysf.disk_free_bytes),
        ("disk_total_bytes", "Size of the state directory's disk.", sysf.disk_total_bytes),
        ("cpu_percent", "CPU use of the agent process.", sysf.cpu_percent),
    ):
        x.family(p + name, "gauge", help_text, [("", {}, v)])
    return "\n".join(x.lines) + "\n"
