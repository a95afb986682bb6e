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
    seq        INTEGER NOT NULL DEFAULT 0, -- database-wide save counter: what changed since seq N?
    deleted    INTEGER NOT NULL DEFAULT 0  -- 1: a tombstone (POST /delete): html '' and data null
);

-- A page is deleted by a tombstone (POST /delete, `flask delete-page`), never
-- by removing its row: its version goes on from there, so a client holding a
-- later version than a re-created page's is never told "nothing changed",
-- and max(seq) never goes back, so no save reuses a seq the watchers passed.
CREATE TRIGGER page_versions_keep BEFORE DELETE ON page_versions BEGIN
    SELECT RAISE(ABORT, 'changefeed pages are deleted with POST /delete or `flask delete-page SLUG` (a tombstone), not by removing their row');
END;

-- Lets each server process find the pages saved since it last looked
-- without scanning every page.
CREATE INDEX page_versions_seq ON page_versions (seq);

-- The database's identity, sent with every answer: a client whose `since`
-- belongs to another epoch (a new or restored database) starts over from 0.
-- One row; `python migrate.py --new-epoch` replaces it after a restore.
CREATE TABLE epoch (
    value TEXT NOT NULL  -- 16 lower-case hex digits
);
INSERT INTO epoch (value) VALUES (lower(hex(randomblob(8))));

-- Idempotency-Key of each successful save, kept for a while, so a retried
-- request gets the first answer instead of creating a second version.
CREATE TABLE idempotency_keys (
    key         TEXT PRIMARY KEY NOT NULL,
    fingerprint TEXT NOT NULL,  -- sha256 of the request: a key reused for another request is refused
    slug        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    updated_at  TEXT NOT NULL,
    created_at  REAL NOT NULL   -- unix time; keys older than the window are deleted
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- How many pages and bytes the database holds, kept by triggers in the same
-- transaction as each save, so the limits on both (CHANGEFEED_MAX_PAGES,
-- CHANGEFEED_MAX_STORED_BYTES) cost one row to read. Bytes are the html and
-- data of every page (UTF-8), plus what each Idempotency-Key kept for
-- retries costs: its key and slug and 200 bytes for the rest of its row and
-- its index entries. A tombstone is no page, and holds 4 bytes ('' and null).
CREATE TABLE storage (
    pages INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT INTO storage (pages, bytes) VALUES (0, 0);
CREATE TRIGGER storage_insert AFTER INSERT ON page_versions BEGIN
    UPDATE storage SET pages = pages + 1 - new.deleted,
        bytes = bytes + length(CAST(new.html AS BLOB)) + length(CAST(new.data AS BLOB));
END;
CREATE TRIGGER storage_update AFTER UPDATE OF html, data, deleted ON page_versions BEGIN
    UPDATE storage SET pages = pages + old.deleted - new.deleted, bytes = bytes
        + length(CAST(new.html AS BLOB)) + length(CAST(new.data AS BLOB))
        - length(CAST(old.html AS BLOB)) - length(CAST(old.data AS BLOB));
END;
CREATE TRIGGER storage_delete AFTER DELETE ON page_versions BEGIN
    UPDATE storage SET pages = pages - 1 + old.deleted,
        bytes = bytes - length(CAST(old.html AS BLOB)) - length(CAST(old.data AS BLOB));
END;
CREATE TRIGGER storage_key_insert AFTER INSERT ON idempotency_keys BEGIN
    UPDATE storage SET bytes = bytes + 200 + length(CAST(new.key AS BLOB)) + length(CAST(new.slug AS BLOB));
END;
CREATE TRIGGER storage_key_update AFTER UPDATE OF key, slug ON idempotency_keys BEGIN
    UPDATE storage SET bytes = bytes + length(CAST(new.key AS BLOB)) + length(CAST(new.slug AS BLOB))
        - length(CAST(old.key AS BLOB)) - length(CAST(old.slug AS BLOB));
END;
CREATE TRIGGER storage_key_delete AFTER DELETE ON idempotency_keys BEGIN
    UPDATE storage SET bytes = bytes - 200 - length(CAST(old.key AS BLOB)) - length(CAST(old.slug AS BLOB));
END;

-- Presence: who has a page open now (presence.py). One row per tab that
-- beats; a tab whose beats stop is deleted after the TTL, so the table holds
-- only the tabs open now. A tab that said "gone" keeps its row (not listed)
-- until the TTL, so its next beat still waits the minimum interval: a tab
-- cannot dodge that interval by alternating "viewing" and "gone".
-- Written with synchronous=NORMAL: it is not worth
-- an fsync, and a crash loses at most a few seconds of beats.
CREATE TABLE page_editors (
    slug      TEXT NOT NULL,
    user_key  TEXT NOT NULL,   -- "sub:<token sub>", or "client:<client_id>" without access control
    client_id TEXT NOT NULL,   -- one per tab
    name      TEXT NOT NULL,   -- shown as text only
    state     TEXT NOT NULL CHECK (state IN ('viewing', 'editing', 'gone')),
    seen_at   REAL NOT NULL,   -- unix time of the last beat
    PRIMARY KEY (slug, user_key, client_id)
);
CREATE INDEX page_editors_seen_at ON page_editors (seen_at);

-- Each page's presence version: a new one from the clock on every change of
-- who is there or what they do, never on a beat that changes nothing. A
-- page nobody has had open for a while has no row (version 0: nobody).
CREATE TABLE presence (
    slug       TEXT PRIMARY KEY NOT NULL,
    version    INTEGER NOT NULL,
    changed_at REAL NOT NULL
);
CREATE INDEX presence_version ON presence (version);
CREATE TABLE presence_clock (
    value INTEGER NOT NULL
);
INSERT INTO presence_clock (value) VALUES (0);
