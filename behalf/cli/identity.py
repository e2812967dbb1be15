"""`behalf provider …` and `behalf agent …`: the authorisation servers and the OAuth clients.

    behalf provider add NAME --issuer URL [--api-base URL] [--signin]
    behalf provider list
    behalf agent register NAME --provider P --scopes "a b" [--required-scopes "a"]
                              [--auth private_key_jwt|client_secret_basic|client_secret_post]
    behalf agent add NAME --provider P --client-id ID --scopes "a b" [--auth …]
                         (--client-secret-file PATH | --private-key-file PATH)
    behalf agent rotate-key NAME [--grace SECONDS]
    behalf agent list

Agents belong to this deployment's environment (`BEHALF_ENV`). Every change is audited with
`--operator`; every listing takes `--json`; bad arguments exit 2 with a one-line reason.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from behalf.cli.common import AppContext, emit, json_option, operator_option, pass_app
from behalf.runtime import oauth_client
from delegation import providers
from delegation.errors import BehalfError
from delegation.providers import AUTH_METHODS

F = TypeVar("F", bound=Callable[..., Any])
MAX_SECRET_FILE_BYTES = 64 * 1024


def _errors(func: F) -> F:
    """Malformed input exits 2 (a usage error); refusals by us or the AS exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except providers.InvalidInput as exc:
            raise click.UsageError(str(exc)) from None
        except BehalfError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]


def _scopes(raw: str | None, *, allow_empty: bool = False) -> list[str]:
    return providers.parse_scopes(raw or "", allow_empty=allow_empty)


def _read_secret_file(path: str, what: str) -> str:
    """A secret from a file or stdin ('-'): never from the command line, where `ps` shows it."""
    try:
        if path == "-":
            raw = sys.stdin.read(MAX_SECRET_FILE_BYTES + 1)
        else:
            file = Path(path)
            if file.stat().st_size > MAX_SECRET_FILE_BYTES:
                raise click.UsageError(f"{what} file {path} is too large")
            raw = file.read_text()
    except OSError as exc:
        raise click.UsageError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise click.UsageError(f"the {what} is too large")
    return raw.strip()


# --- providers -------------------------------------------------------------------------------


@click.group()
def provider() -> None:
    """Authorisation servers: discover, store, list."""


@provider.command("add")
@click.argument("name")
@click.option("--issuer", required=True, help="The AS's issuer URL (metadata is discovered).")
@click.option("--api-base", default=None, help="Base URL of the API the AS protects.")
@click.option("--signin", is_flag=True,
              help="Users sign in to the pages with this AS: register behalf's own "
                   "openid-only client (client_secret_basic) at it.")
@operator_option
@json_option
@pass_app
@_errors
def provider_add(app: AppContext, name: str, issuer: str, api_base: str | None, signin: bool,
                 operator: str, as_json: bool) -> None:
    """Discover NAME's metadata (RFC 8414, then OpenID Connect discovery) and store it."""
    deps = app.deps
    oauth = oauth_client(deps)
    info = providers.add_provider(deps.sessions, oauth, deps.clock, name=name, issuer=issuer,
                                  api_base=api_base, operator=operator)
    result: dict[str, Any] = info.as_dict()
    if signin:
        client = providers.register_signin_client(
            deps.sessions, deps.vault, oauth, deps.clock, provider_name=name,
            environment=deps.settings.env, public_url=deps.settings.public_url,
            operator=operator)
        result["signin_client_id"] = client.client_id
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"provider {info.name}: {info.issuer}")
    click.echo(f"  token endpoint  {info.token_endpoint}")
    click.echo(f"  OpenID Connect  {'yes' if info.openid else 'no'}; dynamic registration "
               f"{'yes' if info.dynamic_registration else 'no'}")
    if signin:
        redirect = providers.callback_url(deps.settings.public_url,
                                          providers.SIGNIN_CALLBACK_PATH)
        click.echo(f"  users sign in with client {result['signin_client_id']} "
                   f"(redirect {redirect})")


@provider.command("list")
@json_option
@pass_app
@_errors
def provider_list(app: AppContext, as_json: bool) -> None:
    """The stored providers."""
    rows = [p.as_dict() for p in providers.list_providers(app.deps.sessions)]
    emit(rows, as_json, ["name", "issuer", "api_base", "openid", "dynamic_registration"])


# --- agents ----------------------------------------------------------------------------------


@click.group()
def agent() -> None:
    """Agents: one OAuth client per agent per environment."""


def _print_agent(info: providers.AgentInfo, as_json: bool, verb: str) -> None:
    if as_json:
        click.echo(json.dumps(info.as_dict(), indent=2))
        return
    click.echo(f"{verb} agent {info.name} in environment {info.environment} "
               f"({info.auth_method}, scopes {' '.join(info.scopes)}); client_id:", err=True)
    click.echo(info.client_id)


@agent.command("register")
@click.argument("name")
@click.option("--provider", "provider_name", required=True, help="A provider added before.")
@click.option("--scopes", required=True, help='Space-separated scopes, e.g. "reports:read".')
@click.option("--required-scopes", default="",
              help="Scopes a user may not untick (a grant without them is refused).")
