"""Split a manifest into a development part and a test part, stratified by label (seeded).

Writes two CSVs with absolute image paths, so they can live anywhere (e.g. under runs/):

    python benchmarks/split_manifest.py ../shared/data/blood-cells/manifest.csv runs/bc-split --test 0.2

Used by docs/results.md to fit temperatures on a run's validation split and score them on
images neither training nor calibration saw.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from sklearn.model_selection import train_test_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="CSV with path,label[,group]; paths relative to its folder")
    parser.add_argument("out", type=Path, help="folder for dev.csv and test.csv")
    parser.add_argument("--test", type=float, default=0.2, help="share of images in test.csv (default 0.2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with args.manifest.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    root = args.manifest.resolve().parent
    for row in rows:
        row["path"] = str((root / row["path"]).resolve())
    dev, test = train_test_split(rows, test_size=args.test, random_state=args.seed,
                                 stratify=[r["label"] for r in rows])
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("dev.csv", dev), ("test.csv", test)):
        with (args.out / name).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(part)
        print(f"wrote {args.out / name}: {len(part)} images")


if __name__ == "__main__":
    main()
