"""Run the benchmark suite: ``python -m benchmarks.run --preset smoke`` (see ``--help``).

Examples::

  python -m benchmarks.run --preset smoke                       # seconds, CPU or GPU
  python -m benchmarks.run --preset paper,small --out benchmarks/results
  python -m benchmarks.run --shape 30x48x80 --kernel-size 18x24x24 --stride 16x8x8 \\
      --heads 24 --head-dim 128 --backends cuda,cudnn --dtypes bf16

Writes ``<preset>.json``, ``<preset>.md`` and ``<preset>.png`` into ``--out``.
The same command is ``jax-gna bench``.
"""

import sys

from jax_gna.bench import main

if __name__ == "__main__":
    sys.exit(main())
