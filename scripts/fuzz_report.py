"""Tabulates a FUSEDLAYERS_FUZZ_REPORT file of tests/test_properties.py (one JSON line per compared output): per
test and dtype, the outputs compared, the largest error against float64 and PyTorch's own largest error (in
units of the dtype's eps times max(1, |reference|)), and the largest ratio of ours to PyTorch's where PyTorch's
error is nonzero.

    FUSEDLAYERS_FUZZ_EXAMPLES=20000 FUSEDLAYERS_FUZZ_REPORT=/tmp/fuzz.jsonl python -m pytest tests/test_properties.py
    python scripts/fuzz_report.py /tmp/fuzz.jsonl
"""
import collections
import json
import sys

EPS = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}


def main(path: str) -> None:
    rows = collections.defaultdict(lambda: dict(n=0, err=0.0, err_torch=0.0, ratio=0.0))
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            unit = EPS[r["dtype"]] * max(1.0, r["scale"])
            row = rows[r["test"].split("::")[-1], r["dtype"]]
            row["n"] += 1
            row["err"] = max(row["err"], r["err"] / unit)
            row["err_torch"] = max(row["err_torch"], r["err_torch"] / unit)
            if r["err_torch"] > 0:
                row["ratio"] = max(row["ratio"], r["err"] / r["err_torch"])
    print("| test | dtype | outputs compared | max error (eps) | PyTorch's max error (eps) | max ratio to PyTorch's |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (test, dtype), row in sorted(rows.items()):
        print(f"| {test} | {dtype} | {row['n']} | {row['err']:.3g} | {row['err_torch']:.3g} | {row['ratio']:.3g} |")


if __name__ == "__main__":
    main(sys.argv[1])
