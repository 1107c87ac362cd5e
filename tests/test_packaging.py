"""What setup.cfg declares: ranges that admit the versions the suite runs with (constraints.txt) and
no release known to break a path gqaru ships."""

from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from setuptools.config.setupcfg import read_configuration

REPO_ROOT = Path(__file__).resolve().parents[1]

KNOWN_BROKEN_BEFORE = {
    "deepspeed": (Version("0.19.3"), "ZeRO-3 with activation checkpointing and frozen parameters crashes before 0.19.3"),
}


def _requirements() -> dict[str, Requirement]:
    lines = read_configuration(REPO_ROOT / "setup.cfg")["options"]["install_requires"]
    return {canonicalize_name(requirement.name): requirement for requirement in map(Requirement, lines)}


def _tested_versions() -> dict[str, Version]:
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _floor(requirement: Requirement) -> Version:
    floors = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==")]
    assert floors, f"{requirement} declares no floor"
    return max(floors)


def test_declared_ranges_admit_the_tested_versions() -> None:
    tested = _tested_versions()
    for name, requirement in _requirements().items():
        if name in tested:
            assert requirement.specifier.contains(tested[name]), f"{requirement} excludes the tested {name}=={tested[name]}"


def test_no_floor_admits_a_known_broken_release() -> None:
    requirements, tested = _requirements(), _tested_versions()
    for name, (first_good, why) in KNOWN_BROKEN_BEFORE.items():
        assert _floor(requirements[name]) >= first_good, f"{requirements[name]} admits broken releases: {why}"
    # DeepSpeed's floor is the release the suite passes with: its ZeRO paths change between patches.
    assert _floor(requirements["deepspeed"]) == tested["deepspeed"]
