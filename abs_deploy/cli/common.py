"""What every command shares: one error path with one line and a distinct exit code per kind,
the user's say-so for code a checkpoint names, progress bars, data options."""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator

import click
from tqdm import tqdm

from abs_deploy import distributed
from abs_deploy.checkpoint import MAX_INPUT_VALUES
from abs_deploy.distributed import Dist
from abs_deploy.errors import UserError
from abs_deploy.export.errors import ExportFailed
from abs_deploy.files import reason
from abs_deploy.models.registry import trusted_imports

# One exit code per kind of ending; README's "Exit codes" table lists the same.
OK, VALIDATION_FAILED, BAD_INPUT, INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = {
    OK: "success",
    VALIDATION_FAILED: "validation failed: the export or `abs validate` ran, and a parity or "
                       "agreement check missed",
    BAD_INPUT: "bad input: a file, an option, a model that does not fit the data, an output "
               "that cannot be written (missing, read-only or full disk)",
    INTERRUPTED: "interrupted: Ctrl-C or SIGTERM",
}


class CliError(click.ClickException):
    """Bad input (a file, an option, a full or read-only disk): one line on stderr, exit 2."""

    exit_code = BAD_INPUT


class ValidationFailed(click.ClickException):
    """The work ran but its result missed a check (export parity, a file a runtime refuses):
    one line, exit 1."""

    exit_code = VALIDATION_FAILED


class Interrupted(click.ClickException):
    """Ctrl-C or SIGTERM: one line, exit 130 (128 + SIGINT, as shells report it)."""

    exit_code = INTERRUPTED


class _OneLineUsage:
    """Usage errors (a bad option value, a missing argument, an unknown command) as one line
    and exit 2 like every other bad input, instead of click's usage block."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise CliError(_usage_line(e, info_name)) from None


class Command(_OneLineUsage, click.Command):
    """A command with one-line usage errors."""


class Group(_OneLineUsage, click.Group):
    """The `abs` group, with one-line usage errors for itself and its commands."""

    command_class = Command

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            raise CliError(_usage_line(e, ctx.command_path)) from None


def _usage_line(e: click.UsageError, name: str | None) -> str:
    where = e.ctx.command_path if e.ctx else name
    return _one_line(f"{e.format_message()} (see {where} --help)")


def guarded(fn: Callable) -> Callable:
    """The one error path of every command: what the user can cause ends as one line and its
    exit code, never a traceback. Temporary files are removed by the library's own clean-up,
    which runs as these exceptions pass through it (SIGTERM is raised as an interrupt for that
    reason)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_interrupts():
                return fn(*args, **kwargs)
        except UserError as e:
            raise CliError(_one_line(str(e))) from None
        except ExportFailed as e:
            raise ValidationFailed(_one_line(f"export failed: {e}")) from None
        except OSError as e:  # a disk error the library did not name: still the user's disk
            where = f"{e.filename}: " if e.filename else ""
            raise CliError(_one_line(f"{where}{reason(e)}")) from None
        except KeyboardInterrupt:
            raise Interrupted("interrupted") from None
    return wrapper


