"""Markdown rows for docs/performance.md from the JSON files of ``bench_fit.py --json``.

    python benchmarks/table.py results/*.json

One row per file, in the column order of the GPU table in docs/performance.md, then the
extrapolated grid of each file against its bound at raw timm speed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = (
    "| backbone | compile | raw train img/s | hiercls fit img/s | ratio | raw infer img/s | predict img/s "
    "| ratio | peak GiB (fit) | CV grid h | bound h | grid / bound |"
)


def row(result: dict) -> str:
    hours = result["cv_grid_hours"]["total"]
    bound = result.get("cv_bound_hours")
    peak = result["hiercls_train"]["peak_memory_gib"]
    cells = [
        result["backbone"],
        "yes" if result["compile"] else "no",
        f"{result['raw_train']['images_per_second']:,.0f}",
        f"{result['hiercls_train']['images_per_second']:,.0f}",
        f"{result['train_ratio']:.3f}",
        f"{result['raw_infer']['images_per_second']:,.0f}",
        f"{result['hiercls_predict']['images_per_second']:,.0f}",
        f"{result['predict_ratio']:.3f}",
        "-" if peak is None else f"{peak:.1f}",
        f"{hours:.2f}",
        "-" if bound is None else f"{bound:.2f}",
        "-" if bound is None else f"{hours / bound:.3f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    results = [json.loads(Path(p).read_text(encoding="utf-8")) for p in argv]
    devices = sorted({r["device"] for r in results})
    print(f"Device: {', '.join(devices)}; torch {', '.join(sorted({r['torch'] for r in results}))}\n")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for result in results:
        print(row(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
