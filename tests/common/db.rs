//! Real database servers for integration tests: PostgreSQL and MariaDB, each on a free loopback
//! port with its own data directory in a temporary directory, stopped by its pid when dropped.
//! `scripts/lib.sh` installs them (`need_postgres`, `need_mariadb`); a server that cannot start
//! fails the test with what failed and the end of its log, it never skips.
//!
//! Run as root (a CI container), PostgreSQL's `initdb` and `postgres` run as the `postgres` user
//! (they refuse root) and `mariadbd` as root (`--user=root`); run as another user, both run as
//! that user. Each server is this process's own child (no `runuser` or `mysqld_safe` in
//! between), so the pid that is signalled is the server's, and cannot be another process's.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stopping server may take before it is killed (SIGKILL).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A port on the loopback interface that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A new temporary directory for one server's files. As root it is under /tmp, which the
/// `postgres` user can reach (a `TMPDIR` under /root would not be).
fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let made = if is_root() {
        tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp")
    } else {
        tempfile::Builder::new().prefix(prefix).tempdir()
    };
    made.unwrap_or_else(|e| panic!("cannot make a temporary directory ({prefix}...): {e}"))
}

/// The first of `names` found in a directory of `PATH` or of `extra`.
fn find_program(names: &[&str], extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .collect();
    names.iter().find_map(|name| {
        dirs.iter()
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// Where distributions put database servers, often not on a user's `PATH`.
const SBIN: &[&str] = &["/usr/sbin", "/usr/local/sbin", "/usr/libexec"];

/// The last lines of a server's log, to show why it did not start.
fn log_tail(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n  ");
            format!("last lines of {}:\n  {tail}", path.display())
        }
        Err(e) => format!("no log at {}: {e}", path.display()),
    }
}

/// `path` opened for appending (a restarted server writes after what it wrote before), as the
/// server's stdout and stderr.
fn log_file(path: &Path) -> (Stdio, Stdio) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open the server log {}: {e}", path.display()));
    let copy = file
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot open the server log {}: {e}", path.display()));
    (file.into(), copy.into())
}

