#!/usr/bin/env python3
"""Compares two attention_bench JSON runs, benchmark by benchmark: time before and after.

    scripts/bench_compare.py BEFORE.json AFTER.json [--filter REGEX] [--markdown]

Times are the medians of the repetitions, chosen as scripts/bench_report.py chooses them (its
load_run() is reused; no matplotlib needed). A change counts as "within noise" when |ratio - 1|
is no larger than the larger relative spread (max - min) / median of the two sides' repetitions;
with a single repetition the spread, and so the verdict, is unknown. Budget rows carry no time
and are left out. Exits 0 whatever the outcome; 2 when a file is unreadable or holds no
benchmarks.
"""
import argparse
import math
import os
import re
import statistics
import sys

sys.dont_write_bytecode = True  # importing the sibling script must not leave __pycache__ behind
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_report import load_run, table  # noqa: E402  (needs the path above)


def fmt_time(us):
    """Picks the unit per value, as one table mixes 100 µs decode steps with 2 s prefills."""
    for unit, scale in (("s", 1e6), ("ms", 1e3)):
        if us >= scale:
            return f"{us / scale:.4g} {unit}"
    return f"{us:.4g} µs"


def spread(result):
    """The relative spread of a side's repetitions: the noise a change has to beat before it
    means anything. None when there is nothing to measure it from (one repetition)."""
    times = result["reps_us"]
    if len(times) < 2:
        return None
    return (max(times) - min(times)) / statistics.median(times)


def compared(before, after, keep):
    """Rows for the names both runs timed; a name skipped (or untimed) on either side goes to a
    second list, since a ratio against a skipped run would be meaningless."""
    rows, skipped, ratios = [], [], []
    for name, b in before.items():
        a = after.get(name)
        if a is None or not keep(name):
            continue
        if b["error"] or a["error"] or b["row"]["us"] <= 0 or a["row"]["us"] <= 0:
            skipped.append(f"{name}: before {b['error'] or 'ran'}; after {a['error'] or 'ran'}")
            continue
        ratio = a["row"]["us"] / b["row"]["us"]
        spreads = (spread(b), spread(a))
        noise = None if None in spreads else max(spreads)
        verdict = ("noise unknown" if noise is None else "within noise"
                   if abs(ratio - 1) <= noise else "faster" if ratio < 1 else "slower")
        rows.append([name, fmt_time(b["row"]["us"]), fmt_time(a["row"]["us"]), f"{ratio:.3f}",
                     f"{1 / ratio:.2f}x", "?" if noise is None else f"±{100 * noise:.1f}%",
                     verdict])
        ratios.append(ratio)
    return rows, skipped, ratios


def text_table(header, rows):
    """Aligned columns for a terminal: names left, numbers right, verdicts left."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    align = lambda r: "  ".join(str(c).ljust(w) if i in (0, len(r) - 1) else str(c).rjust(w)
                                for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [align(header), "  ".join("-" * w for w in widths)] + [align(r) for r in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", help="Google Benchmark JSON of the earlier run")
    parser.add_argument("after", help="Google Benchmark JSON of the later run")
    parser.add_argument("--filter", metavar="REGEX", help="only names this matches (re.search)")
    parser.add_argument("--markdown", action="store_true", help="a markdown table instead")
    args = parser.parse_args()
    try:
        pattern = re.compile(args.filter or "")
    except re.error as error:
        parser.error(f"--filter: {error}")  # exits 2
    before, after = load_run(args.before)[1], load_run(args.after)[1]
    keep = lambda name: bool(pattern.search(name)) and not name.startswith("budget/")
    rows, skipped, ratios = compared(before, after, keep)
    header = ["Benchmark", "Before", "After", "After/before", "Speed-up", "Noise", "Verdict"]
    if not rows:
        print("No benchmark timed in both files" + (f" matches {args.filter!r}" if args.filter
                                                    else "") + ".")
    elif args.markdown:
        print("\n".join(table(header, [[f"`{r[0]}`"] + r[1:] for r in rows], (0, 6))).rstrip())
    else:
        print("\n".join(text_table(header, rows)))
    if ratios:
        verdicts = [r[-1] for r in rows]
        counts = ", ".join(f"{verdicts.count(v)} {v}" for v in
                           ("faster", "slower", "within noise", "noise unknown") if v in verdicts)
        mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"\n{len(rows)} compared: {counts}; geometric mean after/before {mean:.3f} "
              f"(speed-up {1 / mean:.2f}x).")
    sections = [("Skipped on a side, not compared:", skipped),
                (f"Only in {args.before}:", [n for n in before if n not in after and keep(n)]),
                (f"Only in {args.after}:", [n for n in after if n not in before and keep(n)])]
    bullet = "- " if args.markdown else "  "
    for title, names in sections:
        if names:
            print("\n" + title + "".join(f"\n{bullet}{n}" for n in names))


if __name__ == "__main__":
    main()
