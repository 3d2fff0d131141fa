"""MkDocs hooks: the parts of the docs that are generated from the code at build time.

A page asks for a generated block with a marker on a line of its own:

- ``<!-- generated: config-flags -->``: every field of :class:`jax_mnist.config.Config` as a
  ``jax-mnist train`` flag, grouped as ``--help`` groups them, with its default, its allowed
  values and its help text, all read from the dataclass and its field metadata.
- ``<!-- generated: models -->``: every model of ``jax_mnist.models.MODELS`` with its parameters
  and forward FLOPs per image, as ``jax-mnist models`` counts them.
- ``<!-- generated: presets -->``: every preset of ``jax_mnist.config.PRESETS``, its docstring
  and the settings it changes from the defaults.
- ``<!-- include: page.md -->``: another file of ``docs/`` (kept out of the nav by
  ``exclude_docs``), its headings one level down, so a section another person keeps in a file
  of its own reads as a section of the page; a missing file fails the build.
- ``<!-- generated: openapi-endpoints -->`` and ``<!-- generated: openapi-json -->``: the
  HTTP API's routes and its OpenAPI schema, from ``create_app(...).openapi()``.

The OpenAPI schema comes from the real FastAPI app, built around a model that only names its
ten classes: the schema depends on the routes and on the number of classes (``?top=`` goes up
to it), never on the weights, and the model is never called, so nothing is trained or restored
and the build stays offline and fast. The schema is also published as ``openapi.json`` at the
site's root. An unknown marker fails the build.

Links from the tutorial notebook to pages (``training.md``) work in Jupyter and on GitHub as
they are; :func:`on_page_content` turns them into the site's URLs, and a link to a page that
does not exist fails the build (MkDocs checks the links of Markdown pages only). ``tests/test_docs.py`` checks the generators
without MkDocs (it is imported only when the hooks run).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import posixpath
import re
from typing import Any

MARKER = re.compile(r"^( *)<!-- generated: ([a-z-]+) -->$", re.MULTILINE)
INCLUDE = re.compile(r"^<!-- include: ([\w./-]+\.md) -->$", re.MULTILINE)
NOTEBOOK_LINK = re.compile(r'href="([^":#]+\.md)(#[^"]*)?"')
FLAG = re.compile(r"(?<![`\w-])(--[a-z][a-z0-9-]*)")


# -- config flags


def _cell(text: str) -> str:
    """Text for a table cell: one line, pipes escaped, flags (``--seed``) as code."""
    return FLAG.sub(r"`\1`", str(text).replace("|", "\\|").replace("\n", " "))


def _value(value: Any) -> str:
    """A setting's value as a user types it: ``5.0`` -> ``5``, ``0.0005`` stays."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _default(field: dataclasses.Field) -> str:
    value = field.default
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{_value(value)}`"


def _values(field: dataclasses.Field, kind: type) -> str:
    meta = field.metadata
    if meta["choices"]:
        return ", ".join(f"`{c}`" for c in meta["choices"])
    if kind is bool:
        return "on / off"
    low, high = meta["min"], meta["max"]
    low_text = None if low is None else (f"> {low}" if meta["min_exclusive"] else f"≥ {low}")
    if low is not None and high is not None and not meta["min_exclusive"]:
        return f"{kind.__name__}, {low} to {high}"
    parts = [p for p in (low_text, None if high is None else f"≤ {high}") if p]
    return f"{kind.__name__}" + (", " + ", ".join(parts) if parts else "")


def config_flags() -> str:
    from jax_mnist.config import Config, field_type, flag_name

    groups: dict[str, list[str]] = {}
    for field in dataclasses.fields(Config):
        kind = field_type(field.name)
        flag = flag_name(field.name)
        name = f"`{flag}` / `--no-{flag[2:]}`" if kind is bool else f"`{flag}`"
        row = (
            f"| {name} | `{field.name}` | {_default(field)} | {_values(field, kind)} "
            f"| {_cell(field.metadata['help'])} |"
        )
        groups.setdefault(field.metadata["group"], []).append(row)
    out = []
    for group, rows in groups.items():
        out += [
            f"### {group.capitalize()}",
            "",
            "| flag | config file key | default | values | what it sets |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    return "\n".join(out)


# -- models


def models() -> str:
    """What ``jax-mnist models`` prints, as a table: shapes only, nothing is initialized."""
    from jax_mnist.models import MODELS, abstract_model, count_params, flops_per_image

    out = ["| model | parameters | MFLOP/image (forward) | what |", "|---|---:|---:|---|"]
    for name, entry in MODELS.items():
        model = abstract_model(name)
        out.append(
            f"| `{name}` | {count_params(model):,} | {flops_per_image(model) / 1e6:.2f} | {_cell(entry.description)} |"
        )
    return "\n".join(out) + "\n"


# -- presets


def presets() -> str:
    from jax_mnist.config import PRESETS, Config, flag_name

    defaults = Config()
    out = ["| preset | what it is for | what it sets (the rest are the defaults) |", "|---|---|---|"]
    for name, make in PRESETS.items():
        config = make()
        changed = [
            f"`{flag_name(f.name)} {_value(getattr(config, f.name))}`"
            for f in dataclasses.fields(Config)
            if f.name != "preset" and getattr(config, f.name) != getattr(defaults, f.name)
        ]
        doc = (make.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        out.append(f"| `{name}` | {_cell(doc)} | {', '.join(changed) or 'nothing: the defaults'} |")
    return "\n".join(out) + "\n"


# -- the HTTP API


class _SchemaOnlyModel:
    """What ``create_app`` needs to describe its routes: ten class names. Never called."""

    class_names = tuple(str(i) for i in range(10))

    def predict_logits(self, images):
        raise RuntimeError("the documentation's app serves no predictions")

    def describe(self) -> dict[str, Any]:
        return {}


@functools.cache
def openapi_schema() -> dict[str, Any]:
    from jax_mnist.serve.app import create_app

    return create_app(_SchemaOnlyModel()).openapi()


def openapi_endpoints() -> str:
    schema = openapi_schema()
    out = ["| method | path | what | answers |", "|---|---|---|---|"]
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            answers = ", ".join(sorted(op.get("responses", {})))
            out.append(f"| `{method.upper()}` | `{path}` | {_cell(op.get('summary', ''))} | {answers} |")
    return "\n".join(out) + "\n"


def openapi_json() -> str:
    return "```json\n" + json.dumps(openapi_schema(), indent=2) + "\n```\n"


GENERATORS = {
    "config-flags": config_flags,
    "models": models,
    "presets": presets,
    "openapi-endpoints": openapi_endpoints,
    "openapi-json": openapi_json,
}


def _demoted(markdown: str) -> str:
    """``markdown`` with every heading one level down (``#`` -> ``##``), code blocks untouched."""
    out, fence = [], None
    for line in markdown.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("```", "~~~")):
            marker = stripped[:3]
            fence = None if fence == marker else (fence or marker)
        elif fence is None and re.match(r"#{1,5} ", line):
            line = "#" + line
        out.append(line)
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    from pathlib import Path

    from mkdocs.exceptions import PluginError

    def include(match: re.Match) -> str:
        path = Path(config["docs_dir"]) / match.group(1)
        if not path.is_file():
            raise PluginError(f"{page.file.src_path}: the included file {match.group(1)} is not in docs/")
        return _demoted(path.read_text(encoding="utf-8"))

    markdown = INCLUDE.sub(include, markdown)

    def replace(match: re.Match) -> str:
        indent, name = match.groups()
        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_path}: unknown generated block {name!r}")
        return "\n".join(indent + line if line else line for line in GENERATORS[name]().splitlines())

    return MARKER.sub(replace, markdown)


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(
        File.generated(config, "openapi.json", content=json.dumps(openapi_schema(), indent=2) + "\n")
    )
    return files


def on_page_content(html: str, page, config, files) -> str:
    if not page.file.src_path.endswith(".ipynb"):
        return html
    from mkdocs.exceptions import PluginError

    def link(match: re.Match) -> str:
        path, anchor = match.group(1), match.group(2) or ""
        target = files.get_file_from_path(
            posixpath.normpath(posixpath.join(posixpath.dirname(page.file.src_path), path))
        )
        if target is None:
            raise PluginError(f"{page.file.src_path}: a link to {path}, which is not a page of the site")
        return f'href="{target.url_relative_to(page.file)}{anchor}"'

    return NOTEBOOK_LINK.sub(link, html)
