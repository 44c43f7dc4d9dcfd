//! What Linux says about a process (`/proc/<pid>/stat`, `/proc/self/fd`): CPU time, memory,
//! start time and open files. Read by the heartbeat (a node's CPU share), by `/metrics`
//! (the Prometheus `process_*` metrics) and by `agora bench` (the CPU of each process it runs).
//! This module must never fail loudly: where `/proc` cannot be read it answers `None`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One reading of `/proc/<pid>/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcStat {
    /// User plus system CPU time, in milliseconds.
    pub cpu_ms: f64,
    /// Resident memory, in bytes.
    pub resident_bytes: u64,
    /// Virtual memory, in bytes.
    pub virtual_bytes: u64,
    /// When the process started, in seconds since the Unix epoch.
    pub start_unix_secs: f64,
}

fn sysconf(name: libc::c_int, default: i64) -> i64 {
    // SAFETY: sysconf only reads a configuration value.
    let value = unsafe { libc::sysconf(name) };
    if value > 0 { value } else { default }
}

/// The machine's boot time, in seconds since the Unix epoch (`btime` of `/proc/stat`).
fn boot_unix_secs() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

impl ProcStat {
    /// Reads `/proc/<pid>/stat` (`None`: this process).
    pub fn read(pid: Option<u32>) -> Option<ProcStat> {
        let path = match pid {
            Some(pid) => format!("/proc/{pid}/stat"),
            None => "/proc/self/stat".to_string(),
        };
        let text = std::fs::read_to_string(path).ok()?;
        // The command name (field 2) is in parentheses and may hold spaces: count after it.
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Field n of the line is at index n - 3 after the name.
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        let ticks = sysconf(libc::_SC_CLK_TCK, 100) as f64;
        let page = sysconf(libc::_SC_PAGESIZE, 4096) as u64;
        let cpu_ms = (field(14)? + field(15)?) as f64 * 1000.0 / ticks;
        let start_unix_secs = boot_unix_secs()
            .map(|boot| boot as f64 + field(22).unwrap_or(0) as f64 / ticks)
            .unwrap_or(0.0);
        Some(ProcStat {
            cpu_ms,
            resident_bytes: field(24).unwrap_or(0).saturating_mul(page),
            virtual_bytes: field(23).unwrap_or(0),
            start_unix_secs,
        })
    }
}

/// CPU time (user + system) of a process, in milliseconds (`None`: this process).
pub fn cpu_ms(pid: Option<u32>) -> Option<f64> {
    ProcStat::read(pid).map(|s| s.cpu_ms)
}

/// Open file descriptors of this process, and its limit.
pub fn open_fds() -> (Option<u64>, Option<u64>) {
    let open = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct it is given.
    let max = (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0)
        .then_some(limit.rlim_cur);
    (open, max)
}

/// The Prometheus `process_*` families (the names and types every Prometheus client library
/// exports), read now, as exposition text to append to a scrape.
pub fn exposition() -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    if let Some(stat) = ProcStat::read(None) {
        family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            stat.cpu_ms / 1000.0,
        );
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            stat.resident_bytes as f64,
        );
        family(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            stat.virtual_bytes as f64,
        );
        family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            stat.start_unix_secs,
        );
    }
    let (open, max) = open_fds();
    if let Some(open) = open {
        family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            open as f64,
        );
    }
    if let Some(max) = max {
        family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max as f64,
        );
    }
    out
}

/// Seconds since the Unix epoch, now.
pub fn unix_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_read() {
        let stat = ProcStat::read(None).expect("/proc/self/stat");
        assert!(stat.resident_bytes > 0 && stat.virtual_bytes >= stat.resident_bytes);
        // Started in the last day, not in the future.
        let age = unix_secs() - stat.start_unix_secs;
        assert!((0.0..86_400.0).contains(&age), "age {age}");
        let (open, max) = open_fds();
        assert!(open.is_some_and(|n| n >= 3) && max.is_some_and(|m| m >= 3));
        let text = exposition();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{text}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{text}");
        }
    }
}
