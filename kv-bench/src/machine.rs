//! What a result was measured on: the machine, the code's commit, the date.

use serde_json::{json, Value};

/// CPU model and core count (from `/proc/cpuinfo` where there is one), OS, and the number of
/// threads the process may use.
pub fn describe() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, v)| v.trim())
        .to_owned();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let simd: Vec<&str> = ["avx512f", "avx2", "fma", "neon"]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    json!({
        "cpu": model,
        "simd": simd,
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

/// The checked-out commit, if this runs inside the git repository.
pub fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The current UTC time, RFC 3339.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// This process's resident memory now and its peak so far, in bytes (`VmRSS` and `VmHWM` of
/// `/proc/self/status`; `None` where there is no such file).
///
/// ```
/// if let Some(rss) = kv_bench::machine::resident_memory() {
///     assert!(rss.peak_bytes >= rss.now_bytes && rss.now_bytes > 0);
/// }
/// ```
pub fn resident_memory() -> Option<ResidentMemory> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    };
    Some(ResidentMemory {
        now_bytes: kib("VmRSS:")?,
        peak_bytes: kib("VmHWM:")?,
    })
}

/// Resident memory of this process ([`resident_memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResidentMemory {
    /// Resident now.
    pub now_bytes: u64,
    /// The most resident at any point so far.
    pub peak_bytes: u64,
}
