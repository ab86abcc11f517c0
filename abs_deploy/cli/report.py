"""`abs report`: rebuild an export's report.html (and report.md, report.png) from its
report.json, e.g. after a newer version of the page or by hand on another machine."""

from __future__ import annotations

import click

from abs_deploy.cli.common import Command, guarded


@click.command("report", cls=Command)
@click.argument("run", type=click.Path())
@guarded
def report_cmd(run: str) -> None:
    """Rebuild report.html, report.md and report.png from RUN's report.json. RUN is the
    folder an export wrote (`abs-export model.pt --onnx` puts it beside the model) or the
    report.json itself."""
    from abs_deploy.export.report import rebuild

    paths = rebuild(run)
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))
