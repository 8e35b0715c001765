//! Authoritative DNS for the cluster zone.
//!
//! This crate will answer `<backend>.<zone>` with the proxies' addresses while the backend is
//! live, from the same route snapshot the proxy uses (see the DNS issue). It holds no code yet.
