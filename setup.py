"""Builds the optional C hot path of the agent's predict (agent/_fastpath.c); everything else
is in pyproject.toml.

The extension needs only a C compiler and Python's headers. Where either is missing (a device
without build tools) the build says so and goes on without it: ``agent.fastpath`` then uses the
pure-Python implementation, which behaves the same, only slower per call.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing when the C extension cannot be compiled."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all (distutils' CCompilerError and kin)
            self._skipped(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # no Python headers, a compiler error
            self._skipped(exc)

    @staticmethod
    def _skipped(exc: Exception) -> None:
        print(
            f"warning: agent._fastpath was not built ({exc}); the agent uses its pure-Python "
            "predict path. Install a C compiler and the Python headers (e.g. `apt-get install "
            "gcc python3-dev`) and reinstall to build it.",
            file=sys.stderr,
        )


setup(
    ext_modules=[
        Extension(
            "agent._fastpath",
            sources=["agent/_fastpath.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
