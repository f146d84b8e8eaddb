"""``python -m sakd.cli`` and the ``sakd`` console script (the launch scripts call this path)."""

import sys

from sakd.commands.main import main

if __name__ == "__main__":
    sys.exit(main())
