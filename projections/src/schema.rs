//! The read-model tables, defined once, and the SQL generated from them.
//!
//! Every statement here is built from these constant definitions and a
//! generation number the projections crate owns; nothing from a request or
//! an event ever reaches SQL text (values are bound as one JSON parameter).
//! Columns are only `TEXT` and `BIGINT`, so one definition serves SQLite and
//! PostgreSQL alike.

/// A column's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// Text, never null.
    Text,
    /// Text or null.
    TextOrNull,
    /// A 64-bit integer, never null.
    Integer,
    /// A 64-bit integer or null.
    IntegerOrNull,
}

impl Type {
    fn sql(self) -> &'static str {
        match self {
            Type::Text => "TEXT NOT NULL",
            Type::TextOrNull => "TEXT",
            Type::Integer => "BIGINT NOT NULL",
            Type::IntegerOrNull => "BIGINT",
        }
    }

    fn postgres_record(self) -> &'static str {
        match self {
            Type::Text | Type::TextOrNull => "text",
            Type::Integer | Type::IntegerOrNull => "bigint",
        }
    }

    /// Whether values of this type are integers.
    pub fn is_integer(self) -> bool {
        matches!(self, Type::Integer | Type::IntegerOrNull)
    }
}

/// How rows reach a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// Rows are loaded, changed and written back by key.
    Upsert,
    /// Rows are only ever inserted; a second insert of a key is a bug.
    AppendOnly,
}

/// One read-model table.
#[derive(Debug)]
pub struct Table {
    /// The name readers query (a view onto the live generation).
    pub name: &'static str,
    /// Columns in order.
    pub columns: &'static [(&'static str, Type)],
    /// Primary key columns.
    pub key: &'static [&'static str],
    /// Secondary indexes: a name suffix and the indexed columns.
    pub indexes: &'static [(&'static str, &'static str)],
    /// How rows are written.
    pub writes: Writes,
}

