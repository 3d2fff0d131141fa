"""Prints pip constraints that pin every dependency of pyproject.toml to its lower bound.

CI installs with these on the oldest Python it tests (``PIP_CONSTRAINT``), so every lower bound
that pyproject.toml states is a version the suite ran on. The build requirements are pinned
too (pip passes PIP_CONSTRAINT on to the isolated build's own pip).
"""

import re
import sys
import tomllib
from pathlib import Path

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")


def lower_bounds(pyproject: Path) -> list[str]:
    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    requirements = list(data["build-system"]["requires"]) + list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    pins = {}
    for requirement in requirements:
        name, _extras, spec, marker = REQUIREMENT.match(requirement).groups()
        if name.lower().replace("_", "-") == project["name"]:
            continue  # the project's own extras
        lowest = re.search(r"(?:>=|==)\s*([^,\s]+)", spec)
        if lowest is None:
            sys.exit(f"{pyproject}: {requirement!r} has no lower bound")
        pins[(name, marker or "")] = f"{name}=={lowest.group(1)}{' ' + marker if marker else ''}"
    return sorted(set(pins.values()), key=str.lower)


if __name__ == "__main__":
    print("\n".join(lower_bounds(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
