"""The summary of a study: the ranked table, ``best.toml``, and ``report.html`` with its figures.

A search for accuracy alone ranks trials by validation accuracy. A search with a cost target
(``--cost-target``) ranks the trials that reached the target by their training cost to reach
it, cheapest first, then the others by accuracy, and draws the Pareto front of accuracy
against cost.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jax_mnist.config import Config
from jax_mnist.plots import new_figure, save_figure
from jax_mnist.tune.space import Param, format_params, short_value
from jax_mnist.tune.storage import import_optuna, redact
from jax_mnist.tune.study import TuneSettings, open_study

HISTORY, IMPORTANCES, TOP_CURVES, PARETO, PAGE = (
    "history.png",
    "importances.png",
    "top_curves.png",
    "pareto.png",
    "report.html",
)
TOP = 5  # trials whose validation curves are drawn


def trial_rows(study) -> list[dict[str, Any]]:
    """One row per trial, best first.

    Each row: ``number``, ``state``, ``val_accuracy`` (pruned trials: their best report),
    ``cost_gflop`` (training GFLOPs to first reach the cost target, or of the whole trial when
    it never did; None without a target), ``reached`` (whether it did; None without a target),
    ``pareto`` (not dominated in accuracy and cost by another complete trial), ``epochs``,
    ``params``, ``workdir``, ``curve`` (validation accuracy at each evaluation), ``seconds``.
    """
    rows = []
    for t in study.get_trials(deepcopy=False):
        curve = t.user_attrs.get("curve")  # multi-objective trials record their own curve
        curve = (
            [acc for _, acc in curve]
            if curve
            else [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        )
        values = t.values or []
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "val_accuracy": values[0] if values else (max(curve) if curve else None),
                "cost_gflop": values[1] if len(values) > 1 else None,
                "reached": t.user_attrs.get("reached"),
                "pareto": False,
                "epochs": len(curve),
                "params": dict(t.params),
                "workdir": t.user_attrs.get("workdir"),
                "curve": curve,
                "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start
                else None,
            }
        )
    costed = [r for r in rows if r["state"] == "complete" and r["cost_gflop"] is not None]
    for r in costed:
        r["pareto"] = not any(_dominates(o, r) for o in costed)
    order = {"complete": 0, "pruned": 1}

    def rank(r):
        if r["reached"]:  # reached the target: the cheapest first
            return (0, 0, r["cost_gflop"], -r["val_accuracy"], r["number"])
        return (1, order.get(r["state"], 2), 0.0, -(r["val_accuracy"] or 0.0), r["number"])

    rows.sort(key=rank)
    return rows


def _dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether trial ``a`` is at least as accurate and as cheap as ``b``, and better in one."""
    at_least = a["val_accuracy"] >= b["val_accuracy"] and a["cost_gflop"] <= b["cost_gflop"]
    return at_least and (a["val_accuracy"] > b["val_accuracy"] or a["cost_gflop"] < b["cost_gflop"])


def table_cells(rows: list[dict[str, Any]], space: tuple[Param, ...]) -> list[list[str]]:
    """The ranked table as text cells, header first; with a cost column when there is a target."""
    names = [p.name for p in space]
    costed = any(r["cost_gflop"] is not None for r in rows)
    header = [
        "rank",
        "trial",
        "state",
        "val acc",
        *(["GFLOP to target", "pareto"] if costed else []),
        "evals",  # validation evaluations: one per epoch, a last part-epoch counting as one
    ]
    lines = [header + names]
    for rank, r in enumerate(rows, 1):
        acc = "-" if r["val_accuracy"] is None else f"{100 * r['val_accuracy']:.2f}%"
        cost = []
        if costed:
            # A trial that never reached the target shows what it spent without reaching it.
            spent = "-" if r["cost_gflop"] is None else gflop(r["cost_gflop"])
            cost = [spent if r["reached"] or spent == "-" else f"not in {spent}", "*" if r["pareto"] else ""]
        lines.append(
            [str(rank), str(r["number"]), r["state"], acc, *cost, str(r["epochs"])]
            + [short_value(r["params"].get(n)) for n in names]
        )
    return lines


