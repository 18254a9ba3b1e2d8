"""Figures from traces and bench reports (matplotlib Figure objects, PNG files; no backend is selected).

* ``weights.png``: the Hedge weight of each model over the rounds (mean over
  requests, with the 10-90 percentile band when there are several requests);
* ``wins.png``: the share of rounds each model's segment won;
* ``bench_tokens_per_s.png``: tokens/s of every system per configuration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from specem_fast.errors import SpecEMError
from specem_fast.measure.trace import iter_requests, read_trace

__all__ = ["plot_trace", "plot_bench", "plot_file"]


class _Figures:
    """The two pyplot calls we use, without pyplot.

    A bare ``matplotlib.figure.Figure`` saves itself to PNG with no backend
    selected, so the library never touches the host application's matplotlib
    backend (nor pyplot's global figure list).
    """

    def __init__(self, figure_cls):
        self._figure = figure_cls

    def subplots(self, figsize, dpi):
        fig = self._figure(figsize=figsize, dpi=dpi)
        return fig, fig.subplots()

    def close(self, fig) -> None:
        fig.clear()


def _pyplot() -> _Figures:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SpecEMError("plotting needs matplotlib: pip install 'specem-fast[plot]'") from None
    return _Figures(Figure)


def _percentile(sorted_vals: list[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _trace_models(records: list[dict[str, Any]]) -> list[str]:
    """Models in first-seen order, so colours stay the same across figures."""
    models: list[str] = []
    for rec in records:
        for m in list(rec.get("weights", {})) + [rec.get("winner_model")]:
            if m and m not in models:
                models.append(m)
    return models


def _save(plt: _Figures, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _weights_per_round(groups: dict, model: str, n_rounds: int) -> list[list[float]]:
    """One model's weight in every request, bucketed by round (round t -> index t-1)."""
    per_round: list[list[float]] = [[] for _ in range(n_rounds)]
    for recs in groups.values():
        for r in recs:
            w = r.get("weights", {}).get(model)
            if w is not None:
                per_round[int(r["round"]) - 1].append(float(w))
    return per_round


def _plot_weights(plt: _Figures, records: list[dict[str, Any]], groups: dict, models: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    max_round = max(int(r["round"]) for r in records)
    xs = list(range(1, max_round + 1))
    for m in models:
        per_round = _weights_per_round(groups, m, max_round)
        pts = [(x, sorted(v)) for x, v in zip(xs, per_round) if v]
        if not pts:
            continue
        x = [p[0] for p in pts]
        y = [sum(v) / len(v) for _, v in pts]
        (line,) = ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=m)
        if len(groups) > 1:
            ax.fill_between(
                x,
                [_percentile(v, 0.1) for _, v in pts],
                [_percentile(v, 0.9) for _, v in pts],
                color=line.get_color(),
                alpha=0.15,
            )
    n_req = len(groups)
    ax.set_title("Hedge weight of each model per round" + (f" (mean of {n_req} requests, 10-90% band)" if n_req > 1 else ""))
    ax.set_xlabel("round t")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("weight w_i (sums to 1)")
    if models:
        # weights start uniform; the zoomed axis shows how far Hedge moved them
        ax.axhline(1.0 / len(models), color="grey", linestyle="--", linewidth=1, label=f"uniform 1/K = {1 / len(models):.3f}")
    ax.margins(y=0.15)
    ax.grid(True, alpha=0.3)
    ax.legend(title="model", loc="best", fontsize="small")
    return _save(plt, fig, path)


def _plot_wins(plt: _Figures, records: list[dict[str, Any]], models: list[str], n_req: int, path: Path) -> Path:
    wins = {m: 0 for m in models}
    for r in records:
        wins[r["winner_model"]] = wins.get(r["winner_model"], 0) + 1
    total = sum(wins.values())
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    names = list(wins)
    shares = [100.0 * wins[m] / total for m in names]
    colors = [f"C{i}" for i in range(len(names))]
    bars = ax.bar(names, shares, color=colors, label=[f"{m} ({wins[m]} rounds)" for m in names])
    for b, s in zip(bars, shares):
        ax.annotate(f"{s:.0f}%", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=9)
    ax.set_title(f"Share of rounds won by each model's segment ({total} rounds, {n_req} requests)")
    ax.set_xlabel("model")
    ax.set_ylabel("rounds won (%)")
    ax.set_ylim(0, max(shares + [1.0]) * 1.15)
    ax.legend(title="winner", fontsize="small")
    ax.tick_params(axis="x", labelrotation=15)
    return _save(plt, fig, path)


def plot_trace(trace_path: str | os.PathLike, out_dir: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Hedge weights over rounds and win shares from a trace; returns the PNG paths."""
    records = read_trace(trace_path)
    if not records:
        raise SpecEMError(f"{trace_path}: no rounds in this trace (was it written with --trace?)")
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = iter_requests(records)
    models = _trace_models(records)
    return [
        _plot_weights(plt, records, groups, models, out / f"{prefix}weights.png"),
        _plot_wins(plt, records, models, len(groups), out / f"{prefix}wins.png"),
    ]


def plot_bench(report: dict[str, Any] | str | os.PathLike, out_dir: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Grouped bars of tokens/s per configuration (prompt length x window) and system."""
    if not isinstance(report, dict):
        report = _load_json(report)
    rows = report.get("rows") or []
    if not rows:
        raise SpecEMError("the bench report has no measurements")
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs: list[tuple[str, int]] = []
    systems: list[str] = []
    values: dict[tuple[tuple[str, int], str], float] = {}
    for r in rows:
        cfg = (str(r["prompt"]), int(r["window"]))
        if cfg not in configs:
            configs.append(cfg)
        name = r["system"] if r["kind"] == "ensemble" else f"alone: {r['system']}"
        if name not in systems:
            systems.append(name)
        tps = r.get("median", {}).get("tokens_per_s")
        if tps is not None:
            values[(cfg, name)] = float(tps)
    width = 0.8 / max(1, len(systems))
    n_bars = len(configs) * max(1, len(systems))
    fig, ax = plt.subplots(figsize=(min(18, max(8, 0.22 * n_bars + 5)), 5.5), dpi=110)
    for j, name in enumerate(systems):
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(configs))]
        ys = [values.get((cfg, name), 0.0) for cfg in configs]
        ax.bar(xs, ys, width=width, label=name, color=f"C{j}")
    labels = []
    tokens = {(str(r["prompt"]), int(r["window"])): r.get("prompt_tokens") for r in rows}
    for prompt, w in configs:
        n = tokens.get((prompt, w))
        labels.append(f"{prompt}\n({n} tok) W={w}" if n is not None else f"{prompt} W={w}")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(labels, fontsize=8)
    meta = report.get("meta", {})
    ax.set_title(
        f"Decoding speed per configuration ({meta.get('new_tokens', '?')} new tokens, "
        f"median of {meta.get('reps', '?')}, device {meta.get('device', '?')})"
    )
    ax.set_xlabel("prompt length and window W")
    ax.set_ylabel("tokens/s (new tokens per second)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(title="system", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return [_save(plt, fig, out / f"{prefix}bench_tokens_per_s.png")]


def _load_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecEMError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise SpecEMError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def plot_file(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Plot a trace (JSONL of rounds) or a bench report (JSON), detected by content."""
    p = Path(path)
    if not p.is_file():
        raise SpecEMError(f"{str(p)!r} does not exist; pass a --trace JSONL file or a bench --out JSON file")
    with open(p, "rb") as fh:
        head = fh.read(4096).lstrip()
    prefix = p.stem + "_"
    if head.startswith(b"{"):
        # a bench report is one JSON document; a trace is one object per line
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        if isinstance(doc, dict) and "rows" in doc:
            return plot_bench(doc, out_dir, prefix)
        if isinstance(doc, dict) and doc.get("type") != "round":
            raise SpecEMError(f"{p}: neither a trace nor a bench report")
    return plot_trace(p, out_dir, prefix)
