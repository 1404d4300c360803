"""``fleet models``: build the sample model bundles and check a bundle directory.

``fleet models build [--out DIR] [--version N]`` runs the deterministic recipe
(:mod:`models.build`) for one or every version; ``fleet models check BUNDLE_DIR`` verifies every
file's hash against ``bundle.json`` and replays each artifact's golden set through the agent's
runtime layer (``agent.runtimes``, which also holds the model's signature to the bundle's),
prints a table, and exits 1 saying what failed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from protocol.bundle import BundleMetadata
from protocol.cli import CommandError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("models", help="build and check model bundles")
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    build = sub.add_parser(
        "build",
        help="build the sample model bundles (byte-identical on every run)",
        description="Train, export (fp32 ONNX, int8 ONNX, int8 TFLite), profile and write "
        "bundles as DIR/pdm-classifier/<version>/.",
    )
    build.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="bundle root (default: models/bundles in the source tree)",
    )
    build.add_argument(
        "--version", type=int, default=None, metavar="N", help="build only this version"
    )
    build.set_defaults(handler=_build)

    check = sub.add_parser(
        "check",
        help="verify a bundle's file hashes and replay its golden sets",
        description="Exit 0 when every file matches bundle.json and every artifact reproduces "
        "its golden outputs; exit 1 saying what failed.",
    )
    check.add_argument("bundle_dir", type=Path, metavar="BUNDLE_DIR")
    check.set_defaults(handler=_check)


def _build(args: argparse.Namespace) -> int:
    from models import build

    root: Path = args.out if args.out is not None else build.default_root()
    versions = sorted(build.RECIPES) if args.version is None else [args.version]
    for v in versions:
        if v not in build.RECIPES:
            raise CommandError(f"no recipe for version {v}; choose one of {sorted(build.RECIPES)}")
    for v in versions:
        result = build.build(v, root)
        meta = result.metadata
        print(f"{meta.name} v{meta.version} -> {result.directory} ({result.seconds:.1f} s)")
        accuracy = meta.metrics.get("accuracy_heldout", {})
        for art in meta.artifacts:
            acc = accuracy.get(art.file)
            acc_text = "" if acc is None else f"  held-out accuracy {acc:.4f}"
            print(f"  {art.file:<20} {art.length:>7} bytes{acc_text}")
    return 0


def _agent_runner(runtime: str, path: Path, inputs: np.ndarray, meta: BundleMetadata) -> np.ndarray:
    """Replay through the agent's runtime layer, as a device would (signature checked)."""
    from agent.runtimes import load_runtime

    rt = load_runtime(path, runtime, 1, expect_input=meta.input, expect_output=meta.output)
    try:
        return rt.predict(inputs)
    finally:
        rt.close()


def _check(args: argparse.Namespace) -> int:
    from models.check import check_bundle

    directory: Path = args.bundle_dir
    if not directory.is_dir():
        raise CommandError(f"{directory} is not a directory; pass a bundle directory")
    report = check_bundle(directory, runner=_agent_runner)
    meta = report.metadata
    title = f"{meta.name} v{meta.version}" if meta else "bundle"
    print(f"{title} in {directory}: {report.files_checked} files listed")
    if report.artifacts:
        header = ("artifact", "runtime", "quant", "rows", "max_abs_err", "agreement", "result")
        rows = [header] + [
            (
                a.file,
                a.runtime,
                a.quantization,
                str(a.rows),
                "-" if math.isinf(a.max_abs_error) else f"{a.max_abs_error:.6f}",
                f"{a.agreement:.3f}",
                "ok" if a.passed else "FAIL",
            )
            for a in report.artifacts
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    failures = list(report.problems) + [
        f"{a.file}: {a.reason}" for a in report.artifacts if not a.passed
    ]
    if failures:
        for line in failures:
            print(f"FAIL {line}", file=sys.stderr)
        return 1
    print("ok: every file matches bundle.json and every artifact reproduces its golden set")
    return 0
