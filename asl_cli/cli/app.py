"""The `asl` application and what its command groups share: the consoles, tables that fit an
80-column terminal, one-line errors and the recipe arguments."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup


class _Commands(TyperGroup):
    """The one place where errors become exit statuses: the package's own errors (asl_cli.errors,
    each carrying its status) and file-system errors (unwritable or invalid output paths, full
    disks) end the command with one clear line instead of a traceback."""

    def invoke(self, ctx):
        from asl_cli.errors import AslError

        try:
            return super().invoke(ctx)
        except AslError as e:
            next_step = getattr(e, "next_step", None)
            fail(f"{e}. {next_step}" if next_step else str(e), code=e.exit_code)
        except BrokenPipeError:  # output piped into a program that stopped reading (e.g. head)
            raise typer.Exit(0) from None
        except OSError as e:
            name = getattr(e, "filename", None)
            if isinstance(e, FileExistsError) and name and Path(name).is_file():
                text = f"Not a directory: {name} is a file where a folder is needed"
            else:
                text = f"{e.strerror or e}" + (f": {name}" if name else "")
            err.print(f"[bold red]error:[/] {text}", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Commands,
    name="asl",
    help="Active shift layer (Jeon & Kim, NeurIPS 2018): train, evaluate, ablate and profile the paper's networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)


def show(t: Table) -> None:
    """Prints a table that stays readable in an 80-column terminal: light borders, and every
    value keeps its full text (a narrow column wraps its header rather than cutting a number)."""
    from rich import box
    from rich.text import Text

    t.box, t.pad_edge, t.collapse_padding = box.SIMPLE_HEAD, False, True
    for col in t.columns:
        widths = [Text.from_markup(c).cell_len if isinstance(c, str) else 0 for c in col.cells]
        words = [len(w) for w in str(col.header).split()]
        width = max(widths + words, default=1)
        if width <= 24:  # values keep their width; longer text (a note, an error) takes what is left, wrapped
            col.width = width
        col.overflow = "fold"
    console.print(t)


def fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, markup=True, highlight=False)
    raise typer.Exit(code)


def fmt(v) -> str:
    return "" if v is None else f"{v:g}"


def split_recipe(args: list[str]) -> tuple[Optional[str], list[str]]:
    """The first argument without '=' is the recipe; the rest are key=value overrides."""
    args = list(args or [])
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def recipes_epilog() -> str:
    from asl_cli.config import list_recipes

    return ("Recipes: " + ", ".join(list_recipes()) + ". Every configuration key, its default and the values it takes: "
            "asl config [RECIPE] [KEY=VALUE]... Examples: asl train; asl train asnet20_16x1 data.dataset=cifar100; "
            "asl train --resume runs/RUN")


class Runtime(str, Enum):
    """Where a model runs for eval, predict and profile models."""
    torch = "torch"
    onnxruntime = "onnxruntime"
