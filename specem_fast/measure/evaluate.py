"""Quality evaluation: the ensemble and each member alone over the same prompts.

Results stream to an append-only JSONL file, one record per (system, item) as it
finishes, flushed and fsynced. The first line is a header holding what the
numbers depend on (data set, seed, settings, models). Running again with the
same file resumes: finished records are read and skipped, never rewritten; a
torn last line left by a killed process is repaired by cutting only that
incomplete tail. A header that does not match the new run is an error (mixing
settings in one file would make the accuracy meaningless).

Order of work is item-major in batches (items 1..N for every system, then
N+1..2N, ...), so an interrupted run still compares the systems on the same
items. A batch runs as one batched call; each item keeps its own seed, so
greedy float32 answers do not depend on the batch size (bf16 rounding can).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from specem_fast.config import GenerationSettings
from specem_fast.errors import SpecEMError
from specem_fast.measure.answers import grade
from specem_fast.measure.datasets import EvalItem
from specem_fast.measure.ifbench import check_instructions
from specem_fast.measure.stats import accuracy, mean
from specem_fast.measure.trace import check_appendable, repair_jsonl_tail, write_trace

__all__ = ["ENSEMBLE", "FORMAT", "ResultsFile", "run_eval", "summarize", "format_summary", "summary_path_for"]

ENSEMBLE = "ensemble"
FORMAT = "specem-fast-eval/1"
# Header fields a resumed run must agree with.
# Ensemble records of an init_weights="learned" run: the running estimate after the batch.
LEARNED_KEY = "learned_after_batch"
_IDENTITY = ("dataset", "seed", "settings", "models", "verifiers", "prior", "batch")


class ResultsFile:
    """An append-only JSONL results file: header line, then one record per line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self) -> tuple[dict | None, list[dict], str]:
        """(header, records, repair note). Repairs a torn tail first."""
        if not self.path.exists():
            return None, [], "ok"
        if self.path.is_dir():
            raise SpecEMError(f"--out {str(self.path)!r} is a folder; give a file name such as results.jsonl")
        note = repair_jsonl_tail(self.path)
        header, records = None, []
        with open(self.path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise SpecEMError(
                        f"{self.path}:{lineno}: not valid JSON; this is not a results file written by "
                        "`specem-fast eval` (or it was edited); choose another --out file"
                    ) from None
                if not isinstance(rec, dict):
                    raise SpecEMError(f"{self.path}:{lineno}: expected a JSON object")
                if rec.get("type") == "header":
                    if header is None:
                        header = rec
                    continue
                records.append(rec)
        if (records or header is not None) and (header is None or header.get("format") != FORMAT):
            raise SpecEMError(
                f"{self.path} is not a results file of `specem-fast eval` (no {FORMAT} header); "
                "choose another --out file"
            )
        return header, records, note

    def append(self, record: dict) -> None:
        data = (_json_line(record) + "\n").encode("utf-8")
        with open(self.path, "ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def _json_line(obj: Any, **kw: Any) -> str:
    """JSON text that encodes to UTF-8: non-ASCII kept as is, unless a string holds a
    lone surrogate (an item id or answer from a JSONL file with "\\ud800"), which
    only a \\u escape can carry; the record then reads back exactly."""
    text = json.dumps(obj, ensure_ascii=False, **kw)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, **kw)
    return text


@contextmanager
def _exclusive(path: Path):
    """Hold an exclusive lock on ``PATH.lock`` while one eval writes ``path``.

    A second eval on the same --out fails at once instead of appending every
    record a second time. The lock file stays (removing it would race); the
    lock goes with the process, so a killed eval leaves nothing held.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    if not path.parent.is_dir():
        raise SpecEMError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist")
    lock = path.with_name(path.name + ".lock")
    try:
        fh = open(lock, "a")
    except OSError as exc:
        raise SpecEMError(f"cannot create the lock file {str(lock)!r} next to --out: {exc.strerror}") from None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpecEMError(
                f"another eval is writing {str(path)!r} (it holds {str(lock)!r}); wait for it to finish, "
                "or choose another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def summary_path_for(out_path: str | os.PathLike) -> Path:
    p = Path(out_path)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return p.with_name(stem + ".summary.json")


def _settings_dict(settings: GenerationSettings | dict | None, base: GenerationSettings) -> dict:
    """Every setting the answers depend on; a dict overrides the ensemble's defaults (its preset)."""
    if settings is None:
        return base.to_dict()
    if isinstance(settings, GenerationSettings):
        return settings.to_dict()
    return base.with_overrides(**settings).to_dict()


def score_output(item: EvalItem, text: str) -> dict[str, Any]:
    """Grading fields of one output."""
    if item.grader == "ifbench":
        res = check_instructions(text, item.meta.get("instruction_id_list", []), item.meta.get("kwargs"))
        return {"pred": None, "gold": None, "correct": res.all_followed, "ifbench": res.to_dict()}
    pred, ok = grade(item.grader, text, item.answer)
    return {"pred": pred, "gold": item.answer, "correct": ok}


@dataclass
class _Running:
    correct: dict[str, int] = field(default_factory=dict)
    graded: dict[str, int] = field(default_factory=dict)

    def add(self, system: str, correct: bool | None) -> None:
        if correct is None:
            return
        self.graded[system] = self.graded.get(system, 0) + 1
        self.correct[system] = self.correct.get(system, 0) + int(bool(correct))

    def postfix(self, systems: Sequence[str]) -> str:
        parts = []
        for s in systems:
            n = self.graded.get(s, 0)
            short = "ens" if s == ENSEMBLE else s.split("-")[0][:10]
            parts.append(f"{short} {100 * self.correct.get(s, 0) / n:.0f}%" if n else f"{short} -")
        return " ".join(parts)


def run_eval(
    ensemble: Any,
    items: Sequence[EvalItem],
    *,
    out_path: str | os.PathLike,
    dataset: str,
    seed: int = 0,
    settings: GenerationSettings | dict | None = None,
    systems: Sequence[str] | None = None,
    trace_path: str | os.PathLike | None = None,
    summary_path: str | os.PathLike | None = None,
    progress: bool = True,
    verifiers: Sequence[str] | None = None,
    batch: int = 8,
) -> dict[str, Any]:
    """Evaluate, resuming from ``out_path``; returns the summary (also written as JSON).

    ``systems``: ``"ensemble"`` and/or member model names (default: all).
    Item i is decoded with seed ``settings.seed + i`` (``settings.seed`` defaults
    to ``seed``) so a resumed run samples exactly what an uninterrupted one would.
    ``batch`` items run together per system (capped by the engine's max_batch).
    """
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise SpecEMError(f"batch must be an integer >= 1 (got {batch!r})")
    sdict = _settings_dict(settings, getattr(ensemble, "defaults", None) or GenerationSettings())
    if settings is None or (isinstance(settings, dict) and "seed" not in settings):
        sdict["seed"] = seed  # --seed drives sampling too, unless the settings say otherwise
    models = list(ensemble.model_names)
    all_systems = [ENSEMBLE] + models
    systems = list(systems) if systems else all_systems
    unknown = [s for s in systems if s not in all_systems]
    if unknown:
        raise SpecEMError(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(all_systems)}")
    if not items:
        raise SpecEMError("no items to evaluate")
    if trace_path is not None:
        check_appendable(trace_path)  # before any answer is decoded

    results = ResultsFile(out_path)
    with _exclusive(results.path):
        return _run_locked(
            ensemble, items, results, dataset=dataset, seed=seed, sdict=sdict, models=models, systems=systems,
            trace_path=trace_path, summary_path=summary_path, progress=progress, verifiers=verifiers, batch=batch,
        )


def _identity(dataset: str, seed: int, sdict: dict, models: list[str], verifiers, batch: int, book: Any,
              learned: bool) -> dict[str, Any]:
    """What the answers depend on: the header fields a resumed run must agree with."""
    return {
        "dataset": dataset,
        "seed": seed,
        "settings": sdict,
        "models": models,
        "verifiers": list(verifiers) if verifiers is not None else None,
        # answers that start from prior weights depend on them (files without it read as None)
        "prior": getattr(book, "prior", None) if sdict.get("init_weights") == "prior" else None,
        # answers that start from learned weights depend on which requests ran before them
        "batch": batch if learned else None,
    }


def _start_or_match_header(results: ResultsFile, header: dict | None, identity: dict[str, Any]) -> None:
    """Write the header of a new file, or refuse to mix this run into a different run's file."""
    if header is None:
        if results.path.parent and not results.path.parent.exists():
            raise SpecEMError(f"cannot write {str(results.path)!r}: folder {str(results.path.parent)!r} does not exist")
        results.append({"type": "header", "format": FORMAT, **identity})
        return
    header = dict(header)
    if isinstance(header.get("settings"), dict):
        # a setting added since the file was written was off (its default) in that run
        header["settings"] = {**GenerationSettings().to_dict(), **header["settings"]}
    diffs = [k for k in _IDENTITY if json.dumps(header.get(k), sort_keys=True) != json.dumps(identity[k], sort_keys=True)]
    if diffs:
        detail = "; ".join(f"{k}: file has {header.get(k)!r}, this run {identity[k]!r}" for k in diffs)
        raise SpecEMError(
            f"{results.path} holds results of a different run ({detail}); "
            "resume with the same options or choose another --out file"
        )


def _finished(records: Sequence[dict], items: Sequence[EvalItem], systems: list[str], path: Path
              ) -> tuple[set[tuple[str, str]], _Running]:
    """The (system, item) pairs already answered, and the running accuracy they start the bar at.

    A record whose prompt no longer matches its item is refused: the data changed under the file.
    """
    by_id = {it.id: it for it in items}
    done: set[tuple[str, str]] = set()
    running = _Running()
    for rec in records:
        key = (rec.get("system"), rec.get("item_id"))
        if key in done:
            continue
        done.add(key)
        it = by_id.get(rec.get("item_id"))
        if it is not None and rec.get("prompt_sha") not in (None, it.prompt_sha):
            raise SpecEMError(
                f"{path}: item {it.id} was answered for a different prompt; "
                "the data changed since that run, choose another --out file"
            )
        if it is not None and rec.get("system") in systems:
            running.add(rec["system"], rec.get("correct"))
    return done, running


def _write_summary(results: ResultsFile, items: Sequence[EvalItem], systems: list[str], *, dataset: str, seed: int,
                   sdict: dict, book: Any, summary_path) -> dict[str, Any]:
    """Summarise from the file, not memory, so a resumed run counts the earlier records too."""
    _, records, _ = results.load()
    summary = summarize(records, items, systems, dataset=dataset, seed=seed, settings=sdict, out_path=results.path)
    if hasattr(book, "to_dict"):  # what the weights learned across these requests ended at
        summary["weights"] = book.to_dict()
    spath = Path(summary_path) if summary_path is not None else summary_path_for(results.path)
    spath.write_text(_json_line(summary, indent=2) + "\n", encoding="utf-8")
    summary["summary_path"] = str(spath)
    return summary


def _run_locked(ensemble: Any, items: Sequence[EvalItem], results: ResultsFile, *, dataset: str, seed: int,
                sdict: dict, models: list[str], systems: list[str], trace_path, summary_path, progress: bool,
                verifiers, batch: int) -> dict[str, Any]:
    header, records, note = results.load()
    book = getattr(ensemble, "weights", None)
    learned = sdict.get("init_weights") == "learned" and hasattr(book, "restore")
    _start_or_match_header(results, header, _identity(dataset, seed, sdict, models, verifiers, batch, book, learned))
    if note != "ok" and progress:
        print(f"specem-fast: repaired the end of {results.path} ({note})", file=sys.stderr)

    done, running = _finished(records, items, systems, results.path)
    if learned:
        _resume_learned(book, records, items, batch, results.path)

    total = len(items) * len(systems)
    left = sum(1 for it in items for s in systems if (s, it.id) not in done)
    bar = _progress(total=total, initial=total - left, enabled=progress, desc=f"eval {dataset}")
    try:
        for start in range(0, len(items), batch):
            chunk = list(enumerate(items))[start : start + batch]
            for system in systems:
                todo = [(i, it) for i, it in chunk if (system, it.id) not in done]
                if not todo:
                    continue
                pairs = _run_batch(ensemble, todo, system, sdict)
                for (i, item), (record, result) in zip(todo, pairs):
                    if learned and system == ENSEMBLE:
                        record[LEARNED_KEY] = {"learned": book.learned, "requests": book.requests}
                    results.append(record)
                    running.add(system, record.get("correct"))
                    if trace_path is not None and result is not None and system == ENSEMBLE:
                        write_trace(trace_path, result, labels=[item.id], append=True)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(running.postfix(systems), refresh=False)
    finally:
        if bar is not None:
            bar.close()
    return _write_summary(results, items, systems, dataset=dataset, seed=seed, sdict=sdict, book=book,
                          summary_path=summary_path)


def _resume_learned(book: Any, records: Sequence[dict], items: Sequence[EvalItem], batch: int, path: Path) -> None:
    """Put back the running weight estimate a learned run had reached, so a resumed
    run answers the rest exactly as an uninterrupted one would.

    Every ensemble record of such a run holds the estimate after its batch; the
    last one recorded is where the run stopped.
    """
    state = None
    for rec in records:
        if rec.get("system") == ENSEMBLE and LEARNED_KEY in rec:
            state = rec[LEARNED_KEY]
    if state is None:
        return
    book.restore(state, f"{path}: learned weights")
    position = {it.id: i for i, it in enumerate(items)}
    done = {position[r["item_id"]] for r in records if r.get("system") == ENSEMBLE and r.get("item_id") in position}
    torn = [s for s in range(0, len(items), batch)
            if 0 < len(done & set(range(s, min(s + batch, len(items))))) < min(batch, len(items) - s)]
    if torn:
        print(f"specem-fast: {path}: the run stopped while writing a batch; the rest of that batch starts from "
              "the weights learned after it, not before it (learned answers there may differ from an "
              "uninterrupted run)", file=sys.stderr)


def _run_batch(ensemble: Any, todo: list[tuple[int, EvalItem]], system: str, sdict: dict
               ) -> list[tuple[dict[str, Any], Any]]:
    """(results record, raw result for the trace) per item, decoded as one batch.

    ``seconds`` is the item's share of the batch's time (the longest reported
    time in the batch: its requests start together), so tokens/s over records
    is the throughput; ``latency_s`` is the item's own time from admission to
    answer. An item the engine refuses (a prompt over the cache
    budget, text it cannot encode) is recorded as an error, not graded, and
    the others still run.
    """
    base = int(sdict.get("seed", 0))
    seeds = [base + i for i, _ in todo]
    prompts = [it.prompt for _, it in todo]
    try:
        if system == ENSEMBLE:
            settings = GenerationSettings().with_overrides(**sdict)
            outs = ensemble.generate(prompts, settings=[settings.with_overrides(seed=sd) for sd in seeds])
        else:
            outs = ensemble.generate_single(system, prompts, max_new_tokens=sdict["max_new_tokens"],
                                            temperature=sdict["temperature"], top_p=sdict["top_p"], seed=seeds)
    except (SpecEMError, UnicodeError) as exc:
        if len(todo) == 1:
            return [(_error_record(todo[0][1], todo[0][0], system, seeds[0], exc), None)]
        return [pair for one in todo for pair in _run_batch(ensemble, [one], system, sdict)]
    share = max(_reported_seconds(res) for res in outs) / len(todo)
    return [(_record(item, i, system, sd, res, share), res) for (i, item), sd, res in zip(todo, seeds, outs)]


def _reported_seconds(res: Any) -> float:
    return float(res.timings.get("total_s", 0.0)) if hasattr(res, "timings") else float(res.seconds)


def _base_record(item: EvalItem, index: int, system: str, seed: int) -> dict[str, Any]:
    return {
        "type": "item",
        "system": system,
        "item_id": item.id,
        "index": index,
        "dataset": item.dataset,
        "prompt_sha": item.prompt_sha,
        "seed": seed,
    }


def _error_record(item: EvalItem, index: int, system: str, seed: int, exc: Exception) -> dict[str, Any]:
    rec = _base_record(item, index, system, seed)
    rec.update(output="", new_tokens=0, seconds=0.0, stop_reason="error", error=str(exc), correct=None)
    return rec


def _record(item: EvalItem, index: int, system: str, seed: int, res: Any, seconds: float) -> dict[str, Any]:
    rec = _base_record(item, index, system, seed)
    rec.update(output=res.text, new_tokens=int(res.new_tokens), seconds=seconds, stop_reason=res.stop_reason)
    if system == ENSEMBLE:
        rec.update(
            latency_s=_reported_seconds(res),
            rounds=len(res.rounds),
            wins=dict(res.wins),
            tokens_per_model=dict(res.tokens_per_model),
            first_segment_s=res.timings.get("first_segment_s"),
            mean_drafters=res.mean_drafters,
            skipped_verify=res.skipped_verify,
        )
    else:
        rec.update(latency_s=_reported_seconds(res), first_token_s=res.first_token_s)
    rec["tokens_per_s"] = rec["new_tokens"] / seconds if seconds > 0 else None
    rec.update(score_output(item, rec["output"]))
    return rec


def summarize(
    records: Sequence[dict],
    items: Sequence[EvalItem],
    systems: Sequence[str],
    *,
    dataset: str,
    seed: int,
    settings: dict,
    out_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Per-system accuracy (Wilson 95% CI), mean tokens, tokens/s over ``items``."""
    ids = {it.id for it in items}
    first: dict[tuple[str, str], dict] = {}
    for rec in records:
        if rec.get("type") != "item" or rec.get("item_id") not in ids:
            continue
        first.setdefault((rec.get("system"), rec["item_id"]), rec)
    rows = []
    for system in systems:
        recs = [first[(system, it.id)] for it in items if (system, it.id) in first]
        ok = [r for r in recs if "error" not in r]
        tokens = sum(r.get("new_tokens", 0) for r in ok)
        secs = sum(r.get("seconds", 0.0) for r in ok)
        row: dict[str, Any] = {
            "system": system,
            "n_items": len(items),
            "n_done": len(recs),
            "n_errors": len(recs) - len(ok),
            "accuracy": accuracy(r.get("correct") for r in ok).to_dict(),
            "mean_new_tokens": mean(r.get("new_tokens") for r in ok),
            "mean_seconds": mean(r.get("seconds") for r in ok),
            "tokens_per_s": tokens / secs if secs > 0 else None,
        }
        if any("ifbench" in r for r in ok):
            checks = [v for r in ok for v in r.get("ifbench", {}).get("checked", {}).values()]
            row["instruction_accuracy"] = accuracy(checks).to_dict()
            row["instructions_checked"] = len(checks)
            row["instructions_skipped"] = sum(len(r.get("ifbench", {}).get("skipped", {})) for r in ok)
        if system == ENSEMBLE:
            wins: dict[str, int] = {}
            for r in ok:
                for m, c in (r.get("wins") or {}).items():
                    wins[m] = wins.get(m, 0) + int(c)
            n_rounds = sum(wins.values())
            row["mean_rounds"] = mean(r.get("rounds") for r in ok)
            row["win_share"] = {m: c / n_rounds for m, c in wins.items()} if n_rounds else {}
            rounds = sum(r.get("rounds") or 0 for r in ok)
            if rounds and all("mean_drafters" in r for r in ok):
                row["mean_drafters"] = sum(r["mean_drafters"] * (r.get("rounds") or 0) for r in ok) / rounds
                row["skipped_verify_share"] = sum(r.get("skipped_verify", 0) for r in ok) / rounds
        rows.append(row)
    return {
        "dataset": dataset,
        "seed": seed,
        "settings": settings,
        "n_items": len(items),
        "results_file": str(out_path) if out_path is not None else None,
        "systems": rows,
    }


def _pct(acc: dict) -> str:
    if acc.get("value") is None:
        return "n/a"
    return f"{100 * acc['value']:5.1f}% [{100 * acc['ci_low']:4.1f}, {100 * acc['ci_high']:5.1f}]"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table."""
    rows = summary["systems"]
    width = max([len("system")] + [len(r["system"]) for r in rows])
    has_if = any("instruction_accuracy" in r for r in rows)
    head = f"{'system':<{width}}  {'done':>9}  {'accuracy [95% CI]':<24}"
    if has_if:
        head += f"  {'instructions [95% CI]':<24}"
    head += f"  {'mean tokens':>11}  {'tokens/s':>8}"
    lines = [
        f"{summary['dataset']}: {summary['n_items']} items, seed {summary['seed']}, "
        f"temperature {summary['settings'].get('temperature')}, window {summary['settings'].get('window')}, "
        f"max_new_tokens {summary['settings'].get('max_new_tokens')}",
        head,
        "-" * len(head),
    ]
    for r in rows:
        acc = r["accuracy"]
        done = f"{r['n_done']}/{r['n_items']}"
        line = f"{r['system']:<{width}}  {done:>9}  {_pct(acc):<24}"
        if has_if:
            line += f"  {_pct(r['instruction_accuracy']) if 'instruction_accuracy' in r else '':<24}"
        mt = f"{r['mean_new_tokens']:.1f}" if r["mean_new_tokens"] is not None else "-"
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] is not None else "-"
        line += f"  {mt:>11}  {tps:>8}"
        lines.append(line)
    for r in rows:
        if r.get("win_share"):
            share = ", ".join(f"{m} {100 * v:.0f}%" for m, v in sorted(r["win_share"].items(), key=lambda kv: -kv[1]))
            lines.append(f"ensemble segments won: {share} (mean {r['mean_rounds']:.1f} rounds)")
            if "mean_drafters" in r:
                lines.append(f"ensemble: {r['mean_drafters']:.2f} models drafting per round, "
                             f"{100 * r['skipped_verify_share']:.0f}% of rounds without a verify pass")
        if r.get("n_errors"):
            lines.append(f"{r['system']}: {r['n_errors']} item(s) were refused by the engine (see their 'error' field; not graded)")
        if r.get("instructions_skipped"):
            lines.append(
                f"{r['system']}: {r['instructions_checked']} instruction checks made, "
                f"{r['instructions_skipped']} skipped (need nltk/spacy/emoji/syllapy); "
                "prompts with a skipped check are left out of the prompt-level accuracy"
            )
            break
    return "\n".join(lines)


def _progress(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="answer", dynamic_ncols=True, file=sys.stderr)