def format_table(rows: list[dict[str, Any]], space: tuple[Param, ...]) -> str:
    lines = table_cells(rows, space)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def toml_text(config: Config, header: str = "") -> str:
    """``config`` as a TOML file that ``jax-mnist train --config`` reads back to the same config.

    Unset (None) settings are left out: the preset's None is what they read back as.
    """
    lines = [f"# {line}" for line in header.splitlines()]
    for key, value in config.to_dict().items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)  # a JSON string is a TOML basic string
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def gflop(value: float) -> str:
    """GFLOPs as a table shows them: whole numbers with separators, 3 digits below 100."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _describe_best(best: dict[str, Any], target: float | None) -> str:
    text = f"validation accuracy {100 * best['val_accuracy']:.2f}%"
    if target is not None:
        how = "to first reach" if best["reached"] else "without reaching"
        text += f", {gflop(best['cost_gflop'])} GFLOP of training {how} {100 * target:.2f}%"
    return text


def summarize(settings: TuneSettings, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prints the ranked table and writes ``best.toml`` and ``report.html`` (with its PNGs).

    The best trial is the most accurate one; with a cost target, the cheapest to reach it (the
    most accurate when none did).
    """
    study = open_study(settings)
    rows = trial_rows(study)
    log(format_table(rows, settings.space))
    complete = [r for r in rows if r["state"] == "complete"]
    files = []
    best = complete[0] if complete else None
    if best is not None:
        config = settings.base.replace(**best["params"]).validate()
        header = (
            f"Best trial of study {settings.name!r}: trial {best['number']}, "
            f"{_describe_best(best, settings.cost_target)} ({best['workdir']}).\n"
            f"Train it with: jax-mnist train --config {settings.study_dir / 'best.toml'}"
        )
        path = settings.study_dir / "best.toml"
        path.write_text(toml_text(config, header))
        files.append(path)
        log(
            f"best: trial {best['number']}, {_describe_best(best, settings.cost_target)}: "
            f"{format_params(best['params'])}"
        )
    files += write_study_report(settings, study, rows)
    for path in files:
        log(str(path))
    return {"trials": rows, "best": best, "files": [str(p) for p in files]}


