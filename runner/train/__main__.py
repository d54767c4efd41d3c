"""`python -m runner.train` is the same as `t2i-train`."""

from .cli import main

main()
