//! `LocalServer`: a `nats-server` child process with JetStream, on a free loopback port, with its
//! own data directory; stopped by its pid when dropped. Tests start one each; a node started
//! without a NATS URL runs one for itself.
//!
//! This module must never leave a server running after its owner is gone, and never guess that
//! a server is up: it waits until the server answers on its port.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::error::BusError;

/// How long a starting server may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The port an embedded server tries first on a new data directory: NATS's own default, which
/// is also what `agora ctl`, `order` and `watch` try without `--nats-url`.
pub const EMBEDDED_PORT_DEFAULT: u16 = 4222;

/// The file in an embedded server's data directory that keeps its port across restarts.
const PORT_FILE: &str = "port";

/// Whether `port` on the loopback interface can be bound now.
fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Where test and embedded servers listen unless told otherwise: this machine only.
const LOOPBACK: &str = "127.0.0.1";

#[derive(Debug)]
pub struct LocalServer {
    child: Option<Child>,
    binary: PathBuf,
    port: u16,
    data_dir: PathBuf,
    /// A nats-server configuration file (users, permissions), if any.
    config: Option<PathBuf>,
    /// The address it listens on (127.0.0.1 but for an embedded server told otherwise).
    addr: String,
    /// The kernel sends the server SIGTERM when the thread that started it exits, even when
    /// this process is killed (`PR_SET_PDEATHSIG`).
    tied: bool,
}

/// A port that was free a moment ago on the loopback interface.
pub fn free_port() -> Result<u16, BusError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| BusError::ServerStart {
        reason: format!("cannot find a free loopback port: {e}"),
        log: String::new(),
    })?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| BusError::ServerStart {
            reason: format!("cannot read the free port: {e}"),
            log: String::new(),
        })
}

/// The `nats-server` binary: `$AGORA_NATS_SERVER` if set, else the one on `PATH`.
pub fn default_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("AGORA_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file());
    on_path.unwrap_or_else(|| PathBuf::from("nats-server"))
}

impl LocalServer {
    /// Like `start`, and the server does not outlive the calling thread: the kernel sends it
    /// SIGTERM when that thread exits, even when this process is killed or crashes. Call it from
    /// a thread that lives as long as the server should (the main thread): a pool thread that
    /// exits when idle would stop the server with it.
    pub fn start_tied(data_dir: &Path) -> Result<LocalServer, BusError> {
        LocalServer::start_full(
            &default_binary(),
            free_port()?,
            data_dir,
            None,
            true,
            LOOPBACK,
        )
    }

