//! The server: [`DnsServer`] serves the [`Zone`] over TCP through hickory-server's transport
//! (`hickory_server::Server`) and over UDP through our own loop (`udp`, with the `fast` path),
//! both with a [`RequestHandler`] of our own that answers from the published snapshots. It never calls the scheduler: the binary pumps route tables and
//! ACME challenges in with [`DnsServer::publish_routes`] and
//! [`DnsServer::publish_acme_challenges`].
//!
//! Malformed packets never reach the handler: hickory (and the UDP loop, in the same way) drops
//! what has no readable header and answers FORMERR to what has one but does not parse. Each
//! TCP connection is a task in hickory's `JoinSet`s, aborted when [`DnsServer::run`] returns;
//! the UDP loop is part of `run`'s own future.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hangar_core::route::RouteTable;
use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::Record;
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, DnsConfig};
use crate::metrics::{self, TYPE_NONE};
use crate::udp;
use crate::zone::{Answer, Zone};

/// Responses queued per TCP connection (a channel of messages) before sending fails.
const TCP_RESPONSE_BUFFER: usize = 32;

/// UDP payload advertised and used for answers to EDNS queries: the DNS flag day 2020 value,
/// which avoids IP fragmentation. Our answers are far smaller anyway.
pub(crate) const EDNS_PAYLOAD: u16 = 1232;

/// How often [`bind`] retries when the TCP port matching an ephemeral UDP port is taken.
const BIND_ATTEMPTS: usize = 8;

/// Failures of the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot bind udp {addr} for dns: {source}")]
    BindUdp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind tcp {addr} for dns: {source}")]
    BindTcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the address of the dns {what} socket: {source}")]
    LocalAddr {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the dns server failed: {0}")]
    Serve(String),
    #[error("the dns server stopped unexpectedly")]
    Stopped,
}

/// Binds UDP and TCP on the same address. With port 0, UDP picks the port and TCP takes the
/// same one; if that TCP port is taken, both are bound again (a few times).
pub async fn bind(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| DnsError::BindUdp { addr, source })?;
        let bound = udp.local_addr().map_err(|source| DnsError::LocalAddr {
            what: "udp",
            source,
        })?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e)
                if addr.port() == 0
                    && e.kind() == io::ErrorKind::AddrInUse
                    && attempt < BIND_ATTEMPTS =>
            {
                tracing::debug!(%bound, "tcp port of the dns listener is taken; binding again");
            }
            Err(source) => {
                return Err(DnsError::BindTcp {
                    addr: bound,
                    source,
                });
            }
        }
    }
}

/// The authoritative DNS server for the cluster zone. Cheap to clone; every clone serves and
/// publishes to the same zone.
#[derive(Clone)]
pub struct DnsServer {
    zone: Arc<Zone>,
    tcp_idle_timeout: Duration,
    udp_io: udp::Io,
}

impl DnsServer {
    /// Validates `config` and builds the server (nothing is bound yet). Until a route table is
    /// published every backend name is NXDOMAIN.
    pub fn new(config: &DnsConfig) -> Result<Self, ConfigError> {
        Ok(DnsServer {
            zone: Arc::new(Zone::new(config)?),
            tcp_idle_timeout: config.tcp_idle_timeout,
            udp_io: udp::Io::configured(config.udp_batching),
        })
    }

    /// Replaces the route table answers come from (the same snapshot the proxy reads).
    pub fn publish_routes(&self, table: Arc<RouteTable>) {
        self.zone.publish_routes(table);
    }

