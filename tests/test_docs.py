"""The documentation's generated parts and the tutorial notebook, without building the site.

The site itself is built (and the notebook executed) by ``mkdocs build --strict`` in ``.ci/run``;
these tests need only the test extra.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from jax_mnist.config import PRESETS, Config, flag_name

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flag_table_has_a_row_per_config_field(hooks):
    table = hooks.config_flags()
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    assert len(rows) == len(dataclasses.fields(Config))
    for field in dataclasses.fields(Config):
        assert f"| `{flag_name(field.name)}`" in table, field.name
        assert f"`{field.name}`" in table


def test_presets_table_has_every_preset(hooks):
    table = hooks.presets()
    for name in PRESETS:
        assert f"| `{name}` |" in table


def test_openapi_endpoints_come_from_the_app(hooks):
    pytest.importorskip("fastapi")
    schema = hooks.openapi_schema()
    assert schema["openapi"].startswith("3.")
    table = hooks.openapi_endpoints()
    for path, operations in schema["paths"].items():
        for method in operations:
            assert f"| `{method.upper()}` | `{path}` |" in table
    assert "/api/predict" in schema["paths"]


def test_tutorial_is_committed_without_outputs():
    # The site shows the outputs of the build's own run; committed outputs would go stale.
    notebook = json.loads((DOCS / "tutorial.ipynb").read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_included_sections_go_one_level_down(hooks):
    text = "# Title\n\ntext\n\n## Section\n\n```bash\n# a comment, not a heading\n```\n"
    assert (
        hooks._demoted(text) == "## Title\n\ntext\n\n### Section\n\n```bash\n# a comment, not a heading\n```"
    )