/// The SQL dialect a statement is generated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Table {
    /// The physical table of one generation.
    pub fn physical(&self, generation: i64) -> String {
        assert!(generation > 0, "BUG: generations start at 1");
        format!("{}_g{generation}", self.name)
    }

    fn column_type(&self, column: &str) -> Type {
        self.columns
            .iter()
            .find(|(name, _)| *name == column)
            .map(|(_, kind)| *kind)
            .expect("BUG: key column is not a column")
    }

    /// Types of the key columns, in key order.
    pub fn key_types(&self) -> Vec<Type> {
        self.key.iter().map(|k| self.column_type(k)).collect()
    }

    /// `CREATE TABLE` and `CREATE INDEX` statements for one generation.
    pub fn create(&self, generation: i64) -> Vec<String> {
        let mut statements = vec![self.create_table(generation)];
        statements.extend(self.create_indexes(generation));
        statements
    }

    /// `CREATE TABLE` alone: upsert tables get their primary key (upserts
    /// need it), append-only tables get their key later, with the indexes.
    pub fn create_table(&self, generation: i64) -> String {
        let columns: Vec<String> = self
            .columns
            .iter()
            .map(|(name, kind)| format!("{name} {}", kind.sql()))
            .collect();
        let key = match self.writes {
            Writes::Upsert => format!(", PRIMARY KEY ({})", self.key.join(", ")),
            Writes::AppendOnly => String::new(),
        };
        format!(
            "CREATE TABLE {} ({}{key})",
            self.physical(generation),
            columns.join(", ")
        )
    }

    /// The indexes `create_table` leaves out: a rebuild fills the table first
    /// and builds these once (sorting) instead of inserting into them row by
    /// row at random places.
    pub fn create_indexes(&self, generation: i64) -> Vec<String> {
        let physical = self.physical(generation);
        let mut statements = Vec::new();
        if self.writes == Writes::AppendOnly {
            statements.push(format!(
                "CREATE UNIQUE INDEX {physical}_key ON {physical} ({})",
                self.key.join(", ")
            ));
        }
        for (suffix, indexed) in self.indexes {
            statements.push(format!(
                "CREATE INDEX {physical}_{suffix} ON {physical} ({indexed})"
            ));
        }
        statements
    }

    /// Statements that point the readers' view at one generation.
    pub fn point_view(&self, generation: i64, dialect: Dialect) -> Vec<String> {
        let physical = self.physical(generation);
        let drop = match dialect {
            Dialect::Sqlite => format!("DROP VIEW IF EXISTS {}", self.name),
            Dialect::Postgres => format!("DROP VIEW IF EXISTS {} CASCADE", self.name),
        };
        vec![
            drop,
            format!("CREATE VIEW {} AS SELECT * FROM {physical}", self.name),
        ]
    }

    /// Drops one generation's table (its indexes go with it).
    pub fn drop(&self, generation: i64) -> String {
        format!("DROP TABLE IF EXISTS {}", self.physical(generation))
    }

    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn on_conflict(&self) -> String {
        match self.writes {
            Writes::AppendOnly => String::new(),
            Writes::Upsert => {
                let updates: Vec<String> = self
                    .columns
                    .iter()
                    .filter(|(name, _)| !self.key.contains(name))
                    .map(|(name, _)| format!("{name} = excluded.{name}"))
                    .collect();
                format!(
                    " ON CONFLICT ({}) DO UPDATE SET {}",
                    self.key.join(", "),
                    updates.join(", ")
                )
            }
        }
    }

    /// Most rows one `write_values` statement takes (SQLite binds at most
    /// 32,766 parameters; a power of two so few statement shapes exist).
    pub fn values_rows_max(&self) -> usize {
        let fits = 32_766 / self.columns.len();
        let mut rows = 256;
        while rows > fits {
            rows /= 2;
        }
        rows
    }

    /// Writes `rows` rows given as bound parameters, column by column.
    pub fn write_values(&self, generation: i64, rows: usize) -> String {
        assert!(
            rows > 0 && rows <= self.values_rows_max(),
            "BUG: row count out of range"
        );
        let placeholders = vec!["?"; self.columns.len()].join(", ");
        let tuple = format!("({placeholders})");
        format!(
            "INSERT INTO {} ({}) VALUES {}{}",
            self.physical(generation),
            self.column_list(),
            vec![tuple; rows].join(", "),
            self.on_conflict()
        )
    }

    /// Writes rows given as one array per column (PostgreSQL `UNNEST`;
    /// parameter N is column N).
    pub fn write_arrays(&self, generation: i64) -> String {
        let arrays: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(index, (_, kind))| format!("${}::{}[]", index + 1, kind.postgres_record()))
            .collect();
        format!(
            "INSERT INTO {} ({columns}) SELECT * FROM UNNEST({}) AS r({columns}){}",
            self.physical(generation),
            arrays.join(", "),
            self.on_conflict(),
            columns = self.column_list(),
        )
    }

    /// Deletes rows by a single-column key; the keys are parameter 1.
    pub fn delete(&self, generation: i64, dialect: Dialect) -> String {
        assert_eq!(self.key.len(), 1, "BUG: only single-key tables delete rows");
        let physical = self.physical(generation);
        let key = self.key[0];
        match dialect {
            Dialect::Sqlite => {
                format!("DELETE FROM {physical} WHERE {key} IN (SELECT value FROM json_each(?1))")
            }
            Dialect::Postgres => format!(
                "DELETE FROM {physical} WHERE {key} IN (SELECT jsonb_array_elements_text($1::text::jsonb))"
            ),
        }
    }

    /// A JSON object of one row's columns, as SQL.
    pub fn row_object(&self, dialect: Dialect) -> String {
        let pairs: Vec<String> = self
            .columns
            .iter()
            .map(|(name, _)| format!("'{name}', {name}"))
            .collect();
        match dialect {
            Dialect::Sqlite => format!("json_object({})", pairs.join(", ")),
            Dialect::Postgres => format!("json_build_object({})::text", pairs.join(", ")),
        }
    }

    /// Loads rows by a single-column key; the keys are parameter 1.
    pub fn load(&self, generation: i64, dialect: Dialect) -> String {
        assert_eq!(self.key.len(), 1, "BUG: only single-key tables are loaded");
        assert_eq!(
            self.writes,
            Writes::Upsert,
            "BUG: append-only rows are never loaded"
        );
        let physical = self.physical(generation);
        let object = self.row_object(dialect);
        let key = self.key[0];
        match dialect {
            Dialect::Sqlite => format!(
                "SELECT {object} FROM {physical} WHERE {key} IN (SELECT value FROM json_each(?1))"
            ),
            Dialect::Postgres => format!(
                "SELECT {object} FROM {physical} WHERE {key} IN (SELECT jsonb_array_elements_text($1::text::jsonb))"
            ),
        }
    }

    /// Every row of the readers' view in key order (byte order for text).
    pub fn scan(&self, dialect: Dialect) -> String {
        self.scan_from(self.name, dialect)
    }

    /// Every row of one generation's table in key order: a snapshot reads the
    /// generation it saw, never a view a later swap re-pointed.
    pub fn scan_generation(&self, generation: i64, dialect: Dialect) -> String {
        self.scan_from(&self.physical(generation), dialect)
    }

    fn scan_from(&self, relation: &str, dialect: Dialect) -> String {
        let object = self.row_object(dialect);
        let order: Vec<String> = self
            .key
            .iter()
            .map(|k| match (dialect, self.column_type(k).is_integer()) {
                (Dialect::Postgres, false) => format!("{k} COLLATE \"C\""),
                _ => (*k).to_owned(),
            })
            .collect();
        format!(
            "SELECT {object} FROM {relation} ORDER BY {}",
            order.join(", ")
        )
    }
}

