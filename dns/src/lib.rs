//! hangar-dns: the authoritative DNS server for the cluster zone.
//!
//! `<backend>.<zone>` resolves to the proxies' addresses while the backend is live (its route
//! is starting or ready) and is NXDOMAIN once it is unknown or gone; the apex answers A/AAAA,
//! SOA and NS; `_acme-challenge.<zone>` carries the TXT values set through the API for DNS-01
//! challenges; names outside the zone are REFUSED and nothing is resolved recursively.
//!
//! Answers come from the same immutable [`RouteTable`](hangar_core::route::RouteTable)
//! snapshot the proxy reads, published into an `ArcSwap`: a query never calls the scheduler.
//! TCP is hickory-server's transport; UDP is a loop of ours that answers the common query (A or
//! AAAA of a name in the zone) from the wire bytes (the `fast` module) and everything else
//! through the same handler hickory's TCP transport calls, encoded as hickory would. The
//! answers are ours (the `zone` module). Like every Hangar server, [`DnsServer::run`] takes already-bound sockets
//! and a shutdown token.
//!
//! Invariants: never recurses or forwards; never answers for a name outside the zone; never
//! blocks a query on anything but the snapshots.

mod config;
mod fast;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
mod server;
mod udp;
mod zone;

pub use config::{ConfigError, DnsConfig, MAX_TTL};
pub use server::{DnsError, DnsServer, bind};
pub use zone::NS_LABEL;

#[cfg(test)]
mod tests;
