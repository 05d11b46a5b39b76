#!/usr/bin/env python3
"""Turns attention_bench's Google Benchmark JSON into docs/benchmarks.md and its plots.

    build/bench/bench/attention_bench --benchmark_out=run.json --benchmark_out_format=json
    /usr/bin/python3 scripts/bench_report.py run.json [--out-dir docs]

Writes <out-dir>/benchmarks.md and <out-dir>/bench/{bytes_per_token,decode_tokens_per_s,
roofline}.{png,svg}. Needs matplotlib (Debian: python3-matplotlib); the same JSON always gives
byte-identical files. scripts/bench_compare.py reuses load_run() from here.
"""
import argparse
import json
import math
import os
import re
import sys

TO_US = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
STYLE = {"bf16": "-", "f32": "--"}  # the storages the line plots draw, and how
MISMATCHED = {}  # run name -> how its tokens_per_s differs from batch / real_time
SHOWN = {"tpattn_" + k for k in ("cpu", "l3_bytes", "compiler", "flags", "simd", "preset",
                                  "threads", "layers", "budget_gib")}  # the setup table's keys
KINDS = {
    "decode": ("Decode: bare attention kernel", "One new token per sequence over the cached "
               "tokens, the attention kernel alone; time of one step through one layer."),
    "layer_decode": ("Decode: whole layer", "Projections, RoPE, cache append, attention and "
                     "output projection for one new token per sequence; time of one step "
                     "through one layer."),
    "prefill": ("Prefill: whole layer", "Causal prefill of all the tokens onto an empty "
                "sequence (batch 1); time of the whole prefill through one layer."),
}


# attention_bench measures the machine's limits again after its last row, under this name.
END_LIMITS_PREFIX = "limits/end-of-run/threads:"  # then the thread count


def fail(message):
    """One clear line and exit status 2, so a calling script can tell bad input from a crash."""
    print(f"{os.path.basename(sys.argv[0])}: {message}", file=sys.stderr)
    sys.exit(2)


def parse_name(name):
    """Splits kind/config/operator/storage/key:value...; bare words Google Benchmark may append
    (real_time, manual_time) are dropped so they cannot split one result into two. Other
    names (helper benchmarks, older layouts) get kind None and stay out of the report."""
    parts = name.split("/")
    if len(parts) < 4 or parts[0] not in list(KINDS) + ["budget"]:
        return {"kind": None}
    params = {k: int(v) if v.isdigit() else v
              for k, sep, v in (part.partition(":") for part in parts[4:]) if sep}
    return {"kind": parts[0], "config": parts[1], "operator": parts[2], "storage": parts[3],
            "params": params}


def load_run(path):
    """Reads one benchmark JSON into (context, results): results maps each run name, in order
    of first appearance, to its median row (or single row) with the time in µs as "us", the
    repetitions' real times in µs and the skip message, so both scripts judge a run alike."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        fail(f"cannot read {path}: {error}")
    if not isinstance(data, dict) or not data.get("benchmarks"):
        fail(f"{path} holds no benchmarks: is it the --benchmark_out=... "
             "--benchmark_out_format=json file of a run that ran something?")
    groups, results = {}, {}
    for row in data["benchmarks"]:
        groups.setdefault(row.get("run_name", row["name"]), []).append(row)
    to_us = lambda r: r["real_time"] * TO_US[r.get("time_unit", "ns")]
    for name, rows in groups.items():
        good = [r for r in rows if r.get("run_type", "iteration") == "iteration"
                and not r.get("error_occurred")]
        median = [r for r in rows if r.get("aggregate_name") == "median"
                  and not r.get("error_occurred")]
        # Without a median aggregate (one repetition, or aggregates off): the middle repetition.
        row = median[0] if median else sorted(good, key=to_us)[(len(good) - 1) // 2] if good \
            else None
        error = None if row else next((r["error_message"] for r in rows
                                       if r.get("error_message")), "no result in the file")
        results[name] = dict(parse_name(name), name=name, error=error,
                             row=dict(row, us=to_us(row)) if row else None,
                             reps_us=[to_us(r) for r in good])
    return data.get("context", {}), results


def first_seen(values):
    """Keeps the benchmark's own (registration) order instead of sorting names."""
    return list(dict.fromkeys(values))


