"""What every command shares: one-line errors with exit code 2, progress bars, data options."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable

import click
from tqdm import tqdm

from abs_deploy.errors import UserError


class CliError(click.ClickException):
    """A user error: one line on stderr, exit code 2 (as click's own usage errors)."""

    exit_code = 2


def guarded(fn: Callable) -> Callable:
    """Turn library `UserError`s into one clear line instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise CliError(str(e)) from None
        except KeyboardInterrupt:
            raise CliError("interrupted") from None
    return wrapper


def progress(it: Iterable, total: int, desc: str) -> Iterable:
    # Bars only on a terminal: logs and CI get the per-epoch summary lines instead.
    return tqdm(it, total=total, desc=desc, leave=False, file=sys.stderr, disable=None,
                dynamic_ncols=True)


def epoch_printer(prefix: str) -> Callable:
    def show(log) -> None:
        extra = "".join(f"  {k} {_fmt(v)}" for k, v in log.extra.items())
        click.echo(f"{prefix} epoch {log.epoch:3d}  loss {log.loss:.4f}  "
                   f"train {100 * log.train_acc:5.1f}%  val {100 * log.val_acc:5.1f}%  "
                   f"{log.seconds:5.1f}s{extra}")
    return show


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{n:,.0f}"


data_dir_option = click.option(
    "--data-dir", type=click.Path(exists=True, file_okay=False),
    help="Folder holding the dataset (CIFAR python pickles, or class subfolders of images).")


def checkpoint_data_options(fn: Callable) -> Callable:
    """--dataset (default: the one the checkpoint was trained on) and --data-dir."""
    from abs_deploy.data import DATASETS

    fn = data_dir_option(fn)
    return click.option("--dataset", type=click.Choice(DATASETS), default=None,
                        help="Default: the dataset the checkpoint was trained on.")(fn)


def train_options(epochs: int | None = None, lr: float | None = None,
                  batch_size: int = 64) -> Callable:
    """--epochs/--lr/--batch-size/--seed; a None default means "the method's own default"."""
    def decorate(fn):
        for opt in reversed([
            click.option("--epochs", type=click.IntRange(1), default=epochs,
                         show_default=epochs is not None),
            click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=lr,
                         show_default=lr is not None),
            click.option("--batch-size", type=click.IntRange(1), default=batch_size,
                         show_default=True),
            click.option("--seed", type=int, default=0, show_default=True),
        ]):
            fn = opt(fn)
        return fn
    return decorate
