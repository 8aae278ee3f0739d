import sys

from distill.cli import app

app(["student", *sys.argv[1:]])
