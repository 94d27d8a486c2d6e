"""`central` command line: a thin typer layer over the library (STYLE.md §10).

Exit codes: 0 ok, 1 error (a `CentralError` turned into one clear line), 2 usage.
Commands register on the module-level `app`; `central.demo.run` adds `demo` (registered below).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from central import CentralError, __version__
from central.cli.options import ConfigOpt, DbOpt
from central.cli.output import error

app = typer.Typer(
    name="central",
    help="Fieldlink central: MQTT ingest, storage, API and the duty officers' console.",
    epilog="Examples\n\n"
           "central demo --http-port 8080\n\n"
           "central login --url http://127.0.0.1:8080 --user duty-01\n\n"
           "central alarms list --ack unacknowledged\n\n"
           "central init --db sqlite:////var/lib/fieldlink/central.db\n\n"
           "central serve --db sqlite:////var/lib/fieldlink/central.db"
           " --mqtt-host 127.0.0.1 --mqtt-port 1883\n\n"
           "central serve --config /etc/fieldlink/central.toml",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)  # a path in an error stays one piece to copy


def _version(value: bool) -> None:
    if value:
        typer.echo(f"central {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Fieldlink central.

    Example: central serve --db sqlite:///central.db --mqtt-port 1883
    """


@app.command(short_help="Run the API, the console and MQTT ingest.  "
                        "e.g. central serve --db sqlite:///central.db --mqtt-port 1883")
