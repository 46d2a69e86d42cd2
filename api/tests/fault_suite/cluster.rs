//! `ledger serve` nodes on one log: one node on an SQLite folder, or any
//! number on one fresh PostgreSQL database; nodes are started, killed with
//! SIGKILL and started again, and `ledger audit drift` runs on what they
//! leave behind.

use crate::process::{Launch, Process, launch};
use std::path::{Path, PathBuf};
use std::process::Command;
use store::testing::TestPostgres;

/// Where the nodes' log and read models live.
pub enum Database {
    /// SQLite files in a folder (one node only: the files are its own).
    Sqlite(PathBuf),
    /// A fresh PostgreSQL database (dropped with the cluster).
    Postgres(TestPostgres),
}

/// Nodes on one database.
pub struct Cluster {
    database: Database,
    args: Vec<String>,
    nodes: Vec<Option<Process>>,
    folder: tempfile::TempDir,
    logs: PathBuf,
    log_filter: Option<String>,
    /// Nodes take product leases and forward to each other (PostgreSQL).
    members: bool,
    /// Each member's port, kept across restarts (its advertised URL).
    ports: Vec<u16>,
}

/// The node secret of a scenario's members.
pub const NODE_SECRET: &str = "fault-suite-node-secret";

/// The lease time to live of a scenario's members.
pub const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(3);

/// Where the nodes of a scenario write their logs; kept after the run.
pub fn logs_folder(scenario: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fault_suite")
        .join(scenario)
}

impl Cluster {
    /// A cluster on SQLite (one node) with these `serve` arguments.
    pub fn sqlite(scenario: &str, args: &[&str]) -> Cluster {
        let folder = tempfile::tempdir().unwrap();
        let data = folder.path().join("data");
        Cluster::new(scenario, Database::Sqlite(data), args, folder)
    }

    /// A cluster on a fresh PostgreSQL database, or `None` without
    /// `DATABASE_URL`.
    pub async fn postgres(scenario: &str, args: &[&str]) -> Option<Cluster> {
        let database = TestPostgres::create(scenario).await?;
        Some(Cluster::new(
            scenario,
            Database::Postgres(database),
            args,
            tempfile::tempdir().unwrap(),
        ))
    }

    fn new(
        scenario: &str,
        database: Database,
        args: &[&str],
        folder: tempfile::TempDir,
    ) -> Cluster {
        let backend = match database {
            Database::Sqlite(_) => "sqlite",
            Database::Postgres(_) => "postgres",
        };
        let logs = logs_folder(&format!("{scenario}-{backend}"));
        let _ = std::fs::remove_dir_all(&logs);
        std::fs::create_dir_all(&logs).unwrap();
        Cluster {
            database,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            nodes: Vec::new(),
            folder,
            logs,
            log_filter: None,
            members: false,
            ports: Vec::new(),
        }
    }

    /// Nodes started from now on are members of a cluster: each advertises
    /// its own address, takes product leases (TTL 3 s, renewed every
    /// second) and forwards to the others with the node secret.
    pub fn members(&mut self) {
        self.members = true;
    }

