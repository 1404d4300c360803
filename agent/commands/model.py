"""``edge-agent model check``: load a model file in this device's runtime, show its signature,
and replay a golden set through it.

It loads through :mod:`agent.runtimes`, the same path the agent serves from, so a pass here means
this device can serve the file. Checking a whole bundle's hashes is ``fleet models check``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.runtimes import RUNTIMES, load_runtime, runtime_for_path
from protocol.bundle import TensorSpec
from protocol.cli import CommandError, command_group
from protocol.golden import GoldenResult, GoldenSet, check_golden


def register(subparsers: Any) -> None:
    sub = command_group(subparsers, "model", "install, show and check models")
    check = sub.add_parser(
        "check",
        help="load a model, print its signature, replay a golden set",
        description="Load PATH in its runtime and print the input/output signature; with "
        "--golden, run the golden inputs and compare the outputs. Exit 0 when everything "
        "passes, 1 when the golden set fails, 2 when the model cannot be loaded.",
    )
    check.add_argument("path", type=Path, metavar="PATH", help="model file (.onnx or .tflite)")
    check.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="runtime to load it with (default: from the extension, .onnx or .tflite)",
    )
    check.add_argument("--threads", type=int, default=1, metavar="N", help="inference threads")
    check.add_argument("--golden", type=Path, metavar="FILE", help="golden set to replay")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(handler=check_model)


def check_model(args: argparse.Namespace) -> int:
    golden = _read_golden(args.golden) if args.golden is not None else None
    try:
        runtime = args.runtime or runtime_for_path(args.path)
        rt = load_runtime(args.path, runtime, args.threads)
    except AgentError as exc:
        raise CommandError(str(exc)) from exc
    try:
        result = None
        if golden is not None:
            if golden.n_features != rt.input.shape[1]:
                raise CommandError(
                    f"{args.golden}: golden inputs have {golden.n_features} features but "
                    f"{args.path} takes {rt.input.shape[1]}; use the golden set of this artifact"
                )
            try:
                outputs = rt.predict(golden.inputs)
            except AgentError as exc:
                raise CommandError(str(exc)) from exc
            result = check_golden(golden, outputs)
    finally:
        rt.close()
    if args.json:
        doc = {
            "path": str(args.path),
            "runtime": runtime,
            "threads": args.threads,
            "input": rt.input.to_dict(),
            "output": rt.output.to_dict(),
            "golden": None
            if result is None or golden is None
            else _golden_dict(args.golden, golden, result),
        }
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(f"{'model':<8} {args.path}")
        print(f"{'runtime':<8} {runtime}, {args.threads} thread{'s' if args.threads > 1 else ''}")
        print(f"{'input':<8} {_spec(rt.input)}")
        print(f"{'output':<8} {_spec(rt.output)}")
        if result is not None and golden is not None:
            verdict = "pass" if result.passed else f"FAIL: {result.reason}"
            print(
                f"{'golden':<8} {args.golden}: {golden.n} rows, max |diff| "
                f"{result.max_abs_error:.3g} (atol {golden.atol:g}), class agreement "
                f"{result.agreement:.1%} (needs {golden.min_agreement:.0%}) — {verdict}"
            )
    return 0 if result is None or result.passed else 1


def _read_golden(path: Path) -> GoldenSet:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CommandError(f"{path}: cannot read the golden set ({exc.strerror})") from exc
    try:
        return GoldenSet.from_json(data)
    except ValueError as exc:
        raise CommandError(f"{path}: {exc}") from exc


def _golden_dict(path: Path, golden: GoldenSet, result: GoldenResult) -> dict[str, Any]:
    return {
        "file": str(path),
        "rows": golden.n,
        "atol": golden.atol,
        "min_agreement": golden.min_agreement,
        "passed": result.passed,
        # inf (outputs not comparable) is not JSON; the reason says why
        "max_abs_error": result.max_abs_error if math.isfinite(result.max_abs_error) else None,
        "agreement": result.agreement,
        "reason": result.reason,
    }


def _spec(spec: TensorSpec) -> str:
    dims = ", ".join("?" if d is None else str(d) for d in spec.shape)
    return f"{spec.name} {spec.dtype} ({dims})"
