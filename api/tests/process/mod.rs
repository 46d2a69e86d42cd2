//! The real `ledger` binary run as a child process for end-to-end tests:
//! started with a data folder and the bootstrap admin, its address read
//! from the line it prints, killed (SIGKILL) when dropped.

// Each test binary that includes this module uses only some of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The bootstrap admin of every process started here.
pub const ADMIN: (&str, &str) = ("admin", "admin-password-1");

/// A running `ledger` process.
pub struct Process {
    child: Child,
    /// `http://address` it serves on.
    pub url: String,
}

impl Process {
    /// Its process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a process is started beyond its arguments.
#[derive(Default)]
pub struct Launch<'a> {
    /// The PostgreSQL database it runs on (else SQLite in the data folder).
    pub database_url: Option<&'a str>,
    /// `RUST_LOG` (default `warn`).
    pub log_filter: Option<&'a str>,
    /// Where its standard error (its log) goes (default: inherited).
    pub log_file: Option<&'a Path>,
}

/// Starts `ledger <args>` on `data_dir` (embedded SQLite) and waits for the
/// `http://…` address it prints.
pub fn start(args: &[&str], data_dir: &Path) -> Process {
    launch(args, data_dir, &Launch::default())
}

/// Starts `ledger <args>` as `launch` says and waits for its address.
pub fn launch(args: &[&str], data_dir: &Path, launch: &Launch) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ledger"));
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env("LEDGER_DATA_DIR", data_dir)
        .env("LEDGER_ADMIN_USER", ADMIN.0)
        .env("LEDGER_ADMIN_PASSWORD", ADMIN.1)
        .env("RUST_LOG", launch.log_filter.unwrap_or("warn"))
        .stdout(Stdio::piped());
    if let Some(url) = launch.database_url {
        command.env("DATABASE_URL", url);
    }
    if let Some(path) = launch.log_file {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        command.stderr(file);
    }
    let mut child = command.spawn().unwrap();
    let address = read_address(&mut child);
    Process {
        child,
        url: format!("http://{address}"),
    }
}

/// The `host:port` a started `ledger` prints on its first line of
/// standard output (which must be piped).
pub fn read_address(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned()
}