def fmt(x):
    """Three significant digits, thousands separated: enough to compare, easy to read."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def fmt_rate(x):
    """Token rates span 1 to 10^7, so millions read better as '1.05 M'."""
    return "–" if x is None else f"{x / 1e6:.3g} M" if x >= 1e6 else fmt(x)


def fmt_bytes(n):
    """Binary units, as caches and memory budgets are sized."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def table(header, rows, left=(0,)):
    """A markdown table: the columns numbered in `left` are text, the rest right-aligned numbers."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(":---" if i in left else "---:" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]


def limits(context):
    """The machine limits measured in the run, per thread count (tpattn_*_t<T> keys)."""
    found = {}
    for key, value in context.items():
        m = re.fullmatch(r"tpattn_(bandwidth_GBps|fma_peak_GFLOPs|gemm_GFLOPs)_t(\d+)", key)
        if m:
            found.setdefault(int(m.group(2)), {})[m.group(1)] = float(value)
    return dict(sorted(found.items()))


def setup_section(context, json_path, end_limits=None):
    """Says how the run was made, so no table is read without its machine and limits; the
    limits measured again after the last row show whether the machine's load moved meanwhile."""
    c = lambda key: context.get(key, "?")
    caches = ", ".join(f"L{x['level']} {x['type']} {fmt_bytes(x['size'])}"
                       + (f" per {x['num_sharing']} CPUs" if x.get("num_sharing", 1) > 1 else "")
                       for x in context.get("caches", []))
    l3 = context.get("tpattn_l3_bytes")
    lines = ["# attention_bench results", "",
             f"Generated by `scripts/bench_report.py` from `{json_path}`; do not edit this page "
             "by hand, rerun the script. Commentary on the results lives in the README.", "",
             "## How the run was made", ""]
    lines += table(["Setting", "Value"], [
        ["CPU", c("tpattn_cpu")], ["Logical CPUs", f"{c('num_cpus')} at {c('mhz_per_cpu')} MHz"],
        ["Caches", caches or "?"], ["L3 the runs are sized against", fmt_bytes(float(l3))
                                    if l3 else "?"],
        ["Compiler and flags", f"{c('tpattn_compiler')}, `{c('tpattn_flags')}`"],
        ["SIMD", c("tpattn_simd")], ["Date", c("date")], ["Preset", c("tpattn_preset")],
        ["Threads", c("tpattn_threads")],
        ["Memory-budget model", f"{c('tpattn_layers')} layers in {c('tpattn_budget_gib')} GiB"],
        ["Google Benchmark library build", f"{c('library_build_type')} (its own code only)"],
    ] + [[f"`{k}`", v] for k, v in context.items() if k.startswith("tpattn_") and k not in SHOWN
         and not re.search(r"_t\d+$", k)], left=(0, 1))  # keys added later still show up
    lines += ["Limits measured in the same run, per thread count. The read bandwidth is the "
              "best of 8 read patterns of 1 GiB (1, 2, 4 or 8 streams side by side, with and "
              "without software prefetch), far beyond L3: the limit for a step that must stream "
              "its KV cache from memory. The fp32 FMA peak is the compute limit. The Eigen GEMM rate is a "
              "reference for what a tuned large matrix product reaches; no roofline uses it. "
              "Each row's roofline is t_min / t with t_min = max(bytes / bandwidth, flops / FMA "
              "peak) at its thread count (1.00 = at the machine's limit); *Bound* names the "
              "larger of the two terms.", ""]
    rows = [[t, fmt(v.get("bandwidth_GBps")), fmt(v.get("fma_peak_GFLOPs")),
             fmt(v.get("gemm_GFLOPs"))] for t, v in limits(context).items()]
    for t, end in sorted((end_limits or {}).items()):
        rows.append([f"{t}, again after the last row", fmt(end.get("GB_per_s")),
                     fmt(end.get("GFLOP_per_s")), "–"])
    return lines + table(["Threads", "Read bandwidth (GB/s)", "fp32 FMA peak (GFLOP/s)",
                          "Eigen GEMM (GFLOP/s)"], rows)


