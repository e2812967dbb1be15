"""The `behalf` command line: stable command names that scripts and operators depend on."""

from __future__ import annotations

import sys

import click

from behalf.cli.admin import keys, migrate
from behalf.cli.audit import audit_group
from behalf.cli.common import AppContext
from behalf.cli.delegations import delegations, revoke
from behalf.cli.dev import dev
from behalf.cli.identity import agent, provider
from behalf.cli.runs import run, runs
from behalf.cli.scheduling import requeue, schedule, scheduler
from behalf.cli.serve import api, sandbox, worker


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """behalf: run AI agents unattended, on behalf of users."""
    app = ctx.ensure_object(AppContext)
    ctx.call_on_close(app.close)


cli.add_command(migrate)
cli.add_command(keys)
cli.add_command(api)
cli.add_command(dev)
cli.add_command(worker)
cli.add_command(sandbox)
cli.add_command(run)
cli.add_command(runs)
cli.add_command(delegations)
cli.add_command(revoke)
cli.add_command(schedule)
cli.add_command(requeue)
cli.add_command(scheduler)
cli.add_command(provider)
cli.add_command(agent)
cli.add_command(audit_group)


def main(args: list[str] | None = None) -> int:
    """Run the CLI; usage errors are one line on stderr and exit 2."""
    try:
        cli.main(args=args, prog_name="behalf", standalone_mode=False)
    except click.UsageError as exc:
        click.echo(f"behalf: {exc.format_message()}", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"behalf: {exc.format_message()}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("behalf: aborted", err=True)
        return 1
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry_point()
