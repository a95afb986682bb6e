-- changefeed on PostgreSQL: the same tables as schema.sql, for several app
-- hosts sharing one database (CHANGEFEED_DATABASE_URL). `python migrate.py`
-- applies it to an empty database and records its version in schema_version.
-- There is no `seq` column: hosts learn of saves by LISTEN/NOTIFY, not by
-- reading the save order.

CREATE TABLE page_versions (
    slug       text PRIMARY KEY,             -- lower case letters, digits, hyphens
    html       text NOT NULL,                -- untrusted: shown only in a sandboxed iframe
    data       text NOT NULL,                -- any JSON value, as compact JSON text (exactly as sent back)
    version    bigint NOT NULL CHECK (version >= 1),
    updated_at text NOT NULL                 -- ISO 8601, UTC, milliseconds, as on SQLite
);

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

-- Pages and bytes held, kept by a trigger in each save's transaction, so
-- the limits cost one row to read (see schema.sql).
CREATE TABLE storage (
    pages bigint NOT NULL,
    bytes bigint NOT NULL
);
INSERT INTO storage (pages, bytes) VALUES (0, 0);

CREATE FUNCTION changefeed_count_storage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE storage SET pages = pages + 1, bytes = bytes + octet_length(NEW.html) + octet_length(NEW.data);
    ELSIF TG_OP = 'UPDATE' THEN
        UPDATE storage SET bytes = bytes + octet_length(NEW.html) + octet_length(NEW.data)
                                         - octet_length(OLD.html) - octet_length(OLD.data);
    ELSE
        UPDATE storage SET pages = pages - 1, bytes = bytes - octet_length(OLD.html) - octet_length(OLD.data);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER storage_count AFTER INSERT OR DELETE OR UPDATE OF html, data ON page_versions
    FOR EACH ROW EXECUTE FUNCTION changefeed_count_storage();

-- Presence: who has a page open now (see schema.sql).
CREATE TABLE page_editors (
    slug      text NOT NULL,
    user_key  text NOT NULL,
    client_id text NOT NULL,
    name      text NOT NULL,
    state     text NOT NULL CHECK (state IN ('viewing', 'editing')),
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