def rate(r):
    """tokens_per_s should be batch (prefill: tokens) over the row's real time; a rate counter
    that Google Benchmark divided by CPU time instead would mislead every table and plot, so
    mismatches are collected for one warning at the end."""
    n = r["params"].get("tokens" if r["kind"] == "prefill" else "batch", 1)
    counted, expected = r["row"].get("tokens_per_s"), n / (r["row"]["us"] * 1e-6)
    if counted and abs(counted / expected - 1) > 0.05:
        MISMATCHED.setdefault(r["name"], f"{counted:.4g} against {n} / real_time = {expected:.4g}")
    return expected if counted is None else counted


def timed_sections(results, made):
    """One table per config for each timed kind, grouped by operator, otherwise in run order."""
    lines = []
    for kind, (title, intro) in KINDS.items():
        rows = [r for r in results if r["kind"] == kind]
        if not rows:
            continue
        threads = len({r["params"].get("threads", 1) for r in rows}) > 1
        lines += [f"## {title}", "", intro, ""]
        if kind == "decode":
            lines += [f"![{alt}](bench/{stem}.svg)\n" for stem, alt in (
                ("decode_tokens_per_s", "Decode tokens/s vs context"),
                ("roofline", "Decode roofline vs context")) if stem in made]
        for config in first_seen(r["config"] for r in rows):
            mine = [r for r in rows if r["config"] == config]
            ops = first_seen(r["operator"] for r in mine)
            out = []
            for r in sorted(mine, key=lambda r: ops.index(r["operator"])):
                p, row = r["params"], r["row"]
                tokens = p.get("tokens", 0)  # a ragged batch's "first-last" stays text
                cells = [r["operator"], r["storage"],
                         f"{tokens:,}" if isinstance(tokens, int) else tokens]
                if kind != "prefill":
                    cells += [p.get("batch", "?")] + ([p.get("threads", 1)] if threads else [])
                cells += [fmt(row["us"] / (1e3 if kind == "prefill" else 1)), fmt_rate(rate(r))]
                cells += [] if kind == "prefill" else [fmt(row.get("GB_per_s"))]
                cells += [fmt(row.get("GFLOP_per_s")), f"{row.get('roofline', math.nan):.2f}"]
                if kind != "prefill":
                    bound = row.get("bound")  # 1 or 2; a median of an even count can be 1.5
                    cells += ["–" if bound is None else "memory" if bound < 1.5
                              else "compute" if bound > 1.5 else "mixed"]
                out.append(cells)
            head = (["Operator", "Storage", "Tokens", "ms", "tokens/s", "GFLOP/s", "Roofline"]
                    if kind == "prefill" else
                    ["Operator", "Storage", "Tokens", "Batch"] + (["Threads"] if threads else [])
                    + ["µs/step", "tokens/s", "GB/s", "GFLOP/s", "Roofline", "Bound"])
            lines += [f"### {config}", ""] + table(head, out, left=(0, 1))
    return lines


def budget_section(results):
    """How long a context and how many 4k sequences fit, per config and budget model."""
    rows = [r for r in results if r["kind"] == "budget"]
    lines = ["## Memory budget", "", "KV cache only, paged accounting: the longest context one "
             "sequence can hold and the most sequences of 4,096 tokens, in a model of the given "
             "number of layers within the given memory.", ""] if rows else []
    key = lambda r: (r["config"], r["params"].get("layers"), r["params"].get("gib"))
    for config, layers, gib in first_seen(map(key, rows)):
        mine = [r for r in rows if key(r) == (config, layers, gib)]
        ops = first_seen(r["operator"] for r in mine)
        out = [[r["operator"], r["storage"]] + [f"{r['row'].get(k, math.nan):,.0f}" for k in (
            "bytes_per_token", "max_context_batch1", "max_batch_4k")]
               + [f"{r['row'].get('context_vs_mha', math.nan):.2f}×"]
               for r in sorted(mine, key=lambda r: ops.index(r["operator"]))]
        lines += [f"### {config}: {layers} layers, {gib} GiB", ""]
        lines += table(["Operator", "Storage", "Bytes/token/layer", "Longest context (batch 1)",
                        "Largest batch at 4k", "Context vs " + ("MHA" if "MHA" in ops else ops[0])],
                       out, left=(0, 1))
    return lines


def cache_sizes(results):
    """{config: {operator: {storage: bytes}}} from whichever rows carry it, first value wins."""
    sizes = {}
    for r in results:
        if r["row"].get("bytes_per_token") is not None:
            sizes.setdefault(r["config"], {}).setdefault(r["operator"], {}).setdefault(
                r["storage"], r["row"]["bytes_per_token"])
    return sizes


