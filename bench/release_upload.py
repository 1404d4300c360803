"""Release upload benchmark: where the time of ``POST /v1/models`` goes, for one bundle.

For a bundle (default: the committed ``pdm-classifier`` v1) it runs the whole upload path of
:meth:`fleet.registry.ReleaseService.upload` (unpack, validate, sign) ``--rounds`` times, each
into a fresh data directory with fresh keys and TUF repository, and prints the median seconds of
each phase. The baseline, measured in the same run and interleaved with it, is what
``fleet models check`` does on the bundle directory (hashes and golden replay through
:mod:`agent.runtimes`): the upload's extra cost over it is the archive handling, the version
check, the content-addressed copy and the TUF signing. It asserts nothing.

    .venv/bin/python bench/release_upload.py [--bundle DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from a checkout

from fleet.audit import Actor  # noqa: E402
from fleet.bundle_upload import agent_runner, pack  # noqa: E402
from fleet.keys import ONLINE_ROLES, ROOT, init_key_dir  # noqa: E402
from fleet.registry import ReleaseService  # noqa: E402
from fleet.settings import load_settings  # noqa: E402
from fleet.store import connect, migrate  # noqa: E402
from fleet.tuf_repo import TufRepository  # noqa: E402
from models.check import check_bundle  # noqa: E402

DEFAULT_BUNDLE = REPO / "models" / "bundles" / "pdm-classifier" / "1"


def upload_once(archive_bytes: bytes, root: Path) -> tuple[float, float, float, float]:
    settings = load_settings(data_dir=root / "data")
    signers = init_key_dir(settings.keys_dir)
    now = datetime.now(UTC)
    TufRepository(settings.tuf_dir, {r: signers[r] for r in ONLINE_ROLES}).init(signers[ROOT], now)
    archive = root / "bundle.tar.gz"
    archive.write_bytes(archive_bytes)
    db = connect(settings.db_path)
    try:
        migrate(db)
        started = time.perf_counter()
        result = ReleaseService(db, settings).upload(
            archive, root / "work", Actor.cli("bench"), now
        )
        total = time.perf_counter() - started
    finally:
        db.close()
    t = result.timings
    return t.unpack, t.validate, t.sign, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    packed = pack(args.bundle)
    print(f"bundle {args.bundle}: {len(packed)} bytes packed; {args.rounds} rounds")
    phases: dict[str, list[float]] = {"unpack": [], "validate": [], "sign": [], "total": []}
    baseline: list[float] = []
    upload_once(packed, Path(tempfile.mkdtemp()))  # warm-up: imports, runtime libraries
    for i in range(args.rounds):
        order = ("upload", "check") if i % 2 == 0 else ("check", "upload")
        for what in order:
            if what == "check":
                started = time.perf_counter()
                report = check_bundle(args.bundle, runner=agent_runner)
                baseline.append(time.perf_counter() - started)
                assert report.passed
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    figures = upload_once(packed, Path(tmp))
                for name, value in zip(phases, figures, strict=True):
                    phases[name].append(value)
    check = statistics.median(baseline)
    print(f"{'phase':<10} {'median s':>9}")
    for name, values in phases.items():
        print(f"{name:<10} {statistics.median(values):>9.4f}")
    total = statistics.median(phases["total"])
    print(f"{'baseline':<10} {check:>9.4f}  (fleet models check on the directory)")
    print(f"upload total / baseline = {total / check:.2f}")


if __name__ == "__main__":
    main()
