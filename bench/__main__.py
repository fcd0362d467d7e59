import argparse
import sys

from .cases import all_cases
from .harness import run_suite


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="fusedlayers microbenchmarks: fused vs "
                                     "eager PyTorch vs torch.compile, timed interleaved in one run.")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a CI-sized run)")
    parser.add_argument("--case", action="append", help="run only cases whose name starts with this (repeatable)")
    parser.add_argument("--impl", action="append", help="run only implementations whose name starts with this")
    parser.add_argument("--out", default="bench/results", help="folder for results.json (default: bench/results)")
    parser.add_argument("--warm-cache", action="store_true", help="let cold starts reuse the inductor cache")
    args = parser.parse_args(argv)
    cases = [c for c in all_cases(args.quick) if not args.case or any(c.name.startswith(p) for p in args.case)]
    if not cases:
        names = ", ".join(c.name for c in all_cases(args.quick))
        parser.error(f"no case matches {args.case}; the cases are: {names}")
    run_suite(cases, args.impl, args.quick, args.out, args.warm_cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
