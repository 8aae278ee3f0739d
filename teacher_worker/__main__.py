from distill.cli import app

import sys

app(["teacher", *sys.argv[1:]])