@click.option("--auth", "auth_method", type=click.Choice(AUTH_METHODS),
              default="private_key_jwt", show_default=True)
@operator_option
@json_option
@pass_app
@_errors
def agent_register(app: AppContext, name: str, provider_name: str, scopes: str,
                   required_scopes: str, auth_method: str, operator: str,
                   as_json: bool) -> None:
    """Register NAME as a new confidential client at the provider (RFC 7591); print its
    client_id. With private_key_jwt the key pair is generated here and only the public key
    leaves; the private key (or a client secret) is stored sealed."""
    deps = app.deps
    info = providers.register_agent(
        deps.sessions, deps.vault, oauth_client(deps), deps.clock, name=name,
        provider_name=provider_name, environment=deps.settings.env, scopes=_scopes(scopes),
        required_scopes=_scopes(required_scopes, allow_empty=True), auth_method=auth_method,
        public_url=deps.settings.public_url, operator=operator)
    _print_agent(info, as_json, "registered")


@agent.command("add")
@click.argument("name")
@click.option("--provider", "provider_name", required=True, help="A provider added before.")
@click.option("--client-id", required=True, help="The client_id the AS gave you.")
@click.option("--scopes", required=True, help='Space-separated scopes, e.g. "reports:read".')
@click.option("--required-scopes", default="",
              help="Scopes a user may not untick (a grant without them is refused).")
@click.option("--auth", "auth_method", type=click.Choice(AUTH_METHODS),
              default="client_secret_basic", show_default=True)
@click.option("--client-secret-file", default=None, metavar="PATH",
              help="File holding the client secret ('-' for stdin).")
@click.option("--private-key-file", default=None, metavar="PATH",
              help="File holding the private key as an RSA JWK with a kid ('-' for stdin).")
@operator_option
@json_option
@pass_app
@_errors
def agent_add(app: AppContext, name: str, provider_name: str, client_id: str, scopes: str,
              required_scopes: str, auth_method: str, client_secret_file: str | None,
              private_key_file: str | None, operator: str, as_json: bool) -> None:
    """Record a client registered by hand at the provider (secrets are read from files, never
    from the command line, and stored sealed)."""
    secret = None
    private_jwk = None
    if auth_method == "private_key_jwt":
        if private_key_file is None:
            raise click.UsageError("--auth private_key_jwt needs --private-key-file")
        try:
            private_jwk = json.loads(_read_secret_file(private_key_file, "private key"))
        except ValueError:
            raise click.UsageError("the private key file is not a JSON Web Key") from None
    else:
        if client_secret_file is None:
            raise click.UsageError(f"--auth {auth_method} needs --client-secret-file")
        secret = _read_secret_file(client_secret_file, "client secret")
    deps = app.deps
    info = providers.add_agent(
        deps.sessions, deps.vault, deps.clock, name=name, provider_name=provider_name,
        environment=deps.settings.env, client_id=client_id, auth_method=auth_method,
        scopes=_scopes(scopes), required_scopes=_scopes(required_scopes, allow_empty=True),
        secret=secret, private_jwk=private_jwk, operator=operator)
    _print_agent(info, as_json, "added")


@agent.command("rotate-key")
@click.argument("name")
@click.option("--grace", type=click.FloatRange(0, 3600),
              default=providers.ROTATION_GRACE_SECONDS, show_default=True,
              help="Seconds the old key stays published after the switch (workers cache "
                   "agent credentials for 30 s).")
@operator_option
@json_option
@pass_app
@_errors
def agent_rotate_key(app: AppContext, name: str, grace: float, operator: str,
                     as_json: bool) -> None:
    """Give NAME a new private_key_jwt key: publish old + new at the AS (RFC 7592), check the
    AS accepts the new one, switch to it, then (after --grace) withdraw the old one. Run it
    again after an interruption: it finishes the rotation it had started."""
    deps = app.deps

    def wait(seconds: float) -> None:
        if seconds > 0:
            click.echo(f"new key in use; the old one stays published for {seconds:.0f} s "
                       "while workers switch...", err=True)
            time.sleep(seconds)

    rotation = providers.rotate_key(
        deps.sessions, deps.vault, oauth_client(deps), deps.clock, name=name,
        environment=deps.settings.env, public_url=deps.settings.public_url,
        operator=operator, grace_seconds=grace, sleep=wait)
    if as_json:
        click.echo(json.dumps({"agent": rotation.agent.as_dict(), "old_kid": rotation.old_kid,
                               "new_kid": rotation.new_kid}, indent=2))
        return
    click.echo(f"agent {name}: key {rotation.old_kid} replaced by {rotation.new_kid}")


@agent.command("list")
@click.option("--all-environments", is_flag=True, help="Not only this deployment's.")
@json_option
@pass_app
@_errors
def agent_list(app: AppContext, all_environments: bool, as_json: bool) -> None:
    """The registered agents (of this environment unless --all-environments)."""
    environment = None if all_environments else app.deps.settings.env
    rows = [a.as_dict() for a in providers.list_agents(app.deps.sessions,
                                                       environment=environment)]
    for row in rows:
        row["scopes"] = " ".join(row["scopes"]) if not as_json else row["scopes"]
    emit(rows, as_json, ["name", "environment", "provider", "client_id", "auth_method",
                         "scopes", "status"])
