//! Facts about this host used as drone defaults: CPU count, memory and identity.

/// Backends a drone runs at most unless told otherwise.
pub const DEFAULT_MAX_BACKENDS: u64 = 1000;

/// Total memory in MB from `/proc/meminfo`, or 1024 if it cannot be read.
pub fn memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(1024)
}

/// CPU millicores: 1000 per available core.
pub fn cpu_millis() -> u64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u64 * 1000)
        .unwrap_or(1000)
}

/// This host's identity: `/etc/machine-id`, else the kernel's hostname, else `None`.
pub fn host_id() -> Option<String> {
    ["/etc/machine-id", "/proc/sys/kernel/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty())
}
