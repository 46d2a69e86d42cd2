//! Stopping and starting the local PostgreSQL cluster, for the database
//! restart scenario. It stops the whole server, so it runs only when asked
//! (`LEDGER_FAULTS_RESTART_POSTGRES=1`, which `.ci/run` sets), only for a
//! server on this machine, and a guard starts the server again whatever
//! happens to the scenario.

use std::process::Command;
use std::time::Duration;

/// The environment variable that allows the suite to restart PostgreSQL.
pub const ALLOW: &str = "LEDGER_FAULTS_RESTART_POSTGRES";

/// The local cluster `pg_ctlcluster` manages.
pub struct Control {
    version: String,
}

impl Control {
    /// The local cluster, or why it may not or cannot be restarted.
    pub fn local(database_url: &str) -> Result<Control, String> {
        if std::env::var(ALLOW).as_deref() != Ok("1") {
            return Err(format!(
                "set {ALLOW}=1 to let the suite stop and start the local PostgreSQL"
            ));
        }
        let local = ["@127.0.0.1", "@localhost", "@[::1]"]
            .iter()
            .any(|host| database_url.contains(host));
        if !local {
            return Err("DATABASE_URL names a server on another machine".into());
        }
        let versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
            .map_err(|e| format!("no /etc/postgresql: {e}"))?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect();
        let [version] = versions.as_slice() else {
            return Err(format!("expected one cluster version, found {versions:?}"));
        };
        Ok(Control {
            version: version.clone(),
        })
    }

    fn pg_ctlcluster(&self, action: &str) {
        // Stopping is "fast" (pg_ctlcluster's default): every client is
        // disconnected at once, as in a crash or a failover.
        let output = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &self.version, "main", action])
            .output()
            .expect("pg_ctlcluster runs");
        assert!(
            output.status.success(),
            "pg_ctlcluster {action}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Stops the server; it starts again when the guard is dropped.
    pub fn stop(&self) -> Stopped<'_> {
        self.pg_ctlcluster("stop");
        Stopped { control: self }
    }

    fn start_and_wait(&self) {
        let ready = || {
            Command::new("pg_isready")
                .args(["-h", "127.0.0.1", "-q"])
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ready() {
            self.pg_ctlcluster("start");
        }
        for _ in 0..100 {
            if ready() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("PostgreSQL did not come back");
    }
}

/// PostgreSQL is down while this lives.
pub struct Stopped<'a> {
    control: &'a Control,
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.control.start_and_wait();
    }
}
