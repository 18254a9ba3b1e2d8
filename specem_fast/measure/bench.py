"""Speed benchmark: ensemble cached vs recompute vs each model alone.

For every prompt length and window the same prompt is decoded by

* the ensemble in ``cached`` mode (our engine: KV caches persist across rounds),
* the ensemble in ``recompute`` mode (the reference cost model: every round
  re-encodes the whole sequence),
* each member model alone, decoding as many new tokens (in its own tokenizer)
  as the cached ensemble's answer holds, with EOS ignored.

Each measurement runs ``warmup`` untimed times, then ``reps`` timed times; the
table reports medians. Greedy decoding by default, so cached and recompute do
the same work and must write the same text (checked and reported).

Prompt lengths: ``short`` is one GSM8K problem; a number N builds a prompt of
about N tokens by concatenating GSM8K problems in file order (deterministic).
Token counts come from ``Ensemble.count_tokens`` when the engine has it, else
from a 4-characters-per-token estimate (reported as such).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from specem_fast.config import GenerationSettings
from specem_fast.errors import CacheFullError, SpecEMError
from specem_fast.measure.stats import median
from specem_fast.measure.trace import write_trace

__all__ = ["BenchPlan", "run_bench", "build_prompt", "format_bench", "parse_lengths", "FORMAT"]

FORMAT = "specem-fast-bench/1"

_FALLBACK_PROBLEMS = [
    "A baker makes {a} loaves in the morning and {b} in the afternoon. She sells all but {c}. How many does she sell?",
    "A train travels {a} km in the first hour and {b} km in the second. How far does it go in total, minus {c} km of detours?",
    "Tom has {a} marbles, gives {b} to Ann and then finds {c} more. How many marbles does he have?",
]


@dataclass
class BenchPlan:
    """What to measure. ``lengths``: ``"short"`` or approximate prompt token counts."""

    lengths: list[str | int] = field(default_factory=lambda: ["short", 1000, 3000])
    windows: list[int] = field(default_factory=lambda: [5, 10, 15])
    new_tokens: int = 64
    reps: int = 3
    warmup: int = 1
    modes: list[str] = field(default_factory=lambda: ["cached", "recompute"])
    singles: bool = True
    settings: dict[str, Any] = field(default_factory=dict)  # other GenerationSettings fields

    def validate(self) -> None:
        if not self.lengths:
            raise SpecEMError("bench needs at least one prompt length")
        if not self.windows or any(not isinstance(w, int) or w < 1 for w in self.windows):
            raise SpecEMError(f"windows must be integers >= 1 (got {self.windows})")
        if self.reps < 1:
            raise SpecEMError(f"--reps must be >= 1 (got {self.reps})")
        if self.warmup < 0:
            raise SpecEMError(f"--warmup must be >= 0 (got {self.warmup})")
        if self.new_tokens < 1:
            raise SpecEMError(f"--new-tokens must be >= 1 (got {self.new_tokens})")
        bad = [m for m in self.modes if m not in ("cached", "recompute")]
        if bad or not self.modes:
            raise SpecEMError(f"modes must be cached and/or recompute (got {self.modes})")
        for k in ("window", "max_new_tokens", "mode"):
            if k in self.settings:
                raise SpecEMError(f"bench sets {k} itself; use --windows / --new-tokens / --modes")
        GenerationSettings().with_overrides(**self.settings)  # validates the rest


def parse_lengths(text: str) -> list[str | int]:
    """``"short,1000,3000"`` -> ``["short", 1000, 3000]``."""
    out: list[str | int] = []
    for part in text.split(","):
        p = part.strip().lower()
        if not p:
            continue
        if p == "short":
            out.append("short")
            continue
        try:
            n = int(p.rstrip("k")) * (1000 if p.endswith("k") else 1)
        except ValueError:
            raise SpecEMError(f"prompt length {part!r} is neither 'short' nor a token count such as 1000") from None
        if n < 16:
            raise SpecEMError(f"prompt length {n} is too small; use 'short' or at least 16 tokens")
        out.append(n)
    if not out:
        raise SpecEMError("no prompt lengths given")
    return out


# --- prompts ----------------------------------------------------------------


def _problems() -> tuple[list[str], str]:
    """GSM8K questions in file order, or a synthetic fallback when not installed."""
    try:
        from specem_fast.measure.datasets import load_gsm8k

        return [it.meta["question"].strip() for it in load_gsm8k()], "gsm8k"
    except SpecEMError:
        out = []
        for i in range(2000):
            t = _FALLBACK_PROBLEMS[i % len(_FALLBACK_PROBLEMS)]
            out.append(t.format(a=7 + i % 13, b=3 + i % 11, c=1 + i % 5))
        return out, "synthetic"


def token_counter(ensemble: Any) -> tuple[Callable[[str], int], str]:
    """A function counting a prompt's tokens (the most over the models, chat
    template included), and where the count comes from."""
    fn = getattr(ensemble, "count_tokens", None)
    if callable(fn):
        return (lambda text: int(fn(text))), "ensemble.count_tokens"
    return (lambda text: max(1, round(len(text) / 4))), "estimate (4 characters per token)"


def build_prompt(length: str | int, count: Callable[[str], int], problems: Sequence[str]) -> str:
    """The benchmark prompt of a length class, deterministic for given problems."""
    if length == "short":
        return (
            "Solve the following math problem step by step.\n\nQuestion: " + problems[0]
        )
    target = int(length)
    head = "Below are several math problems. Read them all, then solve Problem 1 step by step.\n\n"
    tail = "\n\nNow solve Problem 1 step by step."
    parts: list[str] = []
    for i, q in enumerate(problems, start=1):
        parts.append(f"Problem {i}: {q}")
        text = head + "\n\n".join(parts) + tail
        if count(text) >= target:
            return text
    raise SpecEMError(f"cannot build a prompt of {target} tokens from the available problems")


# --- measuring ----------------------------------------------------------------


def _capacity(ensemble: Any) -> int | None:
    """Token budget per sequence (the engine's cache_tokens), if the engine has one."""
    v = getattr(getattr(ensemble, "config", None), "cache_tokens", None)
    return v if isinstance(v, int) and v > 0 else None


def _ensemble_metrics(res: Any) -> dict[str, Any]:
    t = res.timings
    rounds = max(1, len(res.rounds))
    total = float(t.get("total_s", 0.0))
    return {
        "total_s": total,
        "new_tokens": int(res.new_tokens),
        "tokens_per_s": res.new_tokens / total if total > 0 else None,
        "first_segment_s": t.get("first_segment_s"),
        "rounds": len(res.rounds),
        "draft_s_per_round": float(t.get("draft_s", 0.0)) / rounds,
        "verify_s_per_round": float(t.get("verify_s", 0.0)) / rounds,
        "commit_s_per_round": float(t.get("commit_s", 0.0)) / rounds,
        "tokens_per_model": dict(res.tokens_per_model),
        "stop_reason": res.stop_reason,
        "text_sha": hashlib.sha256(res.text.encode("utf-8")).hexdigest()[:16],
    }


def _single_metrics(res: Any) -> dict[str, Any]:
    total = float(res.seconds)
    return {
        "total_s": total,
        "new_tokens": int(res.new_tokens),
        "tokens_per_s": res.new_tokens / total if total > 0 else None,
        "first_segment_s": res.first_token_s,
        "stop_reason": res.stop_reason,
    }


def _medians(reps: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in reps[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out = {k: median(r.get(k) for r in reps) for k in keys}
    # tokens/s of the median run time, so tokens/s and total_s agree
    if out.get("total_s"):
        out["tokens_per_s"] = out["new_tokens"] / out["total_s"]
    return out


def _fitting_prompts(
    plan: BenchPlan,
    n_models: int,
    count: Callable[[str], int],
    problems: Sequence[str],
    capacity: int | None,
    skipped: list[dict[str, Any]],
) -> list[tuple[str, str, int]]:
    """Prompts the engine can hold; the others are noted in ``skipped`` instead of failing mid-run."""
    prompts = []
    for length in plan.lengths:
        text = build_prompt(length, count, problems)
        n_tok = count(text)
        # prompt + answer + one round of packed candidates (K drafts of up to W+4 tokens)
        need = n_tok + plan.new_tokens + n_models * (max(plan.windows) + 4)
        if capacity is not None and need > capacity:
            skipped.append({"prompt": str(length), "reason": f"needs about {need} tokens, the engine holds {capacity}"})
            continue
        prompts.append((str(length), text, n_tok))
    return prompts


def _ratio(
    label: str,
    n_tok: int,
    window: int,
    by_mode: dict[str, dict[str, Any]],
    singles: dict[str, dict[str, Any]],
    n_models: int,
) -> dict[str, Any]:
    """Per-token cost ratios, so answers of different lengths compare fairly."""
    ratio: dict[str, Any] = {"prompt": label, "prompt_tokens": n_tok, "window": window}
    c, rc = by_mode.get("cached"), by_mode.get("recompute")
    if c and rc:
        c_spt = c["median"]["total_s"] / max(1, c["median"]["new_tokens"])
        r_spt = rc["median"]["total_s"] / max(1, rc["median"]["new_tokens"])
        ratio["recompute_over_cached"] = r_spt / c_spt if c_spt > 0 else None
        ratio["same_text_cached_recompute"] = c["reps"][0]["text_sha"] == rc["reps"][0]["text_sha"]
    if c and singles and len(singles) == n_models:
        alone = sum(s["median"]["total_s"] for s in singles.values())
        ratio["cached_over_sum_alone"] = c["median"]["total_s"] / alone if alone > 0 else None
    return ratio


class _BenchRun:
    """State shared by the measuring steps of one ``run_bench`` call."""

    def __init__(
        self,
        ensemble: Any,
        plan: BenchPlan,
        models: list[str],
        base: dict[str, Any],
        trace_path: str | os.PathLike | None,
        skipped: list[dict[str, Any]],
        bar: Any,
    ) -> None:
        self.ensemble = ensemble
        self.plan = plan
        self.models = models
        self.base = base
        self.trace_path = trace_path
        self.skipped = skipped
        self.bar = bar
        self.runs_per_cfg = plan.warmup + plan.reps
        self.rows: list[dict[str, Any]] = []
        self.ratios: list[dict[str, Any]] = []
        # a model alone does not depend on the window: measure it once per prompt and token target
        self.single_cache: dict[tuple[str, str, int], dict[str, Any]] = {}
        self.first_meta: dict[str, Any] = {}

    def tick(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(desc, refresh=False)
            self.bar.update(1)

    def measure_window(self, label: str, text: str, n_tok: int, window: int) -> bool:
        """False when the cache overflowed: larger windows of this prompt would too."""
        by_mode: dict[str, dict[str, Any]] = {}
        for mode in self.plan.modes:
            row = self._ensemble_row(label, text, n_tok, window, mode)
            if row is None:
                return False
            by_mode[mode] = row
        singles: dict[str, dict[str, Any]] = {}
        if self.plan.singles:
            ref = by_mode.get("cached") or next(iter(by_mode.values()), None)
            for m in self.models:
                singles[m] = self._single_row(label, text, n_tok, window, m, ref)
        self.ratios.append(_ratio(label, n_tok, window, by_mode, singles, len(self.models)))
        return True

    def _ensemble_row(self, label: str, text: str, n_tok: int, window: int, mode: str) -> dict[str, Any] | None:
        """The row of one mode, or None (noted in ``skipped``) when the cache cannot hold the run."""
        settings = {**self.base, "window": window, "max_new_tokens": self.plan.new_tokens, "mode": mode}
        reps = []
        last = None
        try:
            for r in range(self.runs_per_cfg):
                res = self.ensemble.generate(text, **settings)
                self.tick(f"{label} W{window} {mode}")
                if r >= self.plan.warmup:
                    reps.append(_ensemble_metrics(res))
                    last = res
        except CacheFullError as exc:
            self.skipped.append({"prompt": label, "window": window, "mode": mode, "reason": str(exc)})
            return None
        if not self.first_meta and last is not None:
            self.first_meta = dict(getattr(last, "metadata", {}) or {})
        row = {
            "prompt": label,
            "prompt_tokens": n_tok,
            "window": window,
            "system": f"ensemble-{mode}",
            "kind": "ensemble",
            "mode": mode,
            "reps": reps,
            "median": _medians(reps),
            "same_text_all_reps": len({r["text_sha"] for r in reps}) == 1,
        }
        self.rows.append(row)
        if self.trace_path is not None and last is not None:
            write_trace(self.trace_path, last, labels=[f"{label} W{window} {mode}"], append=True)
        return row

    def _single_target(self, model: str, ref: dict[str, Any] | None) -> int:
        """As many new tokens as the model wrote inside the ensemble answer, so speeds compare like for like."""
        if ref is not None:
            per_model = [r["tokens_per_model"].get(model) for r in ref["reps"]]
            n_new = int(median(v for v in per_model if v is not None) or ref["median"]["new_tokens"])
        else:
            n_new = self.plan.new_tokens
        return max(1, n_new)

    def _time_single(self, label: str, text: str, window: int, model: str, n_new: int) -> dict[str, Any]:
        reps = []
        for r in range(self.runs_per_cfg):
            res = self.ensemble.generate_single(
                model,
                text,
                max_new_tokens=n_new,
                temperature=self.base["temperature"],
                top_p=self.base["top_p"],
                seed=self.base["seed"],
                ignore_eos=True,
            )
            self.tick(f"{label} W{window} {model}")
            if r >= self.plan.warmup:
                reps.append(_single_metrics(res))
        return {"reps": reps, "median": _medians(reps)}

    def _single_row(
        self, label: str, text: str, n_tok: int, window: int, model: str, ref: dict[str, Any] | None
    ) -> dict[str, Any]:
        n_new = self._single_target(model, ref)
        key = (label, model, n_new)
        reused = key in self.single_cache
        if reused:
            if self.bar is not None:
                self.bar.update(self.runs_per_cfg)
        else:
            self.single_cache[key] = self._time_single(label, text, window, model, n_new)
        row = {
            "prompt": label,
            "prompt_tokens": n_tok,
            "window": window,
            "system": model,
            "kind": "single",
            "mode": None,
            "target_new_tokens": n_new,
            "reused": reused,
            **self.single_cache[key],
        }
        self.rows.append(row)
        return row


def _meta(
    ensemble: Any,
    plan: BenchPlan,
    models: list[str],
    engine_meta: dict[str, Any],
    base: dict[str, Any],
    sources: tuple[str, str],
    command: str | None,
) -> dict[str, Any]:
    """Where and how the numbers were taken, so a report can be compared with another later."""
    try:
        import torch

        torch_version = torch.__version__
        threads = torch.get_num_threads()
    except Exception:  # pragma: no cover - torch is a hard dependency
        torch_version, threads = None, None
    prompt_source, count_source = sources
    return {
        "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "models": models,
        "device": _device(engine_meta, ensemble),
        "engine": engine_meta,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch_version,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "prompt_source": prompt_source,
        "prompt_tokens_counted_by": count_source,
        "new_tokens": plan.new_tokens,
        "reps": plan.reps,
        "warmup": plan.warmup,
        "windows": plan.windows,
        "lengths": [str(x) for x in plan.lengths],
        "settings": base,
    }


def run_bench(
    ensemble: Any,
    plan: BenchPlan,
    *,
    progress: bool = True,
    trace_path: str | os.PathLike | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the plan; returns the report (see ``format_bench``; JSON-serialisable)."""
    plan.validate()
    models = list(ensemble.model_names)
    count, count_source = token_counter(ensemble)
    problems, source = _problems()
    capacity = _capacity(ensemble)
    defaults = getattr(ensemble, "defaults", None) or GenerationSettings()  # the ensemble's preset
    base = defaults.with_overrides(**{"temperature": 0.0, **plan.settings}).to_dict()
    if trace_path is not None:
        Path(trace_path).write_bytes(b"")
    skipped: list[dict[str, Any]] = []
    prompts = _fitting_prompts(plan, len(models), count, problems, capacity, skipped)

    runs_per_cfg = plan.warmup + plan.reps
    total_runs = len(prompts) * len(plan.windows) * (len(plan.modes) + (len(models) if plan.singles else 0)) * runs_per_cfg
    bar = _progress(total_runs, progress)
    run = _BenchRun(ensemble, plan, models, base, trace_path, skipped, bar)
    try:
        for label, text, n_tok in prompts:
            for window in plan.windows:
                if not run.measure_window(label, text, n_tok, window):
                    break
    finally:
        if bar is not None:
            bar.close()
    return {
        "format": FORMAT,
        "meta": _meta(ensemble, plan, models, run.first_meta, base, (source, count_source), command),
        "rows": run.rows,
        "ratios": run.ratios,
        "skipped": skipped,
    }


def _device(meta: dict[str, Any], ensemble: Any) -> str | None:
    if meta.get("device"):
        return str(meta["device"])
    devices = meta.get("devices")
    if isinstance(devices, dict) and devices:
        return ", ".join(sorted(set(map(str, devices.values()))))
    cfg = getattr(ensemble, "config", None)
    return getattr(cfg, "device", None)


def _progress(total: int, enabled: bool):
    if not enabled or total <= 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="bench", unit="run", dynamic_ncols=True, file=sys.stderr)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.1f}"


def format_bench(report: dict[str, Any]) -> str:
    """The report as a plain-text table with the ratios under each block."""
    meta = report["meta"]
    out = [
        f"models: {', '.join(meta['models'])} | device {meta.get('device')} | {meta['new_tokens']} new tokens | "
        f"median of {meta['reps']} (warm-up {meta['warmup']}) | temperature {meta['settings'].get('temperature')}",
        f"prompt tokens counted by {meta['prompt_tokens_counted_by']}",
    ]
    head = (
        f"{'prompt':>7} {'tokens':>6} {'W':>3}  {'system':<36} {'tok/s':>8} {'first seg ms':>12} "
        f"{'rounds':>6} {'draft/rnd ms':>12} {'verify/rnd ms':>13} {'commit/rnd ms':>13} {'new tok':>7} {'total s':>8}"
    )
    out += [
        "tok/s: new tokens per second (the ensemble counts its answer in the first model's tokens, a model "
        "alone in its own); first seg: time to the first accepted segment (alone: to the first token)",
        head,
        "-" * len(head),
    ]
    ratios = {(r["prompt"], r["window"]): r for r in report["ratios"]}
    key = None
    for row in report["rows"]:
        k = (row["prompt"], row["window"])
        if key is not None and k != key:
            out.append(_ratio_line(ratios.get(key)))
        key = k
        m = row["median"]
        name = row["system"].replace("ensemble-", "ensemble ") if row["kind"] == "ensemble" else f"alone {row['system']}"
        tps = "-" if m.get("tokens_per_s") is None else f"{m['tokens_per_s']:.1f}"
        rounds = "-" if m.get("rounds") is None else f"{m['rounds']:.0f}"
        out.append(
            f"{row['prompt']:>7} {row['prompt_tokens']:>6} {row['window']:>3}  {name[:36]:<36} {tps:>8} "
            f"{_ms(m.get('first_segment_s')):>12} {rounds:>6} {_ms(m.get('draft_s_per_round')):>12} "
            f"{_ms(m.get('verify_s_per_round')):>13} {_ms(m.get('commit_s_per_round')):>13} "
            f"{m.get('new_tokens', 0):>7.0f} {m.get('total_s', 0):>8.2f}"
        )
    if key is not None:
        out.append(_ratio_line(ratios.get(key)))
    for s in report.get("skipped", []):
        where = s["prompt"] + (f" W{s['window']}" if "window" in s else "")
        out.append(f"skipped {where}: {s['reason']}")
    return "\n".join(out)


def _ratio_line(r: dict[str, Any] | None) -> str:
    if not r:
        return ""
    parts = []
    if r.get("recompute_over_cached") is not None:
        same = "" if r.get("same_text_cached_recompute", True) else " (texts differ!)"
        parts.append(f"recompute/cached {r['recompute_over_cached']:.2f}x{same}")
    if r.get("cached_over_sum_alone") is not None:
        parts.append(f"cached/(sum of models alone) {r['cached_over_sum_alone']:.2f}x")
    return ("        -> " + "   ".join(parts)) if parts else ""


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    p = Path(path)
    try:
        p.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise SpecEMError(f"cannot write {str(p)!r}: {exc.strerror}") from None
