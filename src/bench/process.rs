//! The processes and files a bench run owns: the node under test (this binary's `agora node`
//! as a child process, stopped by SIGTERM and killed if it will not go) and the run's
//! temporary directory. Neither outlives the run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::BenchError;

/// How long the node may take to print its `ready` line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the node may take to stop on SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The node under test: this binary's `agora node`, as a child process.
pub(super) struct NodeProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: PathBuf,
}

impl NodeProcess {
    pub(super) fn start(config: &Path, log: &Path) -> Result<NodeProcess, BenchError> {
        let exe = std::env::current_exe().map_err(|e| {
            BenchError::new(format!("cannot find this program to start the node: {e}"))
        })?;
        let log_file = std::fs::File::create(log).map_err(|e| {
            BenchError::new(format!(
                "cannot create the node's log {}: {e}",
                log.display()
            ))
        })?;
        let mut command = Command::new(&exe);
        command
            .arg("node")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        // The bench's configuration file is the whole configuration: no AGORA_* variable of
        // this shell may change it (only the log filter and the nats-server path pass).
        for (key, _) in std::env::vars_os() {
            let key_text = key.to_string_lossy();
            if key_text.starts_with("AGORA_")
                && key_text != "AGORA_LOG"
                && key_text != "AGORA_NATS_SERVER"
            {
                command.env_remove(&key);
            }
        }
        if std::env::var_os("AGORA_LOG").is_none() {
            command.env("AGORA_LOG", "warn");
        }
        let mut child = command.spawn().map_err(|e| {
            BenchError::new(format!(
                "cannot start the node ({} node): {e}",
                exe.display()
            ))
        })?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(BenchError::new(
                "the node's standard output was not captured",
            ));
        };
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Ok(NodeProcess {
            child,
            lines,
            log: log.to_path_buf(),
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the node's log, for an error message.
    pub(super) fn log_tail(&self) -> String {
        match std::fs::read_to_string(&self.log) {
            Ok(text) if !text.trim().is_empty() => {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(12)..].join("\n  ");
                format!("the node's log ends with:\n  {tail}")
            }
            _ => "the node logged nothing (AGORA_LOG=info shows more)".into(),
        }
    }

    pub(super) fn wait_ready(&mut self) -> Result<(), BenchError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.contains(" ready: ") => return Ok(()),
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(BenchError::new(format!(
                    "the node did not say ready within {} s; {}",
                    READY_TIMEOUT.as_secs(),
                    self.log_tail()
                )));
            }
        }
    }

    /// An error if the node has exited.
    pub(super) fn check_alive(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::new(format!(
                "the node exited ({status}); {}",
                self.log_tail()
            ))),
            Err(e) => Err(BenchError::new(format!("cannot watch the node: {e}"))),
        }
    }

    /// SIGTERM, then waits for a clean exit (status 0); SIGKILL after `STOP_TIMEOUT`.
    pub(super) fn stop(&mut self) -> Result<(), BenchError> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(BenchError::new(format!(
                "the node had already exited ({status}); {}",
                self.log_tail()
            )));
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: `kill` with our child's pid and a valid signal has no memory effects.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(BenchError::new(format!(
                        "the node did not stop cleanly on SIGTERM ({status}); {}",
                        self.log_tail()
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(BenchError::new(format!("cannot watch the node: {e}"))),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Err(BenchError::new(format!(
            "the node did not stop within {} s of SIGTERM and was killed; {}",
            STOP_TIMEOUT.as_secs(),
            self.log_tail()
        )))
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The run's temporary directory (node data, its log, the nats-server's data), removed when
/// the run ends.
pub(super) struct TempDir {
    pub(super) path: PathBuf,
    /// A short id unique to this run, also used in its NATS names.
    pub(super) id: String,
}

impl TempDir {
    pub(super) fn create() -> Result<TempDir, BenchError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let id = format!(
            "{:08x}",
            (nanos ^ u64::from(std::process::id()).rotate_left(32)) & 0xffff_ffff
        );
        let path = std::env::temp_dir().join(format!("agora-bench-{id}"));
        std::fs::create_dir_all(&path).map_err(|e| {
            BenchError::new(format!(
                "cannot create the temporary directory {}: {e}; set TMPDIR to a writable place",
                path.display()
            ))
        })?;
        Ok(TempDir { path, id })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
