"""One table for issue 8's ablation: every run of `specem-fast eval` on the same items.

Each argument is LABEL=RESULTS[+RESULTS...][:SYSTEM] (SYSTEM defaults to
``ensemble``; name a member to take its answers alone from a members file; files
joined by + are one setting's runs over different items). Every row is summarised
over the first --limit items of the data set with eval's own `summarize`, and the
paired columns compare each row with the first one on the items both answered:
``+`` right here and wrong there, ``-`` the other way.

    python benchmarks/ablation_table.py --limit 60 \\
        reference=benchmarks/eval/gsm8k200-reference.jsonl \\
        skip-agreed=benchmarks/eval/gsm8k60-skip-agreed.jsonl \\
        qwen=benchmarks/eval/gsm8k200-members.jsonl:qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specem_fast.measure.datasets import load_items
from specem_fast.measure.evaluate import ENSEMBLE, summarize


def _rows(spec: str) -> tuple[str, list[Path], str]:
    label, sep, rest = spec.partition("=")
    if not sep or not label or not rest:
        raise SystemExit(f"bad row {spec!r}: expected LABEL=RESULTS[+RESULTS...][:SYSTEM]")
    paths, _, system = rest.partition(":")
    files = [Path(p) for p in paths.split("+")]
    for f in files:
        if not f.is_file():
            raise SystemExit(f"{f}: no such results file")
    return label, files, system or ENSEMBLE


def _records(paths: list[Path]) -> tuple[dict, list[dict]]:
    """The first file's header and every file's items (runs of one setting over different items)."""
    headers, items = [], []
    for path in paths:
        recs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        header = next((r for r in recs if r.get("type") == "header"), None)
        if header is None:
            raise SystemExit(f"{path}: not a results file of `specem-fast eval` (no header)")
        headers.append(header)
        items += [r for r in recs if r.get("type") == "item"]
    if len({h["dataset"] for h in headers}) > 1:
        raise SystemExit(f"{' + '.join(map(str, paths))}: results of different data sets")
    return headers[0], items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+", help="LABEL=RESULTS[+RESULTS...][:SYSTEM]; the first row is the baseline")
    ap.add_argument("--limit", type=int, default=60, help="N items of the data set (default 60)")
    ap.add_argument("--against", default=None, metavar="LABEL,...",
                    help="paired +/- columns against these rows (default: the first row)")
    ap.add_argument("--skip", type=int, default=0,
                    help="leave out the first items (e.g. to compare speed only on items every run shared a machine for)")
    args = ap.parse_args()

    table, rights = [], {}
    for spec in args.rows:
        label, paths, system = _rows(spec)
        header, recs = _records(paths)
        items = load_items(header["dataset"], seed=header.get("seed", 0), limit=args.limit, skip=args.skip)
        row = summarize(recs, items, [system], dataset=header["dataset"], seed=header.get("seed", 0),
                        settings=header["settings"])["systems"][0]
        ids = {it.id for it in items}
        right = {r["item_id"]: bool(r.get("correct")) for r in recs
                 if r.get("system") == system and r["item_id"] in ids and "error" not in r}
        rights[label] = right
        table.append((label, row))
    against = args.against.split(",") if args.against else [table[0][0]]
    unknown = [a for a in against if a not in rights]
    if unknown:
        raise SystemExit(f"--against {', '.join(unknown)}: no such row (rows: {', '.join(rights)})")

    def paired(right: dict, base: dict) -> str:
        both = right.keys() & base.keys()
        return f"+{sum(right[i] and not base[i] for i in both)}/-{sum(base[i] and not right[i] for i in both)}"

    ifbench = any("instruction_accuracy" in r for _, r in table)
    head = (f"{'setting':<16} {'done':>6}  {'accuracy [95% CI]':<22} "
            + (f"{'instructions':>12} " if ifbench else "")
            + " ".join(f"{'vs ' + a[:7]:>10}" for a in against)
            + f" {'tokens':>6} {'tok/s':>6} {'drafters':>8} {'no verify':>9}  winner share")
    print(f"items {args.skip}-{args.skip + args.limit - 1}; vs X: +right only here / -right only in row X")
    print(head)
    print("-" * len(head))
    for label, r in table:
        acc = r["accuracy"]
        pct = _pct(acc)
        inst = f"{_pct(r.get('instruction_accuracy'), ci=False):>12} " if ifbench else ""
        pairs = " ".join(f"{paired(rights[label], rights[a]):>10}" for a in against)
        drafters = f"{r['mean_drafters']:.2f}" if "mean_drafters" in r else "-"
        skipped = f"{100 * r['skipped_verify_share']:.0f}%" if "skipped_verify_share" in r else "-"
        share = ", ".join(f"{m.split('-')[0]} {100 * v:.0f}%"
                          for m, v in sorted((r.get("win_share") or {}).items(), key=lambda kv: -kv[1]))
        tok = f"{r['mean_new_tokens']:.0f}" if r["mean_new_tokens"] is not None else "-"
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] is not None else "-"
        print(f"{label:<16} {r['n_done']:>3}/{r['n_items']:<2}  {pct:<22} {inst}{pairs} {tok:>6} "
              f"{tps:>6} {drafters:>8} {skipped:>9}  {share}")


def _pct(acc: dict | None, ci: bool = True) -> str:
    if not acc or acc.get("value") is None:
        return "n/a"
    if not ci:
        return f"{100 * acc['value']:.1f}%"
    return f"{100 * acc['value']:5.1f}% [{100 * acc['ci_low']:4.1f}, {100 * acc['ci_high']:4.1f}]"


if __name__ == "__main__":
    main()