_SIGNALLED = threading.Event()


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (kill, a scheduler's time limit) unwinds like Ctrl-C, so clean-up runs and the
    exit code says "interrupted"; the previous handlers are restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _SIGNALLED.clear()
    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _raise_interrupt(signum: int, frame: object) -> None:
    # Remembered as well as raised: Python prints and drops an exception raised inside a
    # finaliser (a generator or DataLoader iterator closed by the garbage collector), and the
    # work would go on; the progress bars raise it again at their next step.
    _SIGNALLED.set()
    raise KeyboardInterrupt


class _Bar(tqdm):
    def __iter__(self):
        for item in super().__iter__():
            if _SIGNALLED.is_set():
                raise KeyboardInterrupt
            yield item


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def model_code_options(fn: Callable) -> Callable:
    """--model and --trust-model-code, for commands that read a checkpoint: the user's say-so
    for a checkpoint whose architecture is an import path (code the file names)."""
    @functools.wraps(fn)
    def wrapper(*args, allowed_model: str | None, trust_model_code: bool, **kwargs):
        with trusted_imports(*([allowed_model] if allowed_model else []),
                             any_path=trust_model_code):
            return fn(*args, **kwargs)

    wrapper = click.option(
        "--trust-model-code", is_flag=True,
        help="Build whatever architecture the checkpoint names by import path, i.e. run "
             "that code. Only for files you trust; --model names one path instead.")(wrapper)
    return click.option(
        "--model", "allowed_model", metavar="PKG.MODULE:FACTORY", default=None,
        help="Allow the checkpoint's architecture to be built by this import path (the "
             "same one it names). Zoo models need nothing.")(wrapper)


class FiniteFloat(click.FloatRange):
    """A FloatRange that refuses nan and inf (which compare false to every bound and so pass
    click's own range check)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def progress(it: Iterable, total: int, desc: str) -> Iterable:
    # Bars only on a terminal: logs and CI get the per-epoch summary lines instead.
    return _Bar(it, total=total, desc=desc, leave=False, file=sys.stderr, disable=None,
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
    help="Folder holding the dataset (Fashion-MNIST idx files, CIFAR python pickles, or class "
         "subfolders of images).")


def checkpoint_data_options(fn: Callable) -> Callable:
    """--dataset (default: the one the checkpoint was trained on) and --data-dir."""
    from abs_deploy.data import DATASETS

    fn = data_dir_option(fn)
    return click.option("--dataset", type=click.Choice(DATASETS), default=None,
                        help="Default: the dataset the checkpoint was trained on.")(fn)


def train_options(epochs: int | None = None, lr: float | None = None,
                  batch_size: int = 64) -> Callable:
    """--epochs/--lr/--batch-size/--seed/--device/--workers/--sync-bn; a None default means
    "the method's own default"."""
    def decorate(fn):
        for opt in reversed([
            click.option("--epochs", type=click.IntRange(1), default=epochs,
                         show_default=epochs is not None),
            click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=lr,
                         show_default=lr is not None),
            click.option("--batch-size", type=click.IntRange(1), default=batch_size,
                         show_default=True,
                         help="The global batch: under torchrun each process takes an equal "
                              "share of it."),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("--device", default="auto", show_default=True,
                         help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps; "
                              "under torchrun each process takes the GPU of its local rank. "
                              "Checkpoints are written with CPU tensors either way."),
            click.option("--workers", type=click.IntRange(0), default=0, show_default=True,
                         help="DataLoader worker processes per training process (image "
                              "decoding and augmentation off the training loop)."),
            click.option("--sync-bn", is_flag=True,
                         help="Under torchrun: BatchNorm statistics over the batches of all "
                              "processes, not each process's own share."),
        ]):
            fn = opt(fn)
        return fn
    return decorate


@contextlib.contextmanager
def training_processes(device: str) -> Iterator[tuple[Dist, str]]:
    """This command's device, and its place among torchrun's processes (rank 0 of 1 when
    started on its own): joined before any work, left however the command ends."""
    dist, resolved = distributed.start(device)
    try:
        yield dist, resolved
    finally:
        distributed.stop()


def echo_on(dist: Dist) -> Callable[..., None]:
    """`click.echo` on rank 0, nothing on the others: one copy of every line."""
    return click.echo if dist.is_main else (lambda *args, **kwargs: None)


def bits_list(text: str) -> tuple[int, ...]:
    """`--candidates 2,4,8` as ints (their order and range the search checks)."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise CliError(f"--candidates must be comma-separated bitwidths, got '{text}'") from None


def input_shape_option(text: str) -> tuple[int, int, int]:
    """`--input-shape C,H,W` read and bounded (a shape too large to run is refused here)."""
    try:
        c, h, w = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise CliError(f"--input-shape must be C,H,W, got '{text}'") from None
    if min(c, h, w) < 1:
        raise CliError(f"--input-shape must be three positive sizes C,H,W, got '{text}'")
    if c * h * w > MAX_INPUT_VALUES:
        raise CliError(f"--input-shape {text} is {c * h * w:,} values per image, more than "
                       f"{MAX_INPUT_VALUES:,}: too large to measure on CPU")
    return c, h, w
