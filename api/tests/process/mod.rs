//! The real `ledger` binary run as a child process for end-to-end tests:
//! started with a data folder and the bootstrap admin, its address read
//! from the line it prints, killed (SIGKILL) when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// The bootstrap admin of every process started here.
pub const ADMIN: (&str, &str) = ("admin", "admin-password-1");

/// A running `ledger` process.
pub struct Process {
    child: Child,
    /// `http://address` it serves on.
    pub url: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ledger <args>` on `data_dir` (embedded SQLite) and waits for the
/// `http://…` address it prints.
pub fn start(args: &[&str], data_dir: &std::path::Path) -> Process {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env("LEDGER_DATA_DIR", data_dir)
        .env("LEDGER_ADMIN_USER", ADMIN.0)
        .env("LEDGER_ADMIN_PASSWORD", ADMIN.1)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    Process {
        child,
        url: format!("http://{address}"),
    }
}
