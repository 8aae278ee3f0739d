"""``python -m producers SOURCE --config FILE``: the same command as ``distill produce``."""

import sys

from distill.cli import app

app(["produce", *sys.argv[1:]])
