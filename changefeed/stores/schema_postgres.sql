-- changefeed on PostgreSQL: the same tables as schema.sql, for several app
-- hosts sharing one database (CHANGEFEED_DATABASE_URL). `python migrate.py`
-- applies it to an empty database and records its version in schema_version.
-- There is no `seq` column: hosts learn of saves by LISTEN/NOTIFY, and
-- "what was saved since" is read by the writing transaction's id (`xact`).

CREATE TABLE page_versions (
    slug       text PRIMARY KEY,             -- lower case letters, digits, hyphens
    html       text NOT NULL,                -- untrusted: shown only in a sandboxed iframe
    data       text NOT NULL,                -- any JSON value, as compact JSON text (exactly as sent back)
    version    bigint NOT NULL CHECK (version >= 1),
    updated_at text NOT NULL,                -- ISO 8601, UTC, milliseconds, as on SQLite
    deleted    boolean NOT NULL DEFAULT false, -- a tombstone (POST /delete): html '' and data null
    xact       xid8 NOT NULL DEFAULT pg_current_xact_id()  -- the transaction that wrote this version
);

-- What was saved since a point: concurrent transactions commit out of the
-- order of any number they took, so a reader never trusts "xact > N". It
-- takes the rows below the oldest transaction still running (the snapshot's
-- xmin), which are all settled, and asks next time from there
-- (PostgresStore.saved_since): nothing committed late is ever skipped.
CREATE INDEX page_versions_xact ON page_versions (xact);
-- Every write names its transaction, whoever makes it (a save, an import, an operator's SQL).
CREATE FUNCTION changefeed_stamp_xact() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.xact := pg_current_xact_id();
    RETURN NEW;
END
$$;
CREATE TRIGGER page_versions_xact BEFORE UPDATE ON page_versions
    FOR EACH ROW EXECUTE FUNCTION changefeed_stamp_xact();

-- Pages are deleted by a tombstone, never by removing their row (see schema.sql).
CREATE FUNCTION changefeed_keep_pages() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'changefeed pages are deleted with POST /delete or `flask delete-page SLUG` (a tombstone), not by removing their row';
END
$$;
CREATE TRIGGER page_versions_keep BEFORE DELETE ON page_versions
    FOR EACH ROW EXECUTE FUNCTION changefeed_keep_pages();

-- The database's identity, sent with every answer (see schema.sql).
CREATE TABLE epoch (
    value text NOT NULL  -- 16 lower-case hex digits
);
INSERT INTO epoch (value) VALUES (substr(md5(random()::text || clock_timestamp()::text), 1, 16));

CREATE TABLE idempotency_keys (
    key         text PRIMARY KEY,
    fingerprint text NOT NULL,
    slug        text NOT NULL,
    version     bigint NOT NULL,
    updated_at  text NOT NULL,
    created_at  double precision NOT NULL  -- unix time
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- Pages and bytes held, kept by triggers in each save's transaction (see
-- schema.sql), in one of 16 shards: a save transaction first takes a shard
-- no other transaction holds (FOR UPDATE SKIP LOCKED) and names it in the
-- setting changefeed.shard, so saves of different pages never wait for each
-- other here, on any host. The limits read the sum, `storage`. A write that
-- names no shard (an import, an operator's SQL) counts in shard 0.
CREATE TABLE storage_shards (
    shard integer PRIMARY KEY,
    pages bigint NOT NULL,
    bytes bigint NOT NULL
);
INSERT INTO storage_shards (shard, pages, bytes) SELECT s, 0, 0 FROM generate_series(0, 15) s;
CREATE VIEW storage AS SELECT sum(pages)::bigint AS pages, sum(bytes)::bigint AS bytes FROM storage_shards;

CREATE FUNCTION changefeed_shard() RETURNS integer LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('changefeed.shard', true), '')::integer, 0)
$$;

CREATE FUNCTION changefeed_count_storage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE storage_shards SET pages = pages + (NOT NEW.deleted)::int,
                                  bytes = bytes + octet_length(NEW.html) + octet_length(NEW.data)
            WHERE shard = changefeed_shard();
    ELSIF TG_OP = 'UPDATE' THEN
        UPDATE storage_shards SET pages = pages + (NOT NEW.deleted)::int - (NOT OLD.deleted)::int,
                                  bytes = bytes + octet_length(NEW.html) + octet_length(NEW.data)
                                                - octet_length(OLD.html) - octet_length(OLD.data)
            WHERE shard = changefeed_shard();
    ELSE
        UPDATE storage_shards SET pages = pages - (NOT OLD.deleted)::int,
                                  bytes = bytes - octet_length(OLD.html) - octet_length(OLD.data)
            WHERE shard = changefeed_shard();
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER storage_count AFTER INSERT OR DELETE OR UPDATE OF html, data, deleted ON page_versions
    FOR EACH ROW EXECUTE FUNCTION changefeed_count_storage();

CREATE FUNCTION changefeed_count_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE storage_shards SET bytes = bytes + 200 + octet_length(NEW.key) + octet_length(NEW.slug)
            WHERE shard = changefeed_shard();
    ELSIF TG_OP = 'UPDATE' THEN
        UPDATE storage_shards SET bytes = bytes + octet_length(NEW.key) + octet_length(NEW.slug)
                                                - octet_length(OLD.key) - octet_length(OLD.slug)
            WHERE shard = changefeed_shard();
    ELSE
        UPDATE storage_shards SET bytes = bytes - 200 - octet_length(OLD.key) - octet_length(OLD.slug)
            WHERE shard = changefeed_shard();
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER storage_count_keys AFTER INSERT OR DELETE OR UPDATE OF key, slug ON idempotency_keys
    FOR EACH ROW EXECUTE FUNCTION changefeed_count_keys();

-- Presence: who has a page open now (see schema.sql).
CREATE TABLE page_editors (
    slug      text NOT NULL,
    user_key  text NOT NULL,
    client_id text NOT NULL,
    name      text NOT NULL,
    state     text NOT NULL CHECK (state IN ('viewing', 'editing', 'gone')),
    seen_at   double precision NOT NULL,
    PRIMARY KEY (slug, user_key, client_id)
);
CREATE INDEX page_editors_seen_at ON page_editors (seen_at);
CREATE TABLE presence (
    slug       text PRIMARY KEY,
    version    bigint NOT NULL,
    changed_at double precision NOT NULL
);
-- Hosts learn of presence changes by NOTIFY, so a sequence (no row to take turns on) hands out versions.
CREATE SEQUENCE presence_clock;

-- The schema version migrate.py last applied (SQLite keeps it in PRAGMA user_version).
CREATE TABLE schema_version (
    version integer NOT NULL
);
