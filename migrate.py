"""Create or upgrade the changefeed database: `python migrate.py` (`--help` for the options).

The migrations themselves live in changefeed/stores/schema.py, beside the
schemas they upgrade to (schema.sql, schema_postgres.sql).
"""

import sys

from changefeed.stores.schema import main

if __name__ == "__main__":
    sys.exit(main())