/// Per-product sale progress.
pub const SALE_PROGRESS: Table = Table {
    name: "sale_progress",
    columns: &[
        ("product_id", Type::Text),
        ("name", Type::Text),
        ("currency", Type::Text),
        ("quota", Type::Integer),
        ("confirmed", Type::Integer),
        ("reserved", Type::Integer),
        ("available", Type::Integer),
        ("orders", Type::Integer),
        ("refused", Type::Integer),
        ("released", Type::Integer),
        ("status", Type::Text),
        ("sale_open", Type::Integer),
        ("min_purchase", Type::Integer),
        ("max_purchase", Type::Integer),
        ("annual_rate_bps", Type::Integer),
        ("term_days", Type::Integer),
        ("principal_scheduled", Type::Integer),
        ("interest_days", Type::Integer),
        ("listed_at", Type::Text),
        ("opened_at", Type::TextOrNull),
        ("sold_out_at", Type::TextOrNull),
        ("updated_at", Type::Text),
        ("position", Type::Integer),
    ],
    key: &["product_id"],
    indexes: &[],
    writes: Writes::Upsert,
};

/// Per-account balances.
pub const ACCOUNT_BALANCES: Table = Table {
    name: "account_balances",
    columns: &[
        ("account_id", Type::Text),
        ("currency", Type::Text),
        ("available", Type::Integer),
        ("held", Type::Integer),
        ("total_deposited", Type::Integer),
        ("total_invested", Type::Integer),
        ("total_paid_out", Type::Integer),
        ("total_withdrawn", Type::Integer),
        ("version", Type::Integer),
        ("opened_at", Type::Text),
        ("updated_at", Type::Text),
        ("position", Type::Integer),
    ],
    key: &["account_id"],
    indexes: &[],
    writes: Writes::Upsert,
};

/// Money debited for an order, until the order is confirmed or refunded.
pub const ACCOUNT_HOLDS: Table = Table {
    name: "account_holds",
    columns: &[
        ("order_id", Type::Text),
        ("account_id", Type::Text),
        ("debited", Type::Integer),
        ("settled", Type::Integer),
    ],
    key: &["order_id"],
    indexes: &[],
    writes: Writes::Upsert,
};

