"""`python -m ditlab.cli ...`, as Ray Job entrypoints call it."""

from ditlab.cli import console

console()