    /// The node's embedded server (started like `start_tied`): on the port it had the last
    /// time it ran on `data_dir` (kept in `<data_dir>/port`), else on 4222, so an exported
    /// `AGORA_NATS_URL` stays right across restarts; when that port is taken, on a free one,
    /// saying so.
    /// It listens on `addr` (`[embedded_nats] addr`: 127.0.0.1 unless a container publishes
    /// the port).
    pub fn start_embedded(data_dir: &Path, addr: &str) -> Result<LocalServer, BusError> {
        let port_file = data_dir.join(PORT_FILE);
        let remembered = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok())
            .filter(|p| *p != 0);
        let preferred = remembered.unwrap_or(EMBEDDED_PORT_DEFAULT);
        let started = if port_free(preferred) {
            LocalServer::start_full(&default_binary(), preferred, data_dir, None, true, addr)
        } else {
            Err(BusError::ServerStart {
                reason: format!("port {preferred} is taken"),
                log: String::new(),
            })
        };
        let server = match started {
            Ok(server) => server,
            Err(BusError::ServerMissing { path }) => return Err(BusError::ServerMissing { path }),
            Err(e) => {
                let port = free_port()?;
                let why = match remembered {
                    Some(p) => format!("port {p}, which it had before,"),
                    None => format!("the default port {preferred}"),
                };
                tracing::warn!(
                    "the embedded nats-server cannot use {why} ({e}); it listens on {port} instead, so a NATS URL saved from before no longer works"
                );
                LocalServer::start_full(&default_binary(), port, data_dir, None, true, addr)?
            }
        };
        if remembered != Some(server.port)
            && let Err(e) = std::fs::write(&port_file, format!("{}\n", server.port))
        {
            tracing::warn!(
                "cannot keep the NATS port in {}: {e}; the next start may use another port",
                port_file.display()
            );
        }
        Ok(server)
    }

    /// Starts the default binary on a free port with JetStream storing under `data_dir`.
    pub fn start(data_dir: &Path) -> Result<LocalServer, BusError> {
        LocalServer::start_with(&default_binary(), free_port()?, data_dir)
    }

    /// Starts `binary` on `port` with JetStream storing under `data_dir`, and waits until it
    /// answers.
    pub fn start_with(binary: &Path, port: u16, data_dir: &Path) -> Result<LocalServer, BusError> {
        LocalServer::start_full(binary, port, data_dir, None, false, LOOPBACK)
    }

    /// Starts the default binary on a free port with a nats-server configuration file (for
    /// users and permissions); the port, address and JetStream store are set here.
    pub fn start_with_config(data_dir: &Path, config: &Path) -> Result<LocalServer, BusError> {
        LocalServer::start_full(
            &default_binary(),
            free_port()?,
            data_dir,
            Some(config),
            false,
            LOOPBACK,
        )
    }

    fn start_full(
        binary: &Path,
        port: u16,
        data_dir: &Path,
        config: Option<&Path>,
        tied: bool,
        addr: &str,
    ) -> Result<LocalServer, BusError> {
        let mut server = LocalServer {
            child: None,
            binary: binary.to_path_buf(),
            port,
            data_dir: data_dir.to_path_buf(),
            config: config.map(Path::to_path_buf),
            addr: addr.to_string(),
            tied,
        };
        server.spawn()?;
        Ok(server)
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.join("nats-server.log")
    }

    fn log_tail(&self) -> String {
        match std::fs::read_to_string(self.log_path()) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(8)..].join("\n  ");
                format!("\n  last lines of {}:\n  {tail}", self.log_path().display())
            }
            Err(_) => String::new(),
        }
    }

    fn spawn(&mut self) -> Result<(), BusError> {
        std::fs::create_dir_all(&self.data_dir).map_err(|e| BusError::ServerStart {
            reason: format!("cannot create {}: {e}", self.data_dir.display()),
            log: String::new(),
        })?;
        let mut command = Command::new(&self.binary);
        if self.tied {
            let parent = std::process::id();
            // SAFETY: runs in the child between fork and exec, and only makes syscalls that are
            // async-signal-safe (prctl, getppid); it allocates nothing.
            unsafe {
                use std::os::unix::process::CommandExt;
                command.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent died before the line above: nobody would stop this server.
                    if libc::getppid() as u32 != parent {
                        return Err(std::io::Error::other("the starting process is gone"));
                    }
                    Ok(())
                });
            }
        }
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        // A name of its own, so the readiness check knows it greets us, not another server
        // that took the port first.
        let name = self.server_name();
        command.arg("--server_name").arg(&name);
        let child = command
            .arg("--addr")
            .arg(&self.addr)
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--jetstream")
            .arg("--store_dir")
            .arg(self.data_dir.join("jetstream"))
            .arg("--log")
            .arg(self.log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                    BusError::ServerMissing {
                        path: self.binary.clone(),
                    }
                }
                _ => BusError::ServerStart {
                    reason: format!("cannot run {}: {e}", self.binary.display()),
                    log: String::new(),
                },
            })?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Waits until the server greets a client on its port (or has exited).
    fn wait_ready(&mut self) -> Result<(), BusError> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(BusError::ServerStart {
                    reason: format!("it exited at once ({status}) on port {}", self.port),
                    log: self.log_tail(),
                });
            }
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                let mut line = String::new();
                if BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO") {
                    if line.contains(&format!("\"server_name\":\"{}\"", self.server_name())) {
                        return Ok(());
                    }
                    // Another server answers on the port: ours cannot have it.
                    self.kill();
                    return Err(BusError::ServerStart {
                        reason: format!("port {} is taken by another NATS server", self.port),
                        log: String::new(),
                    });
                }
            }
            if started.elapsed() > START_TIMEOUT {
                self.kill();
                return Err(BusError::ServerStart {
                    reason: format!("no answer on port {} within {START_TIMEOUT:?}", self.port),
                    log: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The name the server is started with (`server_name`, as stream info names a stream's
    /// leader): unique to this process and port, the same across restarts.
    pub fn name(&self) -> String {
        self.server_name()
    }

    fn server_name(&self) -> String {
        format!("agora-local-{}-{}", std::process::id(), self.port)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s) and waits for it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: `kill` with a pid we own and a valid signal number has no memory effects.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server at once (SIGKILL: a crash, nothing flushed) and waits for it.
    pub fn kill_now(&mut self) {
        self.kill();
    }

    /// Starts a stopped or killed server again on the same port and data; a no-op while it
    /// runs.
    pub fn start_again(&mut self) -> Result<(), BusError> {
        if self.child.is_some() {
            return Ok(());
        }
        self.spawn()
    }

    /// Stops the server and starts it again on the same port and data (a NATS restart).
    pub fn restart(&mut self) -> Result<(), BusError> {
        self.stop();
        self.spawn()
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.kill();
    }
}
