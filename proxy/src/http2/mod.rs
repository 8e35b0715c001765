//! Hangar's own HTTP/2 server for the proxy path (h2c with prior knowledge, and `h2` by ALPN).
//!
//! The `h2` crate cost about as many instructions per request as the rest of the request path
//! together: request heads decoded into `http` types (a header map, a parsed URI) only for the
//! proxy to read a few fields and write them out again, and a response head turned into a
//! header map and encoded from it. Here a request's header block is decoded into one buffer
//! that the request path reads in place ([`request::H2Request`]), and a response head is
//! encoded straight from the header lines the upstream client produced.
//!
//! - [`frame`]: the wire format.
//! - [`hpack`]: header compression (RFC 7541); responses are encoded without the dynamic
//!   table.
//! - [`request`]: the request head, checked against RFC 9113 §8, and the request body.
//! - [`conn`]: the connection, its streams and flow control, on one task.

pub(crate) mod conn;
pub(crate) mod frame;
pub(crate) mod hpack;
pub(crate) mod request;

pub(crate) use conn::{Settings, serve};

#[cfg(test)]
mod protocol_tests;
