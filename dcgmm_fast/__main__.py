"""``python -m dcgmm_fast ...`` is the ``dcgmm`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
