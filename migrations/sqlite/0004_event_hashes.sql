-- Tamper evidence: every event carries the SHA-256 chaining it to all the
-- events before it in position order (see store::chain). The store computes
-- it inside the append's write transaction over exactly the text it stores.
ALTER TABLE events ADD COLUMN hash TEXT;

-- The one update ever allowed: giving a row written before this migration
-- its hash, once, changing nothing else. Everything else stays immutable.
DROP TRIGGER events_no_update;
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
WHEN OLD.hash IS NOT NULL
  OR NEW.hash IS NULL
  OR NEW.position IS NOT OLD.position
  OR NEW.stream_id IS NOT OLD.stream_id
  OR NEW.version IS NOT OLD.version
  OR NEW.event_id IS NOT OLD.event_id
  OR NEW.event_type IS NOT OLD.event_type
  OR NEW.schema_version IS NOT OLD.schema_version
  OR NEW.data IS NOT OLD.data
  OR NEW.metadata IS NOT OLD.metadata
  OR NEW.recorded_at IS NOT OLD.recorded_at
BEGIN
    SELECT RAISE(ABORT, 'events are immutable');
END;

-- From now on every event arrives with its hash: a writer that does not know
-- the chain (an older binary in a rolling upgrade) is refused, not let in to
-- leave a hole the chain would report as damage.
CREATE TRIGGER events_hash_required BEFORE INSERT ON events
WHEN NEW.hash IS NULL
BEGIN
    SELECT RAISE(ABORT, 'an event needs its hash');
END;
