"""``edge-agent model install BUNDLE_DIR`` and ``edge-agent model show``: the factory path.

Installers and factories put a device's first model in place from a bundle directory (see
:mod:`agent.bundle_install`); in the field, updates come signed over the air. ``show`` prints the
two slots and which one is active.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from agent.config import (
    ConfigError,
    StatePaths,
    add_state_dir_argument,
    load_config,
    resolve_state_dir,
)
from agent.errors import AgentError
from agent.machine import probe
from agent.slots import SLOTS, Slots
from firmware_profiles import load_profile, load_profiles
from protocol.cli import CommandError, command_group
from protocol.profiles import FirmwareProfile, select_profile


def register(subparsers: Any) -> None:
    sub = command_group(subparsers, "model", "install, show and check models")
    install = sub.add_parser(
        "install",
        help="install a model bundle directory into the inactive slot and activate it",
        description="The factory path to a device's first model: verify every file of the "
        "bundle against bundle.json, pick the artifact for this device's firmware profile, "
        "install it into the inactive slot, run its golden set, and activate the slot. Field "
        "updates come signed over the air instead. Restart a running agent to serve the new "
        "model.",
    )
    install.add_argument("bundle", type=Path, metavar="BUNDLE_DIR", help="a bundle directory")
    add_state_dir_argument(install)
    install.add_argument(
        "--profile", metavar="NAME", help="firmware profile (default: agent.toml's, or detected)"
    )
    install.add_argument(
        "--allow-downgrade", action="store_true", help="install an older version of the model"
    )
    install.add_argument(
        "--no-activate", action="store_true", help="install and check, but leave it inactive"
    )
    install.set_defaults(handler=run_install)
    show = sub.add_parser("show", help="show the model slots and which one is active")
    add_state_dir_argument(show)
    show.set_defaults(handler=run_show)


def device_profile(state_dir: Path, name: str | None) -> FirmwareProfile:
    """``name`` if given, else the provisioned profile, else the one detected for this machine."""
    if name:
        return load_profile(name)
    if StatePaths(state_dir).config.exists():
        try:
            return load_profile(load_config(state_dir).device.profile)
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
    return select_profile(load_profiles().values(), probe())


def run_install(args: argparse.Namespace) -> int:
    from agent.bundle_install import install_bundle  # the runtimes only when installing

    state_dir = resolve_state_dir(args.state_dir, os.environ)
    profile = device_profile(state_dir, args.profile)
    try:
        result = install_bundle(
            args.bundle,
            Slots(StatePaths(state_dir).slots),
            profile,
            allow_downgrade=args.allow_downgrade,
            activate=not args.no_activate,
        )
    except AgentError as exc:
        raise CommandError(str(exc)) from None
    r = result.installed.release
    if result.unchanged:
        print(
            f"{r.name} v{r.version} ({r.artifact}) is already active in slot "
            f"{result.installed.slot}; nothing changed."
        )
        return 0
    print(
        f"Installed {r.name} v{r.version} ({r.artifact}, {r.runtime}) for profile {profile.name} "
        f"into slot {result.installed.slot}; golden set passed (max error "
        f"{result.golden.max_abs_error:.2g}, agreement {result.golden.agreement:.0%})."
    )
    if result.activated:
        print(
            f"Slot {result.installed.slot} is active. A running agent serves it after a restart "
            "(systemctl restart edge-agent)."
        )
    else:
        print(f"Slot {result.installed.slot} was left inactive (--no-activate).")
    return 0


def run_show(args: argparse.Namespace) -> int:
    slots = Slots(StatePaths(resolve_state_dir(args.state_dir, os.environ)).slots)
    try:
        active = slots.active()
        for slot in SLOTS:
            installed = slots.release(slot)
            mark = "*" if slot == active else " "
            if installed is None:
                print(f"{mark} slot {slot}: empty")
                continue
            r = installed.release
            print(
                f"{mark} slot {slot}: {r.name} v{r.version} ({r.artifact}, {r.runtime}, "
                f"{r.quantization}, profile {r.profile or '?'})"
            )
    except AgentError as exc:
        raise CommandError(str(exc)) from None
    if active is None:
        print("No slot is active: install a model with `edge-agent model install BUNDLE_DIR`.")
    return 0
