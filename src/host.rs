//! Facts about this host used as drone defaults: CPU count, memory, identity and the address
//! it reaches the scheduler from.

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

/// The local address this host's routing table uses to reach the host of `url`
/// (`http://host:port/...`): the address a drone advertises by default. Sends nothing (a UDP
/// socket is only connected).
pub fn route_to(url: &str) -> Result<std::net::IpAddr, String> {
    use std::net::ToSocketAddrs;
    let rest = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let with_port = if rest
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        rest.to_string()
    } else {
        format!("{rest}:80")
    };
    let target = with_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {with_port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{with_port} resolves to no address"))?;
    let local: std::net::SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(local).map_err(|e| e.to_string())?;
    socket
        .connect(target)
        .map_err(|e| format!("no route to {target}: {e}"))?;
    Ok(socket.local_addr().map_err(|e| e.to_string())?.ip())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_route_to_a_loopback_scheduler_is_loopback() {
        let ip = super::route_to("http://127.0.0.1:7070").unwrap();
        assert!(ip.is_loopback(), "{ip}");
        let ip = super::route_to("http://127.0.0.5:7070/v1").unwrap();
        assert_eq!(ip.to_string(), "127.0.0.1");
        assert!(super::route_to("http://no-such-host.invalid:1").is_err());
    }
}
