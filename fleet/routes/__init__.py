"""The HTTP API, one module per area, discovered: adding an area never edits the app.

Each module exposes ``router`` (a ``fastapi.APIRouter``) and may expose ``lifespan``, an async
context manager factory ``lifespan(app) -> AsyncContextManager[None]`` for components that live
as long as the app (an MQTT subscriber, a scheduler). :func:`fleet.app.create_app` includes every
router and enters every lifespan, in module-name order.

Routes parse the request, call a service and shape the response; rules live in the services.
Every route but the public ones declares ``Viewer``, ``Operator``, ``Admin`` or ``DeviceAuth``
(:mod:`fleet.auth`); mutating routes need at least ``Operator``.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def discover() -> list[ModuleType]:
    """The route modules of this package, sorted by name."""
    modules = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "router"):
            modules.append(module)
    return modules
