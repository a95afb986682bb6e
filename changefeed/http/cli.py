"""The service's commands: `flask changefeed migrate`, `flask changefeed delete-page`, `flask changefeed token create`.

The extension adds the `changefeed` group to any app; the standalone app
(app.py) also keeps `flask delete-page` and `flask token create` at the top.
Each command works on the app's own services (services.py).
"""

import click
from flask import current_app
from flask.cli import AppGroup, with_appcontext
from marshmallow import ValidationError

from changefeed.core.outcomes import Conflict, NoSuchPage, NotStored, OutcomeUnknown
from changefeed.core.schemas import DeleteSchema
from changefeed.stores.schema import LATEST, CannotMigrate, describe, migrate, migrate_postgres

from .services import services


def migrate_version(database_url: str, path: str) -> int:
    """Create or upgrade the database the settings name; return the schema version it was at (0: new)."""
    found: int = migrate_postgres(database_url) if database_url else migrate(path)
    return found


def migrate_database(database_url: str, path: str) -> str:
    """Create or upgrade the database the settings name; return what was done, in one line."""
    where = describe(database_url) if database_url else path
    found = migrate_version(database_url, path)
    if found == LATEST:
        return f"{where}: already at schema version {LATEST}; nothing to do."
    if found == 0:
        return f"{where}: created at schema version {LATEST}."
    return f"{where}: upgraded from schema version {found} to {LATEST}."


@click.command("migrate")
@with_appcontext
def migrate_command() -> None:
    """Create or upgrade the database (CHANGEFEED_DB, or CHANGEFEED_DATABASE_URL)."""
    config = current_app.config  # not services(): they open the database this makes
    try:
        click.echo(migrate_database(config["CHANGEFEED_DATABASE_URL"], config["CHANGEFEED_DB"]))
    except CannotMigrate as exc:
        raise click.ClickException(str(exc)) from None


@click.command("delete-page")
@click.argument("slug")
@click.option("--base-version", type=int, default=None, help="delete only if the page is still at this version")
@with_appcontext
def delete_page(slug: str, base_version: int | None) -> None:
    """Delete page SLUG: subscribers are told it is gone; a later save re-creates it, one version up.

    The supported way to delete a page from a shell (never SQL: see schema.sql).
    """
    try:
        item = DeleteSchema().load({"slug": slug, "base_version": base_version})
        deleted = services().store.delete(item["slug"], item["base_version"])
    except ValidationError as exc:
        raise click.ClickException(f"{exc.messages}") from None
    except NoSuchPage as exc:
        raise click.ClickException(f"no page {slug!r} to delete"
                                   + (f" (deleted already at version {exc.version})" if exc.version else ""))
    except Conflict as exc:
        raise click.ClickException(f"{slug!r} is at version {exc.version}, not {base_version}: nothing deleted")
    except (NotStored, OutcomeUnknown) as exc:
        raise click.ClickException(f"not deleted: {exc}") from None
    click.echo(f"{deleted.slug}: deleted at version {deleted.version} (epoch {deleted.epoch})")


token = AppGroup("token", help="Tokens for development and scripts.")


@token.command("create")
@click.option("--sub", required=True, help="who the token names, e.g. editor-1")
@click.option("--read", "read", multiple=True, help="slugs or prefixes* it may read (repeatable)")
@click.option("--write", "write", multiple=True, help="slugs or prefixes* it may write (repeatable)")
@click.option("--metrics", is_flag=True, help="it may read GET /metrics")
@click.option("--ttl", default="1h", help="how long it lasts: 90s, 15m, 1h, 7d")
def create_token(sub: str, read: tuple[str, ...], write: tuple[str, ...], ttl: str, metrics: bool) -> None:
    """Print a token for --sub with the given rights, valid for --ttl."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        seconds = int(ttl[:-1]) * units[ttl[-1]] if ttl[-1] in units else int(ttl)
    except (ValueError, IndexError):
        raise click.BadParameter(f"{ttl!r}: use a number with s, m, h or d, e.g. 1h", param_hint="--ttl") from None
    try:
        click.echo(services().verifier.mint(sub, read, write, seconds, metrics))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


group = AppGroup("changefeed", help="The change feed: its database, its pages, its tokens.")
group.add_command(migrate_command)
group.add_command(delete_page)
group.add_command(token)
