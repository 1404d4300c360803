"""A Python client for local applications that call the agent's predict API.

    from agent.client import AgentClient

    client = AgentClient("http://127.0.0.1:8471")
    prediction = client.predict([[0.1, 0.2, ...], ...])
    prediction.classes, prediction.outputs, prediction.model_version

Standard library only (``http.client``), one persistent connection per client (reopened
transparently when the agent closed it); not thread-safe, use one client per thread. Every
refusal raises :class:`AgentClientError` carrying the HTTP status and the agent's own message.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8471"


class AgentClientError(Exception):
    """The agent refused the request or could not be reached (``status`` 0)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}" if status else message)


@dataclass(frozen=True)
class Prediction:
    outputs: list[list[float]]  # one row of model outputs per input row
    classes: list[str]  # argmax class name per row
    model_name: str
    model_version: int


class AgentClient:
    def __init__(self, base_url: str = DEFAULT_URL, timeout: float = 10.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"base_url {base_url!r}: use http://HOST:PORT (e.g. {DEFAULT_URL})")
        self.base_url = base_url.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def predict(self, rows: Sequence[Sequence[float]] | Any) -> Prediction:
        """Predict a batch: ``rows`` is a list of feature rows (or a 2-D numpy array)."""
        if hasattr(rows, "tolist"):
            rows = rows.tolist()
        doc = self._request("POST", "/v1/predict", {"inputs": rows})
        return Prediction(
            outputs=doc["outputs"],
            classes=doc["classes"],
            model_name=doc["model"]["name"],
            model_version=int(doc["model"]["version"]),
        )

    def model(self) -> dict[str, Any]:
        """The active model's name, version, slot, runtime, feature and class names."""
        result: dict[str, Any] = self._request("GET", "/v1/model", None)
        return result

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, doc: Any) -> Any:
        body = None
        if doc is not None:
            # NaN/Infinity are sent as JSON's common extension so the agent's policy decides
            body = json.dumps(doc, allow_nan=True).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port, self._timeout)
            try:
                self._conn.request(method, path, body=body, headers=headers)
                response = self._conn.getresponse()
                data = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()  # the agent closed an idle keep-alive connection: reconnect once
                if attempt == 2:
                    raise AgentClientError(
                        0, f"the agent at {self.base_url} closed the connection; is it running?"
                    ) from None
            except OSError as exc:
                self.close()
                raise AgentClientError(
                    0,
                    f"cannot reach the agent at {self.base_url} ({exc}); check that `edge-agent "
                    "run` is running and the URL matches http.predict_listen",
                ) from None
        try:
            payload = json.loads(data) if data else {}
        except ValueError:
            payload = {"error": data[:200].decode(errors="replace")}
        if response.status != 200:
            message = payload.get("error") if isinstance(payload, dict) else None
            raise AgentClientError(response.status, str(message or response.reason))
        return payload
