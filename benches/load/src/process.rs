//! Child processes the harness starts (killed on drop, so an error or a panic leaves nothing
//! running) and what `/proc` says about them.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A started process; SIGKILLed and reaped on drop unless it already exited.
pub struct Guard {
    pub name: String,
    child: Child,
    /// stderr lines, when captured.
    log: Arc<Mutex<Vec<String>>>,
}

impl Guard {
    /// Starts `command`; stderr is captured line by line (and copied to `log_file`).
    pub fn spawn(name: &str, mut command: Command, log_file: &Path) -> anyhow::Result<Self> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}: {command:?}"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let lines = log.clone();
            let mut file = std::fs::File::create(log_file)
                .with_context(|| format!("create {}", log_file.display()))?;
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let _ = writeln!(file, "{line}");
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        Ok(Self {
            name: name.into(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The text after `marker` in the first log line containing it.
    pub fn log_after(&self, marker: &str) -> Option<String> {
        self.log_lines().iter().find_map(|l| {
            let at = l.find(marker)?;
            Some(l[at + marker.len()..].trim().to_owned())
        })
    }

    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits for the process to exit by itself, killing it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                bail!("{} did not finish within {timeout:?}; killed", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL (`kill -9`: no chance to clean up) and reaps it. An error if it had already
    /// exited by itself, with that exit's status.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} had already exited by itself ({status})", self.name);
        }
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`. The exit status of a process
    /// that stopped by itself (or had already exited); None if it had to be killed.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        self.wait(grace).ok()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// utime + stime of a live process, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/pid/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // proc(5): utime and stime are fields 14 and 15; `after` starts at field 3.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i - 3).context("short /proc/pid/stat")?.parse()?)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(14)? + ticks(15)?) / hz)
}

/// A `/proc/<pid>/status` size field (VmRSS, VmHWM), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// CPU time of reaped children of this process (RUSAGE_CHILDREN), in seconds.
pub fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A free 127.0.0.1 port (bound, read, released) for a program that cannot bind port 0 and
/// report it.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls `f` every 100 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// GET over HTTP (the admin endpoint); returns status and body. The client is the e2e tests'
/// (`tests/e2e/http.rs`, reqwest).
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    crate::http::get(addr, path).with_context(|| format!("GET http://{addr}{path}"))
}

/// Sum of every series of a Prometheus counter or gauge, over all labels.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    crate::http::samples(text)
        .filter(|(series, _)| crate::http::metric_name(series) == name)
        .map(|(_, v)| v)
        .sum::<f64>()
        + 0.0 // an empty f64 sum is -0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_adds_series_of_one_name_only() {
        let text =
            "# HELP a_total x\na_total{t=\"grpc\"} 3\na_total{t=\"http\"} 4\na_total_x 9\nb 1\n";
        assert_eq!(metric_sum(text, "a_total"), 7.0);
        assert_eq!(metric_sum(text, "b"), 1.0);
    }

    #[test]
    fn own_cpu_and_memory_are_readable() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(status_bytes(pid, "VmRSS") > 0);
    }
}
