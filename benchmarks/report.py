"""Turn pytest-benchmark JSON files into the Markdown tables of BENCHMARKS.md (ratios per group).

Usage: python benchmarks/report.py bench_basis.json bench_decode.json
"""

import json
import re
import sys
from collections import defaultdict


def impl_name(bench) -> str:
    name = bench["name"].split("[")[0].replace("test_", "")
    params = bench.get("params") or {}
    if "refine" in params:
        name += " (refined)" if params["refine"] else " (grid only)"
    for k, v in params.items():
        if k not in ("L", "dtype", "refine"):
            name += f" {k}={v}"
    return name


def main(paths):
    groups = defaultdict(list)
    machine = None
    for p in paths:
        data = json.load(open(p))
        machine = machine or data.get("machine_info", {})
        for b in data["benchmarks"]:
            groups[b["group"]].append(b)
    if machine:
        cpu = machine.get("cpu", {}).get("brand_raw", "?")
        print(f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} logical CPUs, "
              f"Python {machine.get('python_version', '?')}\n")
    def order(g):
        m = re.search(r"L=(\d+)", g)
        return g.split()[0], int(m.group(1)) if m else 0, g

    for group in sorted(groups, key=order):
        rows = groups[group]
        ours = [b for b in rows if impl_name(b).startswith("locdiff")]
        base = min((b["stats"]["median"] for b in ours), default=None)
        print(f"#### {group}\n")
        print("| implementation | median ms | time / locdiff best | rounds | accuracy |")
        print("|---|---:|---:|---:|---|")
        for b in sorted(rows, key=lambda b: b["stats"]["median"]):
            med = b["stats"]["median"]
            info = b.get("extra_info", {})
            acc = ", ".join(f"{k}={v:.2g}" for k, v in info.items())
            ratio = f"{med / base:.2f}x" if base else "-"
            print(f"| {impl_name(b)} | {med * 1e3:.2f} | {ratio} | {b['stats']['rounds']} | {acc} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
