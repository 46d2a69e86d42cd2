-- Support finds a customer by account id (or by an order's or a deposit's
-- account) and shows their username: users looked up by account.
CREATE INDEX users_by_account ON users (account_id);
