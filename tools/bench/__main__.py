import sys

from tools.bench import run_benchmark

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    if len(args) != 1:
        raise SystemExit("usage: python -m tools.bench NAME [--quick]")
    sys.exit(run_benchmark(args[0], quick="--quick" in sys.argv))
