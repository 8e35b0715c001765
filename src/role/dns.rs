//! The DNS flags of `dev` and `serve`: validated into an authoritative server for the cluster
//! zone before anything is bound, then bound on UDP and TCP.

use std::net::SocketAddr;

use hangar_dns::DnsServer;
use tokio::net::{TcpListener, UdpSocket};

use crate::ConfigError;
use crate::cli::DevArgs;

/// Where DNS listens when `--dns` is not given.
const DEFAULT_DNS: &str = "127.0.0.1:5353";

/// The validated DNS server, not bound yet.
pub struct DnsSetup {
    addr: SocketAddr,
    server: DnsServer,
    /// Whether `--dns` was given. The default port (5353, shared with mDNS responders on many
    /// desktops) may be taken; then the plane runs without DNS and says so, instead of failing.
    explicit: bool,
}

/// Validates the DNS flags into a server (nothing bound yet); `None` with `--dns off`.
pub fn validate(args: &DevArgs, domain: &str) -> anyhow::Result<Option<DnsSetup>> {
    let (spec, explicit) = match &args.dns {
        Some(s) => (s.as_str(), true),
        None => (DEFAULT_DNS, false),
    };
    if spec.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let addr: SocketAddr = spec.parse().map_err(|_| {
        ConfigError(format!(
            "--dns {spec:?} is neither an address like {DEFAULT_DNS} nor off"
        ))
    })?;
    let proxy_addresses = if args.dns_proxy_address.is_empty() {
        vec![args.proxy.ip()]
    } else {
        args.dns_proxy_address.clone()
    };
    let mut dns = hangar_dns::DnsConfig::new(domain, proxy_addresses);
    dns.ttl = args.dns_ttl;
    dns.udp_batching = args.dns_udp_batching;
    if !addr.ip().is_unspecified() {
        dns.nameserver_addresses = vec![addr.ip()];
    }
    let server = DnsServer::new(&dns).map_err(|e| ConfigError(e.to_string()))?;
    Ok(Some(DnsSetup {
        addr,
        server,
        explicit,
    }))
}

impl DnsSetup {
    /// Binds UDP and TCP. A taken default port turns DNS off with a warning.
    pub async fn bind(self) -> anyhow::Result<Option<(DnsServer, (UdpSocket, TcpListener))>> {
        match hangar_dns::bind(self.addr).await {
            Ok(sockets) => Ok(Some((self.server, sockets))),
            Err(e) if !self.explicit => {
                // The prefix is `hangar dev` under `hangar serve` too, as it has always been.
                eprintln!(
                    "hangar dev: dns is off: {e} (choose an address with --dns, e.g. --dns 127.0.0.1:5354)"
                );
                Ok(None)
            }
            Err(e) => Err(ConfigError(format!(
                "{e} (choose another address with --dns, or turn dns off with --dns off)"
            ))
            .into()),
        }
    }
}