def _label_accuracy_axes(ax, xlabel: str) -> None:
    """Validation accuracy (%) against whole numbers of ``xlabel`` (trials or epochs)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_history(rows: list[dict[str, Any]]):
    """Validation accuracy of each trial in order, and the best so far."""
    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    by_number = sorted((r for r in rows if r["val_accuracy"] is not None), key=lambda r: r["number"])
    for state, marker, color in (("complete", "o", "C0"), ("pruned", "x", "C3")):
        points = [(r["number"], 100 * r["val_accuracy"]) for r in by_number if r["state"] == state]
        if points:
            ax.scatter(*zip(*points, strict=True), marker=marker, color=color, label=state)
    best, steps = -math.inf, []
    for r in by_number:
        if r["state"] == "complete":
            best = max(best, 100 * r["val_accuracy"])
        if best > -math.inf:
            steps.append((r["number"], best))
    if steps:
        ax.step(*zip(*steps, strict=True), where="post", color="C1", label="best so far")
    _label_accuracy_axes(ax, "trial")
    return fig


def plot_importances(importances: dict[str, float], objective: str = "validation accuracy"):
    names = list(importances)[::-1]
    fig = new_figure(7, 0.4 * len(names) + 1.2)
    ax = fig.add_subplot()
    ax.barh(names, [importances[n] for n in names], color="C0")
    ax.set_xlabel(f"importance for {objective} (PED-ANOVA, sums to 1)")
    return fig


def plot_top_curves(rows: list[dict[str, Any]]):
    """Validation accuracy at each evaluation (epoch end) of the best trials."""
    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    for r in rows[:TOP]:
        ax.plot(
            range(1, len(r["curve"]) + 1),
            [100 * v for v in r["curve"]],
            marker="o",
            label=f"trial {r['number']}",
        )
    _label_accuracy_axes(ax, "epoch")
    return fig


def plot_pareto(rows: list[dict[str, Any]], target: float):
    """Validation accuracy against training cost of the complete trials, the Pareto front drawn."""
    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    costed = [r for r in rows if r["state"] == "complete" and r["cost_gflop"] is not None]
    for reached, marker, color, label in (
        (True, "o", "C0", f"reached {100 * target:.2f}%: cost to first reach it"),
        (False, "x", "0.5", "never reached it: cost of the whole trial"),
    ):
        points = [(r["cost_gflop"], 100 * r["val_accuracy"]) for r in costed if bool(r["reached"]) == reached]
        if points:
            ax.scatter(*zip(*points, strict=True), marker=marker, color=color, label=label)
    front = sorted((r["cost_gflop"], 100 * r["val_accuracy"]) for r in costed if r["pareto"])
    if front:
        ax.step(*zip(*front, strict=True), where="post", color="C1", label="Pareto front")
    for r in costed:
        ax.annotate(str(r["number"]), (r["cost_gflop"], 100 * r["val_accuracy"]), fontsize=7, alpha=0.7)
    ax.axhline(100 * target, color="C3", linestyle="--", linewidth=1, label="target")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis(FuncFormatter(lambda value, _: gflop(value)))
    ax.set_xlabel("training GFLOP (images trained on x forward FLOPs per image)")
    ax.set_ylabel("best validation accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def write_study_report(settings: TuneSettings, study, rows: list[dict[str, Any]]) -> list[Path]:
    """The figures and the self-contained ``report.html`` of the study."""
    from jax_mnist.report import figure_html, html_page, write_text

    out = settings.study_dir
    figures: list[tuple[Path, str]] = []
    target = settings.cost_target
    if target is not None and any(r["cost_gflop"] is not None for r in rows):
        figures.append(
            (
                save_figure(plot_pareto(rows, target), out / PARETO),
                f"Best validation accuracy against the training cost to first reach {100 * target:.2f}% "
                "(log scale; numbers are trials). On the Pareto front: the trials that no other beats in both accuracy and cost.",
            )
        )
    if any(r["val_accuracy"] is not None for r in rows):
        figures.append(
            (
                save_figure(plot_history(rows), out / HISTORY),
                "Validation accuracy of each trial and the best so far.",
            )
        )
    importances = {}
    if sum(r["state"] == "complete" for r in rows) >= 2:
        with contextlib.suppress(Exception), warnings.catch_warnings():  # too few or alike trials
            # A given target draws PED-ANOVA's reminder that it ranks by low values: it is negated.
            warnings.simplefilter("ignore", UserWarning)
            importances = import_optuna().importance.get_param_importances(
                # PED-ANOVA ranks parameters by how they lead to low values: accuracy negated.
                study,
                target=(lambda t: -t.values[0]) if target is not None else None,
            )
    if importances:
        figures.append(
            (save_figure(plot_importances(importances), out / IMPORTANCES), "Parameter importances.")
        )
    ranked = [r for r in rows if r["curve"] and r["state"] in ("complete", "pruned")]
    if ranked:
        figures.append(
            (
                save_figure(plot_top_curves(ranked), out / TOP_CURVES),
                f"Validation accuracy per epoch of the {min(TOP, len(ranked))} best trials.",
            )
        )
    cells = table_cells(rows, settings.space)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in cells[0])
    body = ""
    for r, line in zip(rows, cells[1:], strict=True):
        line = [html.escape(c) for c in line]
        link = html.escape(Path(r["workdir"]).name) if r["workdir"] else ""
        if link:
            line[1] = f'<a href="{link}/">{line[1]}</a>'
        body += "<tr>" + "".join(f"<td>{c}</td>" for c in line) + "</tr>"
    space = "".join(f"<li>{html.escape(p.describe())}</li>" for p in settings.space)
    scored = f"scored by validation accuracy ({settings.base.val_size} images)"
    if target is not None:
        scored += f" and by the training GFLOPs to first reach {100 * target:.2f}% on it"
    page_body = (
        f"<p>{len(rows)} trials, {scored}; the test set was not read. "
        f"Storage: {html.escape(redact(settings.storage_url))}.</p>"
        f"<h2>Search space</h2><ul>{space}</ul>"
        + "".join(figure_html(path, caption=caption) for path, caption in figures)
        + f"<h2>Trials</h2><table><tr>{head}</tr>{body}</table>"
    )
    page = write_text(out / PAGE, html_page(f"Study {settings.name}", page_body))
    return [path for path, _ in figures] + [page]
