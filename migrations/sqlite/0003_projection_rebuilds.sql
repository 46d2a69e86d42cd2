-- Leases of running rebuilds: one row per projection being rebuilt, so two
-- rebuilds of one projection (from two terminals or two nodes) never fill the
-- same new generation. A rebuild renews its lease as it goes; a lease whose
-- holder died expires and the next rebuild takes it over.
CREATE TABLE projection_rebuilds (
    projection  TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);
