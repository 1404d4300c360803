#!/usr/bin/env python3
"""Build the sample model bundles into models/bundles (or --out DIR); same as `fleet models build`.

Usage: .venv/bin/python scripts/build_models.py [--out DIR] [--version N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["models", "build", *sys.argv[1:]]))