def write_markdown(path, context, results, skipped, json_path, storages, made, end_limits):
    """The generated page: setup, cache sizes, one section per kind of row, what was skipped."""
    lines = setup_section(context, json_path, end_limits) + [
        "## KV-cache bytes per token per layer", ""]
    if "bytes_per_token" in made:
        lines += ["![Cache bytes per token per layer](bench/bytes_per_token.svg)", ""]
    sizes = [[c, o] + [f"{v[s]:,.0f}" if s in v else "–" for s in storages]
             for c, ops in cache_sizes(results).items() for o, v in ops.items()]
    lines += table(["Config", "Operator"] + storages, sizes, left=(0, 1))
    lines += timed_sections(results, made) + budget_section(results)
    if skipped:
        lines += ["## Skipped", ""] + table(
            ["Benchmark", "Reason"], [[f"`{r['name']}`", r["error"]] for r in skipped], (0, 1))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def pyplot():
    """Imports matplotlib only here, so bench_compare.py (which imports this file) needs none."""
    try:
        import matplotlib
    except ImportError:
        fail("needs matplotlib: run it with /usr/bin/python3 (Debian's python3-matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"svg.hashsalt": "tpattn", "svg.fonttype": "path", "font.size": 9})
    return plt


def save(fig, out_dir, stem):
    """PNG and SVG without timestamps, so rerunning on the same JSON changes no file."""
    paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("png", "svg")]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None})
    fig.clf()  # three figures per run: clearing is enough, no pyplot bookkeeping needed
    return paths


def plot_bytes(plt, sizes, colors, storage, out_dir):
    """Grouped bars show each operator's cache next to the others of its config."""
    fig, ax = plt.subplots(figsize=(max(7, 0.3 * sum(map(len, sizes.values())) + 3), 4.2))
    x, ticks, values, handles = 0.0, [], [], {}
    for config, ops in sizes.items():
        bars = [(op, v[storage]) for op, v in ops.items() if storage in v]
        for i, (op, value) in enumerate(bars):
            handles[op] = ax.bar(x + i, value, 0.85, color=colors[op])
            ax.annotate(fmt(value), (x + i, value), xytext=(0, 1), textcoords="offset points",
                        ha="center", va="bottom", fontsize=6.5)
            values.append(value)
        if bars:
            ticks.append((x + (len(bars) - 1) / 2, config))
            x += len(bars) + 1.2
    if max(values) / min(values) > 30:  # a wide range: log, bars rising from a power of ten
        ax.set_yscale("log")
        ax.set_ylim(bottom=10 ** math.floor(math.log10(min(values))))
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:,.0f}")
    ax.set_xticks([t for t, _ in ticks], [c for _, c in ticks])
    ax.set_ylabel(f"bytes per token per layer ({storage})")
    ax.set_title(f"KV-cache size per token and layer, {storage} storage")
    ax.margins(y=0.12)
    ops = [op for op in colors if op in handles]
    ax.legend([handles[op] for op in ops], ops, title="Operator", loc="upper left",
              bbox_to_anchor=(1.01, 1))
    return save(fig, out_dir, "bytes_per_token")


