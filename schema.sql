-- changefeed: one row per page (slug) holding its newest version.
-- The version is the whole change feed: a client that knows version N asks
-- for anything newer and gets the current row, so no event log is kept.
-- This is the latest schema, applied at once to a new database; migrate.py
-- upgrades older databases step by step to the same shape.

CREATE TABLE page_versions (
    slug       TEXT PRIMARY KEY NOT NULL,  -- lower case letters, digits, hyphens
    html       TEXT NOT NULL,              -- untrusted: shown only in a sandboxed iframe
    data       TEXT NOT NULL,              -- any JSON value, stored as compact JSON text
    version    INTEGER NOT NULL CHECK (version >= 1),
    updated_at TEXT NOT NULL,              -- ISO 8601, UTC, milliseconds
    seq        INTEGER NOT NULL DEFAULT 0  -- database-wide save counter: what changed since seq N?
);

-- Lets each server process find the pages saved since it last looked
-- without scanning every page.
CREATE INDEX page_versions_seq ON page_versions (seq);
