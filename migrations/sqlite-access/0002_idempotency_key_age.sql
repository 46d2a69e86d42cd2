-- The purge of idempotency keys past their retention selects by age: without
-- an index each pass would scan every key kept (millions after a sale).
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at_ms);
