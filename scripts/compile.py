"""`attention-compile` from a checkout: `python scripts/compile.py --help`."""

import sys

from attention_compiler.cli.compile import main

if __name__ == "__main__":
    sys.exit(main())
