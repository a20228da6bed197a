"""Bytes per token against fidelity for every setting: the same as `labelstore bench`.

    python benchmarks/bench_compression.py [--no-demo] [--synthetic-vocab 32000,131072,262144]

Writes benchmarks/results/compression.json, compression.md (the README table) and compression.png.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from labelstore.tools.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