def decode_panels(results):
    """The configs worth a panel (>= 2 contexts) with their rows at the fewest threads and the
    smallest batch (batch 1 normally), so each line is one operator's scaling with context."""
    rows = [r for r in results
            if r["kind"] == "decode" and isinstance(r["params"].get("tokens"), int)]
    threads = min((r["params"].get("threads", 1) for r in rows), default=1)
    rows = [r for r in rows if r["params"].get("threads", 1) == threads]
    panels = {}
    for config in first_seen(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        batch = min(r["params"].get("batch", 1) for r in mine)
        mine = [r for r in mine if r["params"].get("batch", 1) == batch]
        if len({r["params"].get("tokens") for r in mine}) >= 2:
            panels[config] = (batch, mine)
    return threads, panels


def plot_decode(plt, results, colors, out_dir, key, stem):
    """One panel per config: how tokens/s or the roofline fraction move as the context grows."""
    threads, panels = decode_panels(results)
    if not panels:
        return []
    cols = min(3, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, squeeze=False,
                             figsize=(4.4 * cols, 3.5 * math.ceil(len(panels) / cols)))
    present = {r["storage"] for _, mine in panels.values() for r in mine}
    style = {s: STYLE[s] for s in STYLE if s in present}
    style = style or {sorted(present)[0]: "-"}  # neither bf16 nor f32 ran: draw one, solid
    for ax, (config, (batch, mine)) in zip(axes.flat, panels.items()):
        for op in first_seen(r["operator"] for r in mine):
            for storage, line in style.items():
                points = sorted((r["params"]["tokens"], rate(r) if key == "tokens_per_s"
                                 else r["row"].get(key)) for r in mine
                                if r["operator"] == op and r["storage"] == storage)
                if points:
                    ax.plot(*zip(*points), line, color=colors[op], marker="o", markersize=3)
        tokens = sorted({r["params"]["tokens"] for r in mine})
        ax.set_xscale("log", base=2)
        ax.set_xticks(tokens, [f"{t // 1024}k" if t % 1024 == 0 else str(t) for t in tokens])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{config} (batch {batch})")
        ax.set_xlabel("cached tokens per sequence")
        if key == "roofline":
            ax.set_ylim(0, 1.05)
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
            ax.set_ylabel("roofline: t_min / t")
        else:
            ax.set_yscale("log")
            ax.set_ylabel("new tokens/s through one layer")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    used = first_seen(r["operator"] for _, mine in panels.values() for r in mine)
    handles = [plt.Line2D([], [], color=colors[op], marker="o", markersize=3, label=op)
               for op in used]
    handles += [plt.Line2D([], [], color="black", linestyle=line, label=storage)
                for storage, line in style.items()]
    fig.legend(handles=handles, title="Operator, storage", loc="center left",
               bbox_to_anchor=(1.0, 0.5))
    what = "fraction of the machine limit" if key == "roofline" else "throughput"
    fig.suptitle(f"Bare attention kernel, decode {what} vs context "
                 f"({threads} thread{'s' if threads > 1 else ''})")
    fig.tight_layout()
    return save(fig, out_dir, stem)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", help="Google Benchmark JSON written by attention_bench")
    parser.add_argument("--out-dir", default="docs", help="where benchmarks.md and bench/ go")
    args = parser.parse_args()
    context, loaded = load_run(args.json)
    timed = [r for r in loaded.values() if r["kind"] and not r["error"]]
    skipped = [r for r in loaded.values() if r["error"]]
    end_limits = {int(name[len(END_LIMITS_PREFIX):]): r["row"] for name, r in loaded.items()
                  if name.startswith(END_LIMITS_PREFIX) and r["row"]}
    ignored = [r["name"] for r in loaded.values()
               if not r["kind"] and not r["error"] and not r["name"].startswith(END_LIMITS_PREFIX)]
    if ignored:
        print(f"note: {len(ignored)} results with other names left out, e.g. {ignored[0]}",
              file=sys.stderr)
    plt = pyplot()
    storages = first_seen(r["storage"] for r in timed)
    ops = first_seen(r["operator"] for r in timed)
    palette = plt.get_cmap("tab10" if len(ops) <= 10 else "tab20").colors
    colors = {op: palette[i % len(palette)] for i, op in enumerate(ops)}
    plot_dir = os.path.join(args.out_dir, "bench")
    os.makedirs(plot_dir, exist_ok=True)
    sizes = cache_sizes(timed)
    paths = plot_bytes(plt, sizes, colors, "bf16" if "bf16" in storages else storages[0],
                       plot_dir) if sizes else []
    paths += plot_decode(plt, timed, colors, plot_dir, "tokens_per_s", "decode_tokens_per_s")
    paths += plot_decode(plt, timed, colors, plot_dir, "roofline", "roofline")
    made = {os.path.splitext(os.path.basename(p))[0] for p in paths}
    markdown = os.path.join(args.out_dir, "benchmarks.md")
    write_markdown(markdown, context, timed, skipped, args.json, storages, made, end_limits)
    if MISMATCHED:
        name, how = next(iter(MISMATCHED.items()))
        print(f"warning: {len(MISMATCHED)} rows' tokens_per_s is off by more than 5% from "
              f"batch (prefill: tokens) / real_time, e.g. {name}: {how}. The tables and plots "
              "show the counter.", file=sys.stderr)
    print("\n".join([markdown] + paths))


if __name__ == "__main__":
    main()