def serve(
    config: ConfigOpt = None,
    db: DbOpt = None,
    mqtt_host: Annotated[str | None, typer.Option(help="MQTT broker host.")] = None,
    mqtt_port: Annotated[int | None, typer.Option(help="MQTT broker port.")] = None,
    mqtt_client_id: Annotated[str | None, typer.Option(help="Fixed MQTT client id.")] = None,
    shared: Annotated[bool | None, typer.Option(
        "--shared/--no-shared", help="Subscribe via $share/central/... (several workers).")] = None,
    http_host: Annotated[str | None, typer.Option(help="HTTP listen address.")] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port.")] = None,
    offline_after: Annotated[float | None, typer.Option(
        help="Seconds of silence after which a gateway shows offline.")] = None,
    log_json: Annotated[bool | None, typer.Option(
        "--log-json/--log-pretty", help="Log format; default JSON unless stderr is a tty.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Run the HTTP API, the console and MQTT ingest until stopped.

    Settings come from --config (else $FIELDLINK_CONFIG, else /etc/fieldlink/central.toml
    if it exists), then FIELDLINK_CENTRAL_* variables, then these flags.

    Example: central serve --db sqlite:///central.db --mqtt-port 1883
    """
    import asyncio

    from central.app import create_app
    from central.commands.keys import check_signing_key
    from central.config.settings import load_settings
    from central.health.service import make_server, run_service
    from central.identity.enrolment_api import check_ca
    from central.storage import open_storage
    from runtime.logs import configure_logging

    try:
        settings = load_settings(
            config, env=os.environ, db_url=db, mqtt_host=mqtt_host, mqtt_port=mqtt_port,
            mqtt_client_id=mqtt_client_id, mqtt_shared=shared, http_host=http_host,
            http_port=http_port, offline_after_s=offline_after)
        open_storage(settings.db_url)  # checks the URL now, not as a traceback at start-up
        check_ca(settings)  # a CA key others may read: refuse to start (DESIGN.md §8)
        # PostgreSQL without shared pki_dir/command_key_path, or a command key gateways
        # pinned that is gone or different: refuse to start (central.commands.keys)
        asyncio.run(check_signing_key(settings))
    except CentralError as exc:
        error(err, exc)
        raise typer.Exit(1) from exc
    configure_logging("central", json=log_json, level=log_level)
    try:
        # Type=notify: READY=1 once storage is open and ingest subscribed, WATCHDOG=1, a
        # bounded stop on SIGTERM (central.health.service).
        app_ = create_app(settings)
        server = make_server(app_, settings.http_host, settings.http_port)
        asyncio.run(run_service(app_, server))
    except CentralError as exc:
        error(err, exc)
        raise typer.Exit(1) from exc
    if not server.started:
        # uvicorn failed to start (port taken, lifespan failed); it has logged why.
        raise typer.Exit(1)


@app.command(short_help="Create central's database (once).  "
                        "e.g. central init --db sqlite:////var/lib/fieldlink/central.db")
def init(
    config: ConfigOpt = None,
    db: DbOpt = None,
) -> None:
    """Create central's database with its tables, so that `central user add` can make the
    first admin before central first starts (`central serve` makes it too, on first start).
    The other commands that work on the database refuse one that does not exist. On an
    existing database it only applies new migrations.

    Example: central init --config /etc/fieldlink/central.toml
    """
    import asyncio

    from central.cli.database import DatabaseMissingError, describe, require_existing_database
    from central.config.settings import SettingsError, load_settings
    from central.storage import open_storage

    async def create(url: str) -> None:
        async with open_storage(url):
            pass

    try:
        settings = load_settings(config, env=os.environ, db_url=db)
        if settings.db_url == "sqlite:///:memory:":
            raise SettingsError("db_url", "an in-memory database is gone when the command "
                                          "ends: give a file or a PostgreSQL URL")
        try:
            require_existing_database(settings.db_url)
            existed = True
        except DatabaseMissingError:
            existed = False
        asyncio.run(create(settings.db_url))
    except CentralError as exc:
        error(err, exc)
        raise typer.Exit(1) from exc
    where = describe(settings.db_url)
    typer.echo(f"central's database at {where} is up to date" if existed
               else f"created central's database at {where}")


@app.command(short_help="Broker + central + a simulated fleet, one command.  "
                        "e.g. central demo --http-port 8080")
def demo(
    data_dir: Annotated[Path, typer.Option(help="Where central's database, the gateways' "
                                                "outboxes and the logs go.")] = Path("demo-data"),
    http_host: Annotated[str, typer.Option(help="HTTP listen address.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP port of the console and API.")] = 8080,
    broker: Annotated[str | None, typer.Option(
        help="Use this MQTT broker (mqtt://HOST:PORT) instead of the embedded one.")] = None,
    log_json: Annotated[bool | None, typer.Option(
        "--log-json/--log-pretty", help="Log format; default JSON unless stderr is a tty.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "warning",
    callresp_deadline_s: Annotated[float, typer.Option(
        min=1, max=600, help="叫应 round: deadline per send (re-send, escalate).")] = 10.0,
) -> None:
    """Run the whole system on this machine: an embedded MQTT broker on a free port,
    central, and a simulated fleet of 4 gateways, each an edge-agent process polling its own
    Modbus TCP simulator. Ctrl-C stops everything.

    Example: central demo --http-port 8080
    """
    import asyncio

    from central.demo.run import run_demo
    from runtime.logs import configure_logging

    configure_logging("central", json=log_json, level=log_level)
    try:
        asyncio.run(run_demo(data_dir=data_dir, http_host=http_host, http_port=http_port,
                             broker=broker, callresp_deadline_s=callresp_deadline_s))
    except KeyboardInterrupt:
        pass
    except (CentralError, OSError, RuntimeError) as exc:
        error(err, exc)
        raise typer.Exit(1) from exc


# --- identities (DESIGN.md §8): central ca …, central gateway …, central broker-config
from central.identity.pki_cli import broker_config as _broker_config  # noqa: E402
from central.identity.pki_cli import ca_app, gateway_app  # noqa: E402

app.add_typer(ca_app, name="ca")
app.add_typer(gateway_app, name="gateway")
app.command("broker-config", short_help="Write a production Mosquitto config (mTLS, ACLs, CRL).  "
            "e.g. central broker-config --out /etc/mosquitto/fieldlink --host mqtt.example")(
    _broker_config)
# --- people and audit (DESIGN.md §8): `central user …`, `central audit …`
from central.identity.cli import audit_app, user_app  # noqa: E402

app.add_typer(user_app)
app.add_typer(audit_app)
# --- end people and audit
# --- the operator CLI (issue 15): a running central's HTTP API as the logged-in user
from central.cli.areas_import import register as register_areas_file  # noqa: E402
from central.cli.duty import alarms_app, commands_app  # noqa: E402
from central.cli.operator import areas_app, gateways_app, login_command, logout_command  # noqa: E402
from central.cli.warnings import warnings_app  # noqa: E402

app.command("login", short_help="Log in to a running central for the commands below.  "
            "e.g. central login --url http://127.0.0.1:8080 --user duty-01")(login_command)
app.command("logout", short_help="End the saved session.  e.g. central logout")(logout_command)
app.add_typer(gateways_app)
app.add_typer(alarms_app)
app.add_typer(commands_app)
app.add_typer(warnings_app)
register_areas_file(areas_app)  # central areas import|export
app.add_typer(areas_app)
# --- end operator CLI


# Where the Debian package puts central's settings (packaging/README.md). Every command that
# takes --config reads it when neither -c nor FIELDLINK_CONFIG names another file; without
# it, settings come from FIELDLINK_CENTRAL_* variables and flags alone, as before.
DEFAULT_CONFIG = Path("/etc/fieldlink/central.toml")


def config_defaults(command: object, path: str) -> dict[str, object]:
    """A click `default_map` giving `--config` the value `path` in every (sub)command."""
    found: dict[str, object] = {}
    for name, sub in (getattr(command, "commands", None) or {}).items():
        if inner := config_defaults(sub, path):
            found[name] = inner
    if any(getattr(p, "name", None) == "config" for p in getattr(command, "params", ())):
        found["config"] = path
    return found


def default_config(env: Mapping[str, str]) -> str | None:
    """$FIELDLINK_CONFIG, else /etc/fieldlink/central.toml when it exists, else None."""
    if env.get("FIELDLINK_CONFIG"):
        return env["FIELDLINK_CONFIG"]
    return str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None


def main() -> None:
    """Console-script entry point (`central`)."""
    from typer.main import get_command

    from runtime.logs import configure_logging

    # The one-shot commands (user, audit, gateway, ca, broker-config) log warnings and up to
    # stderr, so stdout stays their output (and valid --json). `serve` and `demo` configure
    # their own: structlog caches loggers, so it must be configured once only, and only here
    # in an entry point (never inside a command, where tests would inherit it).
    if sys.argv[1:2] not in (["serve"], ["demo"]):
        configure_logging("central", json=False, level="warning")
    path = default_config(os.environ)
    defaults = config_defaults(get_command(app), path) if path else None
    try:
        app(default_map=defaults)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