/// Runs `command` to completion and answers its stdout; panics if it cannot run or fails,
/// saying `what` failed, with the command and its output.
fn output(what: &str, command: &mut Command) -> String {
    command.stdin(Stdio::null());
    let out = match command.output() {
        Ok(out) => out,
        Err(e) => panic!("{what}: cannot run {command:?}: {e}"),
    };
    if !out.status.success() {
        panic!(
            "{what} failed ({}): {command:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A client's output without its last newline.
fn chomp(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
    }
    text
}

/// Starts `command` (a server) as `child`.
fn spawn(name: &str, command: &mut Command, child: &mut Option<Child>) {
    command.stdin(Stdio::null());
    match command.spawn() {
        Ok(started) => *child = Some(started),
        Err(e) => panic!("{name} did not start: cannot run {command:?}: {e}"),
    }
}

/// Waits until `ready` says the server accepts connections. Panics, with the end of its log,
/// if it exits first or is not ready within [`START_TIMEOUT`] (the owner's `Drop` stops it).
fn wait_ready(
    name: &str,
    port: u16,
    log: &Path,
    child: &mut Option<Child>,
    mut ready: impl FnMut() -> bool,
) {
    let started = Instant::now();
    loop {
        if ready() {
            return;
        }
        if let Some(running) = child.as_mut()
            && let Ok(Some(status)) = running.try_wait()
        {
            *child = None;
            panic!(
                "{name} did not start on port {port}: it exited ({status})\n{}",
                log_tail(log)
            );
        }
        if started.elapsed() > START_TIMEOUT {
            panic!(
                "{name} did not start on port {port}: it did not accept connections within {START_TIMEOUT:?}\n{}",
                log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` to `child`, waits until it exits (SIGKILL after [`STOP_TIMEOUT`]) and reaps
/// it. The child is not reaped before, so its pid cannot be another process's. Never panics
/// (it runs in `Drop`, maybe while a test panics).
fn stop_child(name: &str, child: &mut Option<Child>, signal: libc::c_int) {
    let Some(mut running) = child.take() else {
        return;
    };
    if let Ok(Some(_)) = running.try_wait() {
        return;
    }
    if let Ok(pid) = libc::pid_t::try_from(running.id()) {
        // SAFETY: kill with the pid of our own child, not reaped yet, and a valid signal.
        unsafe {
            libc::kill(pid, signal);
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if !matches!(running.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "{name} (pid {}) did not stop within {STOP_TIMEOUT:?}: killing it",
        running.id()
    );
    let _ = running.kill();
    let _ = running.wait();
}

/// A PostgreSQL server on a free loopback port, with a database `agora` that the user
/// `postgres` reaches without a password (trust authentication). Stopped when dropped.
pub struct Postgres {
    /// `postgres://postgres@127.0.0.1:<port>/agora`.
    pub url: String,
    pub port: u16,
    /// The directory of PostgreSQL's programs.
    bin: PathBuf,
    /// As root: the uid and gid of the `postgres` user, which `initdb` and `postgres` run as.
    owner: Option<(u32, u32)>,
    /// The postmaster, while it runs.
    child: Option<Child>,
    /// `data/` (the cluster), `postgres.log` and the server's Unix socket.
    dir: tempfile::TempDir,
}

impl Postgres {
    /// `initdb` in a new temporary directory, the server on a free port (`fsync=off`), and
    /// `createdb agora`; returns once the server accepts connections.
    pub fn start() -> Postgres {
        let bin = postgres_bin();
        let owner = postgres_owner();
        let dir = temp_dir("agora-pg-");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap_or_else(|e| {
                panic!(
                    "cannot give {} to the postgres user: {e}",
                    dir.path().display()
                )
            });
        }
        let port = free_port();
        let mut pg = Postgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/agora"),
            port,
            bin,
            owner,
            child: None,
            dir,
        };
        let mut initdb = pg.as_owner("initdb");
        initdb.arg("-D").arg(pg.data_dir()).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "--locale=C",
            "--encoding=UTF8",
        ]);
        output("initdb (making PostgreSQL's data directory)", &mut initdb);
        pg.launch();
        let mut createdb = pg.client("createdb");
        createdb.arg("agora");
        output("createdb agora", &mut createdb);
        pg
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The postmaster's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `program` from PostgreSQL's directory, run as the `postgres` user when this is root.
    fn as_owner(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.current_dir(self.dir.path());
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// The client `program` (psql, createdb) with this server's address and user.
    fn client(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.current_dir(self.dir.path()).args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ]);
        command
    }

    /// Runs the postmaster on the data directory and port, and waits until it accepts
    /// connections.
    fn launch(&mut self) {
        let log = self.log_path();
        let (stdout, stderr) = log_file(&log);
        let mut server = self.as_owner("postgres");
        server
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdout(stdout)
            .stderr(stderr);
        spawn("PostgreSQL", &mut server, &mut self.child);
        let pid = self.pid().unwrap_or_default();
        // The postmaster writes its pid on the first line of postmaster.pid and, once it accepts
        // connections, "ready" on the eighth (what pg_ctl waits for). Read at once, both lines
        // are this start's (a server killed before leaves a stale file), and this postmaster
        // listens on the port (it exits when it cannot bind it).
        let pid_file = self.data_dir().join("postmaster.pid");
        wait_ready("PostgreSQL", self.port, &log, &mut self.child, || {
            let text = std::fs::read_to_string(&pid_file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines.first().and_then(|l| l.trim().parse::<u32>().ok()) == Some(pid)
                && lines.get(7).is_some_and(|l| l.trim() == "ready")
        });
    }

    /// Stops the server (SIGINT: fast shutdown, which ends open sessions) and waits until it
    /// has exited; SIGKILL after 10 s. Nothing if it is not running.
    pub fn stop(&mut self) {
        stop_child("PostgreSQL", &mut self.child, libc::SIGINT);
    }

    /// Starts the server again, on the same port and data directory (stopping it first if it
    /// runs); returns once it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// `psql -At -c <sql>` on the database `agora` as `postgres`: its stdout (rows one a line,
    /// columns separated by `|`; statements other than queries print their command tag, such
    /// as `INSERT 0 1`) without the last newline. Panics with psql's stderr if it fails.
    pub fn psql(&self, sql: &str) -> String {
        let mut psql = self.client("psql");
        psql.args(["-X", "-v", "ON_ERROR_STOP=1", "-d", "agora", "-At", "-c"])
            .arg(sql);
        chomp(output(&format!("psql -c {sql:?}"), &mut psql))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The directory of PostgreSQL's programs: the newest /usr/lib/postgresql/<version>/bin
/// (Debian, Ubuntu), else the directory of the `initdb` on `PATH`.
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.filter_map(Result::ok) {
            let version = entry.file_name().to_str().and_then(|v| v.parse().ok());
            let bin = entry.path().join("bin");
            if let Some(version) = version
                && bin.join("initdb").is_file()
            {
                versions.push((version, bin));
            }
        }
    }
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    find_program(&["initdb"], &[])
        .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| {
            panic!(
                "PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb and no initdb on PATH (scripts/lib.sh need_postgres installs it; by hand: apt-get install postgresql)"
            )
        })
}

/// As root: the uid and gid of the `postgres` user.
fn postgres_owner() -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run id to find the postgres user: {e}"));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| {
                panic!(
                    "PostgreSQL refuses to run as root and there is no postgres user to run it as (id {flag} postgres: {}); the postgresql package creates one",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })
    };
    Some((id("-u"), id("-g")))
}

