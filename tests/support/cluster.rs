//! Throwaway PostgreSQL clusters for tests that need their own server.
//!
//! `Cluster::start()` runs initdb (trust authentication) in a temporary
//! directory and starts a postmaster on a free port of 127.0.0.1, with its
//! Unix socket in the same directory. The cluster can be stopped and started
//! again on the same port and data, which is what tests of upstream restarts
//! need; Drop shuts it down (immediately) and removes the directory.
//!
//! Postgres refuses to run as root, so when the tests run as root the
//! server's processes run as the `postgres` OS user (or
//! `PGSTASH_TEST_PGUSER`). Binaries come from `PGSTASH_TEST_PGBIN`,
//! `pg_config --bindir` or the newest `/usr/lib/postgresql/*/bin`.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// initdb on a slow, busy machine can take a while; a hung one should not
/// hang the test run.
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at finding a port nobody else grabs between our probe and the
/// postmaster's bind.
const PORT_ATTEMPTS: usize = 5;

pub struct Cluster {
    dir: tempfile::TempDir,
    data: PathBuf,
    bindir: PathBuf,
    port: u16,
    /// uid and gid the server runs as; `None` when the tests do not run as
    /// root and the server can simply run as the current user.
    run_as: Option<(u32, u32)>,
    postmaster: Option<Child>,
}

impl Cluster {
    /// initdb and start a fresh cluster; panics (with the server log) if it
    /// does not come up.
    pub fn start() -> Cluster {
        Self::start_with(&[], &[])
    }

    /// `start`, with files written into the data directory first (mode
    /// 0600, owned by the server's user: certificates, keys, pg_hba.conf)
    /// and lines appended to postgresql.conf.
    pub fn start_with(files: &[(&str, &[u8])], settings: &[&str]) -> Cluster {
        let bindir = find_bindir();
        let run_as = server_identity();
        let dir = tempfile::Builder::new()
            .prefix("pgstash-cluster-")
            .tempdir()
            .expect("create cluster directory");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("chown cluster directory to the server user");
        }
        let data = dir.path().join("data");
        let mut cluster = Cluster {
            data,
            bindir,
            port: 0,
            run_as,
            postmaster: None,
            dir,
        };
        cluster.initdb();
        for (name, contents) in files {
            cluster.write_data_file(name, contents);
        }
        if !settings.is_empty() {
            let conf = cluster.data.join("postgresql.conf");
            let mut text = std::fs::read_to_string(&conf).expect("read postgresql.conf");
            for line in settings {
                text.push_str(line);
                text.push('\n');
            }
            std::fs::write(&conf, text).expect("write postgresql.conf");
        }
        let mut last_failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            cluster.port = free_port();
            match cluster.launch() {
                Ok(()) => return cluster,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("postgres did not start after {PORT_ATTEMPTS} attempts: {last_failure}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Directory of the server's Unix socket (for connecting whatever
    /// pg_hba.conf says about TCP).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    fn write_data_file(&self, name: &str, contents: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.data.join(name);
        std::fs::write(&path, contents).expect("write data file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod data file");
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown data file");
        }
    }

    /// Fast shutdown (SIGINT): sessions are terminated, the postmaster
    /// exits once they are gone. Waits for it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.postmaster.take() else {
            return;
        };
        signal(&child, "INT");
        if wait_bounded(&mut child, STOP_TIMEOUT).is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "postgres did not stop within {STOP_TIMEOUT:?}\n{}",
                self.log()
            );
        }
    }

    /// Starts the stopped cluster again on the same data and port.
    pub fn start_again(&mut self) {
        assert!(self.postmaster.is_none(), "cluster is already running");
        if let Err(failure) = self.launch() {
            panic!("postgres did not start again: {failure}");
        }
    }

    pub fn is_running(&self) -> bool {
        self.postmaster.is_some()
    }

    /// The server log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bindir.join(program));
        // The postgres user may not be able to enter the test's working
        // directory, and Postgres tools complain when they cannot.
        command.current_dir(self.dir.path());
        command.env_remove("PGDATA");
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    fn initdb(&self) {
        let log = File::create(self.dir.path().join("initdb.log")).expect("create initdb log");
        let mut child = self
            .command("initdb")
            .arg("-D")
            .arg(&self.data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8"])
            .args(["--locale=C", "--no-sync", "--no-instructions"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn initdb");
        let status = wait_bounded(&mut child, INITDB_TIMEOUT);
        if !status.is_some_and(|s| s.success()) {
            if status.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let log =
                std::fs::read_to_string(self.dir.path().join("initdb.log")).unwrap_or_default();
            panic!("initdb failed ({status:?}):\n{log}");
        }
    }

    /// Starts the postmaster and waits until it accepts connections.
    /// `Err` carries the reason and the log, so a port taken by someone else
    /// can be retried.
    fn launch(&mut self) -> Result<(), String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open postgres log");
        let mut child = self
            .command("postgres")
            .arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Durability is worthless for a throwaway cluster and costs
            // seconds on every restart.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "shared_buffers=16MB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn postgres: {e}"))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("postgres exited with {status}\n{}", self.log()));
            }
            if self.accepts_connections() {
                self.postmaster = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                signal(&child, "QUIT");
                if wait_bounded(&mut child, Duration::from_secs(5)).is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(format!(
                    "postgres not ready within {READY_TIMEOUT:?}\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// pg_isready says yes only once the server accepts logins, not merely
    /// TCP connections (it answers "starting up" until recovery is done).
    fn accepts_connections(&self) -> bool {
        let probe = Command::new(self.bindir.join("pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-t", "2"])
            .args(["-U", "postgres", "-d", "postgres"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match probe {
            Ok(status) => status.success(),
            // No pg_isready: a TCP connection is the next best sign.
            Err(_) => {
                let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
                TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let Some(mut child) = self.postmaster.take() else {
            return;
        };
        // Immediate shutdown: nothing in a throwaway cluster is worth
        // waiting for, but the postmaster should still take its backends
        // and shared memory with it rather than be killed outright.
        signal(&child, "QUIT");
        if wait_bounded(&mut child, Duration::from_secs(10)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// A port free right now; the caller retries if it is gone by the time the
/// server binds it.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

fn find_bindir() -> PathBuf {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Ok(dir) = std::env::var("PGSTASH_TEST_PGBIN") {
        return PathBuf::from(dir);
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    // Debian's pg_config may come from a client-only package whose bindir
    // has no server binaries.
    if let Some(dir) = from_pg_config.filter(|d| has_server(d)) {
        return dir;
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let dir = entry.path().join("bin");
            has_server(&dir).then_some((version, dir))
        })
        .collect();
    candidates.sort();
    candidates
        .pop()
        .map(|(_, dir)| dir)
        .expect("no PostgreSQL server binaries: set PGSTASH_TEST_PGBIN")
}

/// The uid and gid to run the server as, when the tests run as root.
fn server_identity() -> Option<(u32, u32)> {
    let euid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok()?;
    if euid != 0 {
        return None;
    }
    let user = std::env::var("PGSTASH_TEST_PGUSER").unwrap_or_else(|_| "postgres".into());
    let id = |flag: &str| -> u32 {
        let output = Command::new("id")
            .args([flag, &user])
            .output()
            .unwrap_or_else(|e| panic!("id {flag} {user}: {e}"));
        assert!(
            output.status.success(),
            "running as root needs an OS user {user:?} for the server"
        );
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("id {flag} {user}: {e}"))
    };
    Some((id("-u"), id("-g")))
}