    /// Sends a signal (`STOP`, `CONT`) to node `index`.
    pub fn signal(&self, index: usize, signal: &str) {
        let process = self.nodes[index].as_ref().expect("a running node");
        let status = Command::new("kill")
            .args([format!("-{signal}"), process.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// The node holding a product's live lease (`node{index}`), read from
    /// the database.
    pub async fn owner(&self, product_id: &str) -> Option<usize> {
        let Database::Postgres(database) = &self.database else {
            return Some(0);
        };
        let pool = sqlx::PgPool::connect(&database.url).await.ok()?;
        let holder: Option<(String,)> = sqlx::query_as(
            "SELECT node_id FROM product_leases WHERE product_id = $1 AND expires_at > now()",
        )
        .bind(product_id)
        .fetch_optional(&pool)
        .await
        .ok()?;
        pool.close().await;
        holder?.0.strip_prefix("node")?.parse().ok()
    }

    /// A product stream's last position in the log (PostgreSQL clusters).
    pub async fn stream_position(&self, product_id: &str) -> Option<i64> {
        let Database::Postgres(database) = &self.database else {
            return None;
        };
        let pool = sqlx::PgPool::connect(&database.url).await.ok()?;
        let position: Option<(i64,)> = sqlx::query_as(
            "SELECT COALESCE(MAX(position), 0)::BIGINT FROM events WHERE stream_id = $1",
        )
        .bind(format!("product-{product_id}"))
        .fetch_optional(&pool)
        .await
        .ok()?;
        pool.close().await;
        Some(position?.0)
    }

    /// How many appends wrote a product stream after `position`: its events
    /// there, counted once per recording time (an append's events share the
    /// time taken under the write lock; successive appends never do).
    pub async fn appends_since(&self, product_id: &str, position: i64) -> Option<i64> {
        let Database::Postgres(database) = &self.database else {
            return None;
        };
        let pool = sqlx::PgPool::connect(&database.url).await.ok()?;
        let appends: Option<(i64,)> = sqlx::query_as(
            "SELECT COUNT(DISTINCT recorded_at)::BIGINT FROM events \
             WHERE stream_id = $1 AND position > $2",
        )
        .bind(format!("product-{product_id}"))
        .bind(position)
        .fetch_optional(&pool)
        .await
        .ok()?;
        pool.close().await;
        Some(appends?.0)
    }

    fn member_args(&mut self, index: usize) -> Vec<String> {
        if self.ports.len() <= index {
            self.ports.resize(index + 1, 0);
        }
        if self.ports[index] == 0 {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            self.ports[index] = probe.local_addr().unwrap().port();
        }
        let address = format!("127.0.0.1:{}", self.ports[index]);
        vec![
            "--listen".into(),
            address.clone(),
            "--node-id".into(),
            format!("node{index}"),
            "--advertise-url".into(),
            format!("http://{address}"),
            "--node-secret".into(),
            NODE_SECRET.into(),
            "--lease-ttl".into(),
            format!("{}s", LEASE_TTL.as_secs()),
            "--lease-renew".into(),
            "1s".into(),
            "--forward-timeout".into(),
            "3s".into(),
        ]
    }

    /// Adds `serve` arguments for nodes started from now on.
    pub fn add_args(&mut self, args: &[&str]) {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
    }

    /// A scratch folder that lives as long as the cluster.
    pub fn folder(&self) -> &Path {
        self.folder.path()
    }

    /// Nodes started from now on log at this `RUST_LOG` level (`warn`
    /// by default).
    pub fn log_level(&mut self, filter: &str) {
        self.log_filter = Some(filter.to_owned());
    }

    /// The log file of node `index`: every start appends to it.
    pub fn log_file(&self, index: usize) -> PathBuf {
        self.logs.join(format!("node{index}.log"))
    }

    /// Starts node `index` (again, if it was killed); returns its address.
    pub fn start(&mut self, index: usize) -> String {
        let member_args = if self.members {
            self.member_args(index)
        } else {
            vec!["--listen".into(), "127.0.0.1:0".into()]
        };
        let mut args: Vec<&str> = vec!["serve"];
        args.extend(member_args.iter().map(String::as_str));
        args.extend(self.args.iter().map(String::as_str));
        let data_dir = match &self.database {
            Database::Sqlite(data) => {
                assert_eq!(index, 0, "SQLite files belong to one node");
                data.clone()
            }
            Database::Postgres(_) => self.folder.path().join(format!("node{index}")),
        };
        let log_file = self.log_file(index);
        let options = Launch {
            database_url: match &self.database {
                Database::Postgres(database) => Some(database.url.as_str()),
                Database::Sqlite(_) => None,
            },
            log_filter: self.log_filter.as_deref(),
            log_file: Some(&log_file),
        };
        let process = launch(&args, &data_dir, &options);
        let url = process.url.clone();
        if self.nodes.len() <= index {
            self.nodes.resize_with(index + 1, || None);
        }
        self.nodes[index] = Some(process);
        url
    }

    /// Kills node `index` with SIGKILL.
    pub fn kill(&mut self, index: usize) {
        self.nodes[index] = None;
    }

    /// Kills every node.
    pub fn kill_all(&mut self) {
        self.nodes.clear();
    }

    /// Audits the log the nodes left with the independent oracle
    /// (`engine::oracle`, through `engine::audit`); every node must be stopped.
    pub async fn audit(&self) -> engine::audit::Audit {
        assert!(self.nodes.iter().all(Option::is_none), "nodes still run");
        let store: Box<dyn store::EventStore> = match &self.database {
            Database::Sqlite(data) => Box::new(
                store::SqliteEventStore::open(&data.join("ledger.db"))
                    .await
                    .expect("the nodes' SQLite log opens"),
            ),
            Database::Postgres(database) => Box::new(database.store().await),
        };
        engine::audit::audit(store.as_ref())
            .await
            .expect("the nodes' log is readable")
    }

    /// Runs `ledger audit drift` (read models against a fresh rebuild, and
    /// the trial balance) on the database; every node must be stopped.
    /// Answers whether it found nothing, and what it printed.
    pub fn drift(&self) -> (bool, String) {
        assert!(self.nodes.iter().all(Option::is_none), "nodes still run");
        let mut command = Command::new(env!("CARGO_BIN_EXE_ledger"));
        command
            .args(["audit", "drift"])
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn");
        match &self.database {
            Database::Sqlite(data) => command.arg("--data-dir").arg(data),
            Database::Postgres(database) => command.args(["--database-url", &database.url]),
        };
        let output = command.output().unwrap();
        let printed = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        (output.status.success(), printed)
    }
}