    /// Replaces the ACME challenge TXT records: `(owner name, value)` pairs, the owner a full
    /// name inside the zone (`_acme-challenge.<zone>`). Several values per name are kept.
    pub fn publish_acme_challenges<'a>(
        &self,
        challenges: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        self.zone.publish_txt(challenges);
    }

    /// Publishes every table of a route feed until `cancel` fires or the feed ends.
    pub async fn follow_routes(
        &self,
        mut routes: watch::Receiver<Arc<RouteTable>>,
        cancel: CancellationToken,
    ) {
        loop {
            let table = routes.borrow_and_update().clone();
            self.publish_routes(table);
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = routes.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Serves queries on the already-bound `udp` socket and `tcp` listener until `shutdown`
    /// fires. Returns an error if a transport stops on its own.
    pub async fn run(
        &self,
        udp: UdpSocket,
        tcp: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), DnsError> {
        metrics::describe();
        // TCP through hickory's transport; UDP through our loop (`udp`), which answers the
        // common queries on a fast path and the rest like hickory would.
        let mut server = Server::new(Handler {
            zone: self.zone.clone(),
        });
        server.register_listener(tcp, self.tcp_idle_timeout, TCP_RESPONSE_BUFFER);
        let stop = server.shutdown_token().clone();
        let done = server.block_until_done();
        tokio::pin!(done);
        let udp = udp::serve_with(
            udp,
            Handler {
                zone: self.zone.clone(),
            },
            shutdown.clone(),
            self.udp_io,
        );
        tokio::pin!(udp);
        tokio::select! {
            r = &mut done => match r {
                Ok(()) => Err(DnsError::Stopped),
                Err(e) => Err(DnsError::Serve(e.to_string())),
            },
            // The UDP loop returns `Ok` only once `shutdown` fired.
            r = &mut udp => {
                stop.cancel();
                let tcp = done.await.map_err(|e| DnsError::Serve(e.to_string()));
                r.and(tcp)
            }
        }
    }
}

/// Answers queries from the zone's snapshots: hickory's TCP transport calls it once per parsed
/// message, the UDP loop (`udp`) for every query the fast path declines.
pub(crate) struct Handler {
    pub(crate) zone: Arc<Zone>,
}

/// The answer to one request, before encoding: the response header, EDNS and records.
pub(crate) struct Prepared {
    pub(crate) metadata: Metadata,
    pub(crate) edns: Option<Edns>,
    answer: Option<Answer>,
}

impl Prepared {
    /// The response message, borrowing the records and the request's question section.
    pub(crate) fn response<'q>(
        &'q self,
        request: &'q Request,
    ) -> MessageResponse<
        'q,
        'q,
        impl Iterator<Item = &'q Record> + Send + 'q,
        impl Iterator<Item = &'q Record> + Send + 'q,
        impl Iterator<Item = &'q Record> + Send + 'q,
        impl Iterator<Item = &'q Record> + Send + 'q,
    > {
        let (answers, authorities, additionals): (&[Record], &[Record], &[Record]) =
            match &self.answer {
                Some(a) => (&a.answers, &a.authorities, &a.additionals),
                None => (&[], &[], &[]),
            };
        MessageResponseBuilder::new(&request.queries, self.edns.as_ref()).build(
            self.metadata,
            answers.iter(),
            authorities.iter(),
            std::iter::empty(),
            additionals.iter(),
        )
    }
}

impl Handler {
    /// The response EDNS section for a request that had one (`None` otherwise).
    fn response_edns(request: &Request) -> Option<Edns> {
        let req = request.edns.as_ref()?;
        let mut edns = Edns::new();
        edns.set_version(0);
        edns.set_max_payload(req.max_payload().clamp(512, EDNS_PAYLOAD));
        Some(edns)
    }

    /// Answers one parsed request (and counts it). No IO, no waiting.
    pub(crate) fn prepare(&self, request: &Request) -> Prepared {
        let edns = Self::response_edns(request);
        let queries = request.queries.queries();
        let qtype = match queries {
            [q] => metrics::type_label(q.query_type()),
            _ => TYPE_NONE,
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = false;

        let mut answer = None;
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            metadata.response_code = ResponseCode::BADVERS;
        } else if request.metadata.op_code != OpCode::Query {
            // No updates, notifies or anything else: the zone is generated from live state.
            metadata.response_code = ResponseCode::NotImp;
        } else if let [query] = queries {
            let a = self.zone.lookup(query);
            metadata.response_code = a.rcode;
            metadata.authoritative = a.authoritative;
            answer = Some(a);
        } else {
            // Zero or several questions: nobody sends that (RFC 9619).
            metadata.response_code = ResponseCode::FormErr;
        }
        metrics::count(qtype, metadata.response_code);
        Prepared {
            metadata,
            edns,
            answer,
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let prepared = self.prepare(request);
        match response_handle
            .send_response(prepared.response(request))
            .await
        {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, src = %request.src(), "cannot send a dns response");
                let mut metadata = prepared.metadata;
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}
