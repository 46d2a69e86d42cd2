-- Which node runs each product's writer (issue 19). A lease is taken,
-- renewed and released by single conditional statements; its times are the
-- database's clock, so the nodes' own clocks never need to agree. The
-- epoch grows each time the lease changes hands (or is taken again after
-- it lapsed), so a holder renews only the lease it was granted. This is
-- routing and liveness, not the fence: the product stream's expected
-- version still refuses any writer that decided on a stale state.
CREATE TABLE product_leases (
    product_id  TEXT PRIMARY KEY,
    node_id     TEXT NOT NULL,
    -- The owner's advertised base URL, where other nodes forward to.
    url         TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);