/// Options for `mariadb-install-db` and `mariadbd` alike (the redo log's size must agree): a
/// small redo log (8 MiB, not 96) and no flush at each commit, which test data does not need;
/// no host name lookups.
const MARIADB_OPTIONS: &[&str] = &[
    "--innodb-log-file-size=8M",
    "--innodb-flush-log-at-trx-commit=2",
    "--skip-name-resolve",
];

/// A MariaDB server on a free loopback port, with a database `agora` and a user `agora`
/// (password `agora`, all privileges on `agora.*`) from anywhere. Stopped when dropped.
pub struct MariaDb {
    /// `mysql://agora:agora@127.0.0.1:<port>/agora`.
    pub url: String,
    pub port: u16,
    /// `mariadbd` (or `mysqld`).
    server: PathBuf,
    /// `mariadb` (or `mysql`), the client.
    client: PathBuf,
    /// `mariadbd`, while it runs.
    child: Option<Child>,
    /// `data/`, `mariadb.log`, the socket `mysql.sock` and `mysqld.pid`.
    dir: tempfile::TempDir,
}

impl MariaDb {
    /// `mariadb-install-db` in a new temporary directory, the server on a free port, then the
    /// database and user `agora`; returns once the server accepts connections.
    pub fn start() -> MariaDb {
        let missing = |what: &str| -> PathBuf {
            panic!(
                "MariaDB is not installed: no {what} on PATH or in /usr/sbin (scripts/lib.sh need_mariadb installs it; by hand: apt-get install mariadb-server)"
            )
        };
        let server = find_program(&["mariadbd", "mysqld"], SBIN)
            .unwrap_or_else(|| missing("mariadbd or mysqld"));
        let install = find_program(&["mariadb-install-db", "mysql_install_db"], SBIN)
            .unwrap_or_else(|| missing("mariadb-install-db or mysql_install_db"));
        let client = find_program(&["mariadb", "mysql"], SBIN)
            .unwrap_or_else(|| missing("mariadb or mysql (the client)"));
        let port = free_port();
        let mut db = MariaDb {
            url: format!("mysql://agora:agora@127.0.0.1:{port}/agora"),
            port,
            server,
            client,
            child: None,
            dir: temp_dir("agora-mariadb-"),
        };
        // --no-defaults must come first: nothing from /etc/mysql (its socket, its datadir).
        // --rpm, as Debian's own postinst runs it: without it, the script also chowns the
        // system's auth_pam_tool_dir to the --user given (root here), which breaks PAM logins
        // of the system's MariaDB service.
        let mut init = Command::new(install);
        init.current_dir(db.dir.path())
            .arg("--no-defaults")
            .arg(format!("--datadir={}", db.data_dir().display()))
            .args([
                "--rpm",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .args(MARIADB_OPTIONS)
            .args(as_root());
        output(
            "mariadb-install-db (making MariaDB's data directory)",
            &mut init,
        );
        db.launch();
        db.run_sql(
            None,
            "CREATE DATABASE agora; \
             CREATE USER 'agora'@'%' IDENTIFIED BY 'agora'; \
             CREATE USER 'agora'@'127.0.0.1' IDENTIFIED BY 'agora'; \
             CREATE USER 'agora'@'localhost' IDENTIFIED BY 'agora'; \
             GRANT ALL PRIVILEGES ON agora.* TO 'agora'@'%'; \
             GRANT ALL PRIVILEGES ON agora.* TO 'agora'@'127.0.0.1'; \
             GRANT ALL PRIVILEGES ON agora.* TO 'agora'@'localhost';",
        );
        db
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mariadb.log")
    }

    /// The server's Unix socket, where `root` logs in without a password.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("mysql.sock")
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `mariadbd` on the data directory and port, and waits until it accepts connections.
    fn launch(&mut self) {
        let log = self.log_path();
        let (stdout, stderr) = log_file(&log);
        let pid_file = self.dir.path().join("mysqld.pid");
        let mut server = Command::new(&self.server);
        server
            .current_dir(self.dir.path())
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.data_dir().display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!("--pid-file={}", pid_file.display()))
            .args(MARIADB_OPTIONS)
            .args(as_root())
            .stdout(stdout)
            .stderr(stderr);
        spawn("MariaDB", &mut server, &mut self.child);
        // It binds the TCP port before its socket, and exits when it cannot: a greeting on the
        // socket in this directory says this server listens on the port.
        let socket = self.socket();
        wait_ready("MariaDB", self.port, &log, &mut self.child, || {
            greets(&socket)
        });
        let pid = self.pid().unwrap_or_default();
        let written = std::fs::read_to_string(&pid_file).unwrap_or_default();
        assert_eq!(
            written.trim().parse::<u32>().ok(),
            Some(pid),
            "MariaDB on port {}: {} does not name the server started (pid {pid})",
            self.port,
            pid_file.display()
        );
    }

    /// Stops the server (SIGTERM: a clean shutdown) and waits until it has exited; SIGKILL
    /// after 10 s. Nothing if it is not running.
    pub fn stop(&mut self) {
        stop_child("MariaDB", &mut self.child, libc::SIGTERM);
    }

    /// Starts the server again, on the same port and data directory (stopping it first if it
    /// runs); returns once it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// `mariadb -N -B -e <sql>` on the database `agora` as `root` (over the socket): its stdout
    /// (rows one a line, columns separated by tabs, no header) without the last newline. Panics
    /// with the client's stderr if it fails.
    pub fn sql(&self, sql: &str) -> String {
        self.run_sql(Some("agora"), sql)
    }

    fn run_sql(&self, database: Option<&str>, sql: &str) -> String {
        let mut client = Command::new(&self.client);
        client
            .current_dir(self.dir.path())
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["--user=root", "-N", "-B", "-e", sql])
            .args(database);
        chomp(output(&format!("mariadb -e {sql:?}"), &mut client))
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `--user=root` when this is root: `mariadbd` refuses to run as root unless told to.
fn as_root() -> Option<&'static str> {
    is_root().then_some("--user=root")
}

/// Whether a MySQL-protocol server greets on the Unix socket `path`: its handshake packet, a
/// 4-byte header then protocol version 10.
fn greets(path: &Path) -> bool {
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(path) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).is_ok() && head[4] == 10
}
