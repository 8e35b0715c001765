//! The DNS server's configuration: plain data, checked by [`DnsConfig::validate`] before any
//! socket is bound (the binary maps a [`ConfigError`] to exit code 64).

use std::net::IpAddr;
use std::time::Duration;

/// Largest TTL accepted: answers must follow backends coming and going, so anything longer
/// than an hour is almost certainly a mistake.
pub const MAX_TTL: u32 = 3600;

/// Configuration of the authoritative server for the cluster zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// The zone this server is authoritative for: the cluster domain (`hangar.localhost`).
    /// Case and a trailing dot are ignored.
    pub zone: String,
    /// What `<backend>.<zone>` and the apex resolve to: the addresses clients reach the proxies
    /// on (IPv4 addresses answer A queries, IPv6 addresses AAAA queries).
    pub proxy_addresses: Vec<IpAddr>,
    /// What `ns.<zone>` (the name server named by the zone's NS and SOA records) resolves to:
    /// this server's own addresses. Empty means the proxies' addresses (one host in dev).
    pub nameserver_addresses: Vec<IpAddr>,
    /// TTL of every answer, and of negative answers (the SOA minimum).
    pub ttl: u32,
    /// How long a TCP connection may stay idle between queries before it is closed.
    pub tcp_idle_timeout: Duration,
    /// Read and answer UDP queries in batches (`recvmmsg`/`sendmmsg`, Linux only) instead of
    /// a `recvfrom` and a `sendto` per query. Off by default: fewer system calls, but more
    /// copying per query in the kernel, which measured 4-7% more CPU per query on this
    /// project's test machines; it may pay where system calls cost more (page-table
    /// isolation). Answers are the same either way.
    pub udp_batching: bool,
}

impl DnsConfig {
    /// A configuration with the defaults: TTL 5 s, TCP idle timeout 10 s, a system call per
    /// UDP query.
    pub fn new(zone: impl Into<String>, proxy_addresses: Vec<IpAddr>) -> Self {
        DnsConfig {
            zone: zone.into(),
            proxy_addresses,
            nameserver_addresses: Vec::new(),
            ttl: 5,
            tcp_idle_timeout: Duration::from_secs(10),
            udp_batching: false,
        }
    }

    /// Checks everything that can be checked without binding a socket.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let zone = self.zone.trim_end_matches('.');
        validate_zone(zone).map_err(|reason| ConfigError::InvalidZone {
            zone: self.zone.clone(),
            reason,
        })?;
        if self.proxy_addresses.is_empty() {
            return Err(ConfigError::NoProxyAddresses);
        }
        for ip in self
            .proxy_addresses
            .iter()
            .chain(&self.nameserver_addresses)
        {
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(ConfigError::UnreachableAddress(*ip));
            }
        }
        if self.ttl > MAX_TTL {
            return Err(ConfigError::TtlTooLarge(self.ttl));
        }
        if self.tcp_idle_timeout.is_zero() {
            return Err(ConfigError::ZeroTcpTimeout);
        }
        Ok(())
    }
}

/// Why a zone name is not acceptable (a static reason, for the error message).
fn validate_zone(zone: &str) -> Result<(), &'static str> {
    if zone.is_empty() {
        return Err("it is empty");
    }
    // 253 characters is the longest name in presentation form; leave room for
    // `<backend>.` and `_acme-challenge.` in front of it.
    if zone.len() > 253 - 64 - 16 {
        return Err("it is too long to leave room for backend names");
    }
    for label in zone.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("every label must have 1 to 63 characters");
        }
        let b = label.as_bytes();
        if !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
            || b[0] == b'-'
            || b[b.len() - 1] == b'-'
        {
            return Err("labels may only hold letters, digits and inner '-'");
        }
    }
    Ok(())
}

/// A configuration the server cannot run with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("dns zone {zone:?} is not a valid DNS name: {reason}")]
    InvalidZone { zone: String, reason: &'static str },
    #[error(
        "dns needs at least one proxy address to answer with: give it with --dns-proxy-address"
    )]
    NoProxyAddresses,
    #[error(
        "dns cannot answer with {0}: clients cannot reach it; give a reachable address with --dns-proxy-address"
    )]
    UnreachableAddress(IpAddr),
    #[error("dns ttl {0} s is too long: backends come and go, use at most {MAX_TTL} s")]
    TtlTooLarge(u32),
    #[error("dns tcp idle timeout must be longer than zero")]
    ZeroTcpTimeout,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(zone: &str, addrs: &[&str]) -> DnsConfig {
        DnsConfig::new(zone, addrs.iter().map(|a| a.parse().unwrap()).collect())
    }

    #[test]
    fn validation_table() {
        let ok = [
            "hangar.localhost",
            "Hangar.Localhost.",
            "a",
            "x-1.example.com",
        ];
        for zone in ok {
            assert_eq!(cfg(zone, &["127.0.0.1"]).validate(), Ok(()), "{zone}");
        }
        let bad = [
            "",
            ".",
            "a..b",
            "-a.b",
            "a-.b",
            "a_b.c",
            "a b",
            &"x".repeat(64),
        ];
        for zone in bad {
            assert!(
                matches!(
                    cfg(zone, &["127.0.0.1"]).validate(),
                    Err(ConfigError::InvalidZone { .. })
                ),
                "{zone:?}"
            );
        }
        assert_eq!(cfg("z", &[]).validate(), Err(ConfigError::NoProxyAddresses));
        assert_eq!(
            cfg("z", &["0.0.0.0"]).validate(),
            Err(ConfigError::UnreachableAddress("0.0.0.0".parse().unwrap()))
        );
        assert_eq!(
            cfg("z", &["::"]).validate(),
            Err(ConfigError::UnreachableAddress("::".parse().unwrap()))
        );
        let mut c = cfg("z", &["::1"]);
        c.ttl = MAX_TTL + 1;
        assert_eq!(c.validate(), Err(ConfigError::TtlTooLarge(MAX_TTL + 1)));
        c.ttl = 0;
        c.tcp_idle_timeout = Duration::ZERO;
        assert_eq!(c.validate(), Err(ConfigError::ZeroTcpTimeout));
        // Messages say what to do.
        assert!(
            ConfigError::NoProxyAddresses
                .to_string()
                .contains("--dns-proxy-address")
        );
    }
}
