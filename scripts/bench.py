"""`attention-bench` from a checkout: `python scripts/bench.py --help`."""

import sys

from attention_compiler.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
