"""The `asl` command line: one module per command group, each parsing its arguments, calling the
library and rendering the results with rich (`app` holds what they share)."""
from .app import app
from . import runs, sweeps, shifts, profile, models  # noqa: E402,F401  (each registers its commands, in this order)
from .profile import Form  # noqa: F401


def main() -> None:
    app(prog_name="asl")
