-- The event log: the only source of truth. Rows are never updated or deleted.
--
-- position: global order, from an identity. Every append takes the same
--   transaction-level advisory lock before it writes, so appends commit one
--   at a time and positions become visible in increasing order: a reader that
--   has seen position N never later finds a smaller one. Rolled-back appends
--   leave holes, which readers simply step over.
-- version: 1-based, contiguous per stream; (stream_id, version) is the
--   optimistic-concurrency fence.
-- event_id: makes appends idempotent.
-- data, metadata: JSON text kept byte for byte as written (jsonb would
--   reorder keys, and the audit hash chain covers the exact bytes).
CREATE TABLE events (
    position        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id       TEXT        NOT NULL,
    version         BIGINT      NOT NULL CHECK (version > 0),
    event_id        UUID        NOT NULL,
    event_type      TEXT        NOT NULL,
    schema_version  INTEGER     NOT NULL CHECK (schema_version > 0),
    data            TEXT        NOT NULL,
    metadata        TEXT        NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL,
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version),
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);

-- History is immutable: a rollback is a new, compensating event.
CREATE FUNCTION events_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are immutable';
END;
$$;

CREATE TRIGGER events_no_update_or_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_immutable();

CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_immutable();
