"""`python -m minihires COMMAND ...` (the commands live in `minihires.cli`)."""
import sys

from minihires.cli import main

if __name__ == "__main__":
    sys.exit(main())
