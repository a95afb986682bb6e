"""The command line: `python -m changefeed_client save SLUG FILE`, `watch SLUG`, `watch --prefix P`, `feed`.

The service's address and token come from `--url` and `--token`, or from
`CHANGEFEED_URL` and `CHANGEFEED_TOKEN` (better for a token: it stays out of
the process list and the shell's history).
"""

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ChangefeedError, InvalidRequest
from .models import Reset
from .sync import Client


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with Client(args.url, token=args.token or None) as client:
            return args.run(client, args)
    except ChangefeedError as error:
        detail = f" {json.dumps(error.fields)}" if isinstance(error, InvalidRequest) else ""
        print(f"changefeed: {error}{detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... watch home | head -1`
        sys.stderr.close()
        return 0


def save(client: Client, args: argparse.Namespace) -> int:
    try:
        html = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"changefeed: cannot read {args.file}: {error}")
    try:
        data = json.loads(args.data) if args.data is not None else None
    except json.JSONDecodeError as error:
        raise SystemExit(f"changefeed: --data is not JSON: {error}")
    print_line(client.save(args.slug, html, data, args.base_version))
    return 0


def watch(client: Client, args: argparse.Namespace) -> int:
    if (args.slug is None) == (args.prefix is None):
        raise SystemExit("changefeed: watch takes a SLUG or --prefix P (one of them)")
    pages = client.watch(args.slug) if args.prefix is None else client.watch(prefix=args.prefix)
    for page in pages:
        print_line(page)
    return 0


def feed(client: Client, args: argparse.Namespace) -> int:
    for item in client.feed(args.since, prefix=args.prefix, payload="full" if args.full else "version"):
        print_line(item)
    return 0


def print_line(value: Any) -> None:
    """One JSON object on a line of its own, written at once (a pipe would otherwise hold it).

    A feed's reset is `{"reset": true, "epoch": ...}`: drop what you hold.
    """
    line = {"reset": True, **dataclasses.asdict(value)} if isinstance(value, Reset) else dataclasses.asdict(value)
    print(json.dumps(line, ensure_ascii=False), flush=True)


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m changefeed_client", description="Save and watch changefeed pages.")
    main.add_argument("--url", default=os.environ.get("CHANGEFEED_URL", "http://127.0.0.1:5000"),
                      help="the service (default: $CHANGEFEED_URL, else http://127.0.0.1:5000)")
    main.add_argument("--token", default=os.environ.get("CHANGEFEED_TOKEN"),
                      help="a bearer token (default: $CHANGEFEED_TOKEN)")
    commands = main.add_subparsers(required=True, metavar="COMMAND")

    one = commands.add_parser("save", help="save FILE's text (- for standard input) as the page's html")
    one.add_argument("slug")
    one.add_argument("file")
    one.add_argument("--data", help="the page's data, as JSON")
    one.add_argument("--base-version", type=int, help="refuse (409) unless this is the stored version")
    one.set_defaults(run=save)

    one = commands.add_parser("watch", help="print each new version of a page, or of the pages under a prefix")
    one.add_argument("slug", nargs="?")
    one.add_argument("--prefix")
    one.set_defaults(run=watch)

    one = commands.add_parser("feed", help="print the database's changes with the cursor to resume from")
    one.add_argument("--since", help="a cursor printed before: go on after it")
    one.add_argument("--prefix")
    one.add_argument("--full", action="store_true", help="with each page's html and data")
    one.set_defaults(run=feed)
    return main
