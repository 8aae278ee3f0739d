import sys

from distill.cli import app

app(["teacher", *sys.argv[1:]])
