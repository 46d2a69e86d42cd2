-- Tamper evidence: every event carries the SHA-256 chaining it to all the
-- events before it in position order (see store::chain). The store computes
-- it inside the append's transaction, under the append lock, over exactly
-- the text it stores.
ALTER TABLE events ADD COLUMN hash TEXT;

-- The one update ever allowed: giving a row written before this migration
-- its hash, once, changing nothing else. Deletes and truncates stay refused.
CREATE FUNCTION events_hash_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.hash IS NULL AND NEW.hash IS NOT NULL
       AND (NEW.position, NEW.stream_id, NEW.version, NEW.event_id, NEW.event_type,
            NEW.schema_version, NEW.data, NEW.metadata, NEW.recorded_at)
           IS NOT DISTINCT FROM
           (OLD.position, OLD.stream_id, OLD.version, OLD.event_id, OLD.event_type,
            OLD.schema_version, OLD.data, OLD.metadata, OLD.recorded_at) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'events are immutable';
END;
$$;

DROP TRIGGER events_no_update_or_delete ON events;
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION events_hash_once();
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_immutable();

-- From now on every event arrives with its hash: a writer that does not know
-- the chain (an older binary in a rolling upgrade) is refused, not let in to
-- leave a hole the chain would report as damage.
CREATE FUNCTION events_hash_required() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.hash IS NULL THEN
        RAISE EXCEPTION 'an event needs its hash';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER events_hash_required BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_hash_required();
