"""python -m quorumblk: the quorumblk command."""
import sys

from .cli import main

sys.exit(main())
