"""The `behalf` command line: stable command names that scripts and operators depend on."""

from __future__ import annotations

import importlib
import sys

import click

# name -> "module:attribute". Loaded on first use, so `behalf worker` does not import the HTTP
# stack (FastAPI, uvicorn, templates): ~30 MiB less in every job process.
COMMANDS: dict[str, str] = {
    "migrate": "behalf.cli.admin:migrate",
    "keys": "behalf.cli.admin:keys",
    "api": "behalf.cli.serve:api",
    "dev": "behalf.cli.dev:dev",
    "worker": "behalf.cli.serve:worker",
    "sandbox": "behalf.cli.serve:sandbox",
    "run": "behalf.cli.runs:run",
    "runs": "behalf.cli.runs:runs",
    "delegations": "behalf.cli.delegations:delegations",
    "revoke": "behalf.cli.delegations:revoke",
    "schedule": "behalf.cli.scheduling:schedule",
    "requeue": "behalf.cli.scheduling:requeue",
    "scheduler": "behalf.cli.scheduling:scheduler",
    "provider": "behalf.cli.identity:provider",
    "agent": "behalf.cli.identity:agent",
    "audit": "behalf.cli.audit:audit_group",
}


class LazyGroup(click.Group):
    """A group whose commands are imported when they are asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attribute = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attribute)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """behalf: run AI agents unattended, on behalf of users."""
    from behalf.cli.common import AppContext

    app = ctx.ensure_object(AppContext)
    ctx.call_on_close(app.close)


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
