"""The `abs` command group. Commands only parse, call the library and print."""

from __future__ import annotations

import click

from abs_deploy.cli.common import Group
from abs_deploy.cli.demo import demo
from abs_deploy.cli.export import export_main, validate
from abs_deploy.cli.profile import profile_cmd
from abs_deploy.cli.report import report_cmd
from abs_deploy.cli.train import bops_cmd, finetune, pretrain, search


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="abs-deploy")
def main() -> None:
    """abs-deploy: search per-layer bits and pruning, export integer ONNX, validate it."""


for _cmd in (pretrain, search, finetune, bops_cmd, profile_cmd, validate, report_cmd, demo):
    main.add_command(_cmd)

__all__ = ["main", "export_main"]
