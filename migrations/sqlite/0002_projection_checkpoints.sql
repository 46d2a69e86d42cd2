-- Read-model bookkeeping: one row per projection.
--
-- A projection's rows live in tables suffixed with its generation
-- (`sale_progress_g3`) behind a view of the plain name (`sale_progress`) that
-- readers query. A rebuild fills generation N+1 beside the live one and then,
-- in one transaction, moves the view and this row and drops generation N, so
-- readers always get answers. The tables are created by the projections crate
-- from its own definitions: they are derived data and never migrated in place.
--
-- position: the last event applied; updated in the same transaction as the
--   rows, so a crash neither loses nor repeats an event.
-- schema_version: the projection code's table shape; a mismatch at start-up
--   triggers a rebuild.
CREATE TABLE projection_checkpoints (
    projection      TEXT    PRIMARY KEY,
    generation      INTEGER NOT NULL CHECK (generation > 0),
    schema_version  INTEGER NOT NULL,
    position        INTEGER NOT NULL CHECK (position >= 0),
    updated_at      TEXT    NOT NULL
);
