from distill.cli import app

app()
