#!/usr/bin/env python3
"""Plots attention_bench results as an SVG (standard library only).

    build/bench/bench/attention_bench --benchmark_out=bench.json --benchmark_out_format=json
    scripts/plot_bench.py bench.json docs/decode_bench.svg

Three panels, one bar per operator and storage type (median of the repetitions): KV-cache bytes
per token and layer, decode time per layer at the largest context, and roofline (1.0 = at the
machine's measured limit).
"""
import json
import re
import sys
from html import escape

OPERATORS = ["MHA", "GQA", "MQA", "MLA", "TPA", "TPA-KVonly"]
STORAGES = {"f32": "#4C72B0", "bf16": "#DD8452"}


def load(path):
    rows = {}
    for bench in json.load(open(path))["benchmarks"]:
        if bench.get("aggregate_name") != "median":
            continue
        match = re.match(r"Decode/([^/]+)/([^/]+)/(\d+)", bench["name"])
        if not match:
            continue
        op, storage, context = match.group(1), match.group(2), int(match.group(3))
        layers = bench["layers"]
        rows[(op, storage, context)] = {
            "bytes_per_token": bench["bytes_per_token"],
            "us_per_layer": bench["real_time"] / layers * {"us": 1, "ms": 1e3, "ns": 1e-3}[
                bench["time_unit"]],
            "roofline": bench["roofline"],
        }
    return rows


def panel(out, x0, y0, width, height, title, values, unit):
    """values: list of (operator, storage, value)."""
    top = max(v for _, _, v in values) * 1.15 or 1.0
    out.append(f'<text x="{x0 + width / 2}" y="{y0 - 10}" text-anchor="middle" '
               f'font-size="14" font-weight="bold">{escape(title)}</text>')
    out.append(f'<line x1="{x0}" y1="{y0 + height}" x2="{x0 + width}" y2="{y0 + height}" '
               'stroke="black"/>')
    group = width / len(OPERATORS)
    bar = group / (len(STORAGES) + 1)
    for i, op in enumerate(OPERATORS):
        gx = x0 + i * group
        out.append(f'<text x="{gx + group / 2}" y="{y0 + height + 16}" text-anchor="middle" '
                   f'font-size="11">{op}</text>')
        for j, storage in enumerate(STORAGES):
            found = [v for o, s, v in values if o == op and s == storage]
            if not found:
                continue
            value = found[0]
            h = height * value / top
            x = gx + bar / 2 + j * bar
            out.append(f'<rect x="{x:.1f}" y="{y0 + height - h:.1f}" width="{bar * 0.9:.1f}" '
                       f'height="{h:.1f}" fill="{STORAGES[storage]}"/>')
            label = f"{value:.2f}" if value < 10 else f"{value:.0f}"
            out.append(f'<text x="{x + bar * 0.45:.1f}" y="{y0 + height - h - 3:.1f}" '
                       f'text-anchor="middle" font-size="9">{label}</text>')
    out.append(f'<text x="{x0 - 8}" y="{y0 + height / 2}" font-size="11" text-anchor="end">'
               f'{escape(unit)}</text>')


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    rows = load(sys.argv[1])
    if not rows:
        sys.exit("no median Decode/... rows in " + sys.argv[1])
    context = max(c for _, _, c in rows)
    pick = lambda key: [(o, s, r[key]) for (o, s, c), r in rows.items() if c == context]
    width, height = 980, 330
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif">', '<rect width="100%" height="100%" fill="white"/>']
    panel(out, 60, 50, 260, 220, "KV cache per token and layer", pick("bytes_per_token"), "bytes")
    panel(out, 380, 50, 260, 220, f"Decode, context {context}", pick("us_per_layer"),
          "us/layer")
    panel(out, 700, 50, 260, 220, "Roofline (1 = at the limit)", pick("roofline"), "")
    for j, (storage, colour) in enumerate(STORAGES.items()):
        out.append(f'<rect x="{60 + j * 90}" y="{height - 22}" width="12" height="12" '
                   f'fill="{colour}"/><text x="{76 + j * 90}" y="{height - 12}" '
                   f'font-size="11">{storage} cache</text>')
    out.append("</svg>")
    with open(sys.argv[2], "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