/// One row per posting to a customer account, with the running balance.
pub const LEDGER_ENTRIES: Table = Table {
    name: "ledger_entries",
    columns: &[
        ("account_id", Type::Text),
        ("position", Type::Integer),
        ("seq", Type::Integer),
        ("event_id", Type::Text),
        ("kind", Type::Text),
        ("amount", Type::Integer),
        ("balance_after", Type::Integer),
        ("order_id", Type::TextOrNull),
        ("payout_id", Type::TextOrNull),
        ("product_id", Type::TextOrNull),
        ("reference", Type::TextOrNull),
        ("occurred_at", Type::Text),
    ],
    key: &["account_id", "position", "seq"],
    // Support finds a customer by a deposit's reference.
    indexes: &[("by_reference", "reference")],
    writes: Writes::AppendOnly,
};

/// Orders with their status and amounts.
pub const ORDERS: Table = Table {
    name: "orders",
    columns: &[
        ("order_id", Type::Text),
        ("product_id", Type::Text),
        ("account_id", Type::Text),
        ("amount", Type::Integer),
        ("status", Type::Text),
        ("reason", Type::TextOrNull),
        ("expires_at", Type::TextOrNull),
        ("paid", Type::Integer),
        ("refunded", Type::Integer),
        ("created_at", Type::Text),
        ("updated_at", Type::Text),
        ("position", Type::Integer),
    ],
    key: &["order_id"],
    indexes: &[("by_account", "account_id, created_at")],
    writes: Writes::Upsert,
};

/// Every event that carries a correlation id (an order's or a payout's
/// timeline). The events' data and metadata stay in the log: a timeline reads
/// them from the store by position, so the read model stays small.
pub const TIMELINE_EVENTS: Table = Table {
    name: "timeline_events",
    columns: &[("correlation_id", Type::Text), ("position", Type::Integer)],
    key: &["correlation_id", "position"],
    indexes: &[],
    writes: Writes::AppendOnly,
};

/// Payouts with their status, attempts and provider reference.
pub const PAYOUTS: Table = Table {
    name: "payouts",
    columns: &[
        ("payout_id", Type::Text),
        ("product_id", Type::Text),
        ("account_id", Type::Text),
        ("period", Type::Text),
        ("kind", Type::Text),
        ("amount", Type::Integer),
        ("status", Type::Text),
        ("attempts", Type::Integer),
        ("provider_ref", Type::TextOrNull),
        ("last_error", Type::TextOrNull),
        ("lease_until", Type::TextOrNull),
        ("created_at", Type::Text),
        ("updated_at", Type::Text),
        ("position", Type::Integer),
    ],
    key: &["payout_id"],
    indexes: &[
        ("by_product", "product_id, status"),
        ("by_account", "account_id"),
    ],
    writes: Writes::Upsert,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_updates_every_column_but_the_key() {
        let sql = ACCOUNT_HOLDS.write_values(2, 2);
        assert_eq!(
            sql,
            "INSERT INTO account_holds_g2 (order_id, account_id, debited, settled) \
             VALUES (?, ?, ?, ?), (?, ?, ?, ?) ON CONFLICT (order_id) DO UPDATE \
             SET account_id = excluded.account_id, debited = excluded.debited, \
             settled = excluded.settled"
        );
    }

    #[test]
    fn append_only_tables_have_no_upsert_clause() {
        let sql = TIMELINE_EVENTS.write_arrays(1);
        assert_eq!(
            sql,
            "INSERT INTO timeline_events_g1 (correlation_id, position) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[]) AS r(correlation_id, position)"
        );
    }

    #[test]
    fn postgres_scans_text_keys_in_byte_order() {
        let sql = LEDGER_ENTRIES.scan(Dialect::Postgres);
        assert!(
            sql.ends_with("ORDER BY account_id COLLATE \"C\", position, seq"),
            "{sql}"
        );
    }
}
