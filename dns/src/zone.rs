//! The cluster zone: what the server knows (the route table snapshot and the ACME challenge
//! TXT values, each behind an `ArcSwap`) and the pure function from one query to one answer.
//!
//! Names in the zone:
//! - the apex: A/AAAA (the proxies), SOA, NS;
//! - `ns.<zone>`: A/AAAA of this server (the target of the NS record);
//! - `<backend>.<zone>`: A/AAAA of the proxies while the route is live (starting or ready);
//! - `_acme-challenge[.<name>].<zone>`: the TXT values set through the API.
//!
//! Anything else in the zone is NXDOMAIN (with the SOA, for negative caching); names outside
//! it are REFUSED. Every in-zone answer is authoritative.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hangar_core::route::RouteTable;
use hickory_proto::op::{LowerQuery, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, TXT};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};

use crate::config::DnsConfig;

/// The label of the name server's own name, `ns.<zone>`. Backend ids never collide with it:
/// generated ids start with `b`.
pub const NS_LABEL: &str = "ns";

/// SOA timers. Nothing transfers this zone, so only `minimum` (negative caching) matters.
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 86_400;

/// The longest character-string a TXT record can carry.
const MAX_TXT_LEN: usize = 255;

/// TXT values by owner name. Tiny (a handful of ACME challenges at most).
#[derive(Debug, Default)]
pub(crate) struct TxtRecords {
    by_name: HashMap<LowerName, Vec<String>>,
    /// Every TXT owner and each of its ancestors, in lowercase wire form: the names whose
    /// answers depend on the TXT records (their own values, or NODATA as an empty
    /// non-terminal). The UDP fast path leaves these to [`Zone::lookup`].
    related_wire: HashSet<Box<[u8]>>,
}

impl TxtRecords {
    /// True if some TXT owner lies strictly below `name` (which then exists as an empty
    /// non-terminal: NODATA rather than NXDOMAIN).
    fn has_below(&self, name: &LowerName) -> bool {
        self.by_name.keys().any(|k| k != name && name.zone_of(k))
    }

    /// Whether any answer depends on the TXT records (there are some).
    pub(crate) fn is_related(&self) -> bool {
        !self.related_wire.is_empty()
    }

    /// Whether the answer for `name` (lowercase wire form) depends on the TXT records.
    pub(crate) fn relates_to(&self, name: &[u8]) -> bool {
        self.related_wire.contains(name)
    }
}

/// The wire form of a name (labels, then the root).
pub(crate) fn wire_name(name: &Name) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for label in name.iter() {
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
    out
}

/// What one query gets back.
#[derive(Debug)]
pub(crate) struct Answer {
    pub rcode: ResponseCode,
    /// The AA bit: set for every answer about a name in the zone.
    pub authoritative: bool,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Answer {
    fn refused() -> Self {
        Answer {
            rcode: ResponseCode::Refused,
            authoritative: false,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

/// Which node of the zone a name is.
enum Node<'a> {
    Apex,
    Nameserver,
    Backend,
    Txt(&'a [String]),
    /// Exists only because a TXT owner lies below it.
    EmptyNonTerminal,
}

/// The zone and its published state. One per server; shared by every query.
pub(crate) struct Zone {
    origin: LowerName,
    origin_name: Name,
    /// The origin in lowercase wire form, for the UDP fast path (`fast`).
    pub(crate) origin_wire: Vec<u8>,
    /// Label count of the origin, for telling the apex from `<label>.<zone>` and deeper names.
    pub(crate) origin_labels: usize,
    ns_name: Name,
    hostmaster: Name,
    pub(crate) ttl: u32,
    pub(crate) proxy_v4: Vec<Ipv4Addr>,
    pub(crate) proxy_v6: Vec<Ipv6Addr>,
    pub(crate) ns_v4: Vec<Ipv4Addr>,
    pub(crate) ns_v6: Vec<Ipv6Addr>,
    /// The route table snapshot the proxy also reads; replaced whole by `publish_routes`
    /// (one writer: the route feed pump), loaded once per query and never held across
    /// `.await`.
    pub(crate) routes: ArcSwap<RouteTable>,
    /// ACME challenge values; replaced whole whenever the API changes them.
    pub(crate) txt: ArcSwap<TxtRecords>,
}

fn split(addrs: &[IpAddr]) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for ip in addrs {
        match ip {
            IpAddr::V4(a) if !v4.contains(a) => v4.push(*a),
            IpAddr::V6(a) if !v6.contains(a) => v6.push(*a),
            _ => {}
        }
    }
    (v4, v6)
}

impl Zone {
    /// Builds the zone from a validated configuration.
    pub(crate) fn new(config: &DnsConfig) -> Result<Self, crate::ConfigError> {
        config.validate()?;
        let invalid = |reason: &'static str| crate::ConfigError::InvalidZone {
            zone: config.zone.clone(),
            reason,
        };
        let zone = config.zone.trim_end_matches('.').to_ascii_lowercase();
        let mut origin_name =
            Name::from_ascii(&zone).map_err(|_| invalid("it cannot be parsed as a name"))?;
        origin_name.set_fqdn(true);
        let ns_name = origin_name
            .prepend_label(NS_LABEL)
            .map_err(|_| invalid("it is too long"))?;
        let hostmaster = origin_name
            .prepend_label("hostmaster")
            .map_err(|_| invalid("it is too long"))?;
        let (proxy_v4, proxy_v6) = split(&config.proxy_addresses);
        let ns_addrs = if config.nameserver_addresses.is_empty() {
            &config.proxy_addresses
        } else {
            &config.nameserver_addresses
        };
        let (ns_v4, ns_v6) = split(ns_addrs);
        Ok(Zone {
            origin: LowerName::new(&origin_name),
            origin_wire: wire_name(&origin_name),
            origin_labels: origin_name.iter().count(),
            origin_name,
            ns_name,
            hostmaster,
            ttl: config.ttl,
            proxy_v4,
            proxy_v6,
            ns_v4,
            ns_v6,
            routes: ArcSwap::from_pointee(RouteTable::default()),
            txt: ArcSwap::from_pointee(TxtRecords::default()),
        })
    }

    pub(crate) fn publish_routes(&self, table: Arc<RouteTable>) {
        self.routes.store(table);
    }

    /// Replaces the TXT values. Names outside the zone, unparsable names and values too long
    /// for one TXT string are skipped with a warning (the API rejects them before they get
    /// here).
    pub(crate) fn publish_txt<'a>(&self, records: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut by_name: HashMap<LowerName, Vec<String>> = HashMap::new();
        for (name, value) in records {
            let parsed = Name::from_ascii(name).map(|mut n| {
                n.set_fqdn(true);
                LowerName::new(&n)
            });
            let lower = match parsed {
                Ok(n) if self.origin.zone_of(&n) => n,
                _ => {
                    tracing::warn!(name, "skipping a TXT record whose name is not in the zone");
                    continue;
                }
            };
            if value.len() > MAX_TXT_LEN {
                tracing::warn!(name, "skipping a TXT value longer than 255 bytes");
                continue;
            }
            by_name.entry(lower).or_default().push(value.to_string());
        }
        for values in by_name.values_mut() {
            values.sort();
            values.dedup();
        }
        let mut related_wire = HashSet::new();
        for owner in by_name.keys() {
            let mut name = Name::from(owner);
            while name.iter().count() > self.origin_labels {
                related_wire.insert(wire_name(&name).into_boxed_slice());
                name = name.base_name();
            }
        }
        self.txt.store(Arc::new(TxtRecords {
            by_name,
            related_wire,
        }));
    }

    /// The zone's SOA record; the serial follows the route table revision.
    fn soa(&self, revision: u64) -> Record {
        Record::from_rdata(
            self.origin_name.clone(),
            self.ttl,
            RData::SOA(SOA::new(
                self.ns_name.clone(),
                self.hostmaster.clone(),
                // Wraps after 2^32 revisions; serial arithmetic (RFC 1982) tolerates that, and
                // nothing transfers this zone anyway.
                revision as u32,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                self.ttl,
            )),
        )
    }

    fn ns(&self) -> Record {
        Record::from_rdata(
            self.origin_name.clone(),
            self.ttl,
            RData::NS(NS(self.ns_name.clone())),
        )
    }

    fn push_addresses(
        &self,
        out: &mut Vec<Record>,
        owner: &Name,
        qtype: RecordType,
        v4: &[Ipv4Addr],
        v6: &[Ipv6Addr],
    ) {
        if matches!(qtype, RecordType::A | RecordType::ANY) {
            out.extend(
                v4.iter()
                    .map(|ip| Record::from_rdata(owner.clone(), self.ttl, RData::A(A(*ip)))),
            );
        }
        if matches!(qtype, RecordType::AAAA | RecordType::ANY) {
            out.extend(
                v6.iter()
                    .map(|ip| Record::from_rdata(owner.clone(), self.ttl, RData::AAAA(AAAA(*ip)))),
            );
        }
    }

    /// Answers one query from the current snapshots. No IO, no waiting.
    pub(crate) fn lookup(&self, query: &LowerQuery) -> Answer {
        let name = query.name();
        let qtype = query.query_type();
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY)
            || !self.origin.zone_of(name)
            // No zone transfers: the zone is generated from live state.
            || matches!(qtype, RecordType::AXFR | RecordType::IXFR)
        {
            return Answer::refused();
        }
        let routes = self.routes.load();
        let txt = self.txt.load();
        // Answer with the name as the client spelled it (0x20 case randomisation).
        let owner = query.original().name();
        let depth = name.iter().count() - self.origin_labels;
        let first = name.iter().next().unwrap_or_default();
        let node = if depth == 0 {
            Some(Node::Apex)
        } else if let Some(values) = txt.by_name.get(name) {
            Some(Node::Txt(values))
        } else if depth == 1 && first == NS_LABEL.as_bytes() {
            Some(Node::Nameserver)
        } else if depth == 1 && std::str::from_utf8(first).is_ok_and(|label| routes.is_live(label))
        {
            Some(Node::Backend)
        } else if txt.has_below(name) {
            Some(Node::EmptyNonTerminal)
        } else {
            None
        };

        let mut answer = Answer {
            rcode: ResponseCode::NoError,
            authoritative: true,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        };
        match node {
            None => answer.rcode = ResponseCode::NXDomain,
            Some(Node::Apex) => {
                self.push_addresses(
                    &mut answer.answers,
                    owner,
                    qtype,
                    &self.proxy_v4,
                    &self.proxy_v6,
                );
                if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                    answer.answers.push(self.soa(routes.revision));
                }
                if matches!(qtype, RecordType::NS | RecordType::ANY) {
                    answer.answers.push(self.ns());
                    // Glue: where the name server named above is.
                    let ns = self.ns_name.clone();
                    self.push_addresses(
                        &mut answer.additionals,
                        &ns,
                        RecordType::ANY,
                        &self.ns_v4,
                        &self.ns_v6,
                    );
                }
            }
            Some(Node::Nameserver) => {
                self.push_addresses(&mut answer.answers, owner, qtype, &self.ns_v4, &self.ns_v6)
            }
            Some(Node::Backend) => self.push_addresses(
                &mut answer.answers,
                owner,
                qtype,
                &self.proxy_v4,
                &self.proxy_v6,
            ),
            Some(Node::Txt(values)) => {
                if matches!(qtype, RecordType::TXT | RecordType::ANY) {
                    answer.answers.extend(values.iter().map(|v| {
                        Record::from_rdata(
                            owner.clone(),
                            self.ttl,
                            RData::TXT(TXT::new(vec![v.clone()])),
                        )
                    }));
                }
            }
            Some(Node::EmptyNonTerminal) => {}
        }
        if answer.answers.is_empty() {
            // NXDOMAIN or NODATA: the SOA in the authority section lets resolvers cache the
            // negative answer for its minimum (RFC 2308).
            answer.authorities.push(self.soa(routes.revision));
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_core::BackendId;
    use hangar_core::route::{Route, RouteState};
    use hickory_proto::op::Query;
    use std::str::FromStr;

    fn zone() -> Zone {
        let mut cfg = DnsConfig::new(
            "Hangar.Localhost.",
            vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
        );
        cfg.nameserver_addresses = vec!["127.0.0.53".parse().unwrap()];
        let z = Zone::new(&cfg).unwrap();
        let route = |id: &str, state| Route::new(BackendId::parse(id).unwrap(), state);
        z.publish_routes(Arc::new(RouteTable::new(
            42,
            [
                route("bstarting", RouteState::Starting),
                route("bready", RouteState::Ready),
                route("bgone", RouteState::Gone),
            ],
        )));
        z.publish_txt([
            ("_acme-challenge.hangar.localhost", "v2"),
            ("_ACME-challenge.hangar.localhost.", "v1"),
            ("_acme-challenge.api.hangar.localhost", "v3"),
            ("_acme-challenge.example.com", "outside"),
            ("_acme-challenge.hangar.localhost", &"x".repeat(256)),
        ]);
        z
    }

    fn ask(z: &Zone, name: &str, qtype: RecordType) -> Answer {
        z.lookup(&LowerQuery::query(Query::query(
            Name::from_ascii(name).unwrap(),
            qtype,
        )))
    }

    fn rdata(records: &[Record]) -> Vec<String> {
        records.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn answers_table() {
        use RecordType::*;
        let z = zone();
        // (name, type, rcode, answers, authorities contain the SOA)
        let cases: &[(&str, RecordType, ResponseCode, &[&str], bool)] = &[
            (
                "bready.hangar.localhost.",
                A,
                ResponseCode::NoError,
                &["127.0.0.1"],
                false,
            ),
            (
                "BReady.Hangar.Localhost.",
                AAAA,
                ResponseCode::NoError,
                &["::1"],
                false,
            ),
            (
                "bstarting.hangar.localhost.",
                A,
                ResponseCode::NoError,
                &["127.0.0.1"],
                false,
            ),
            (
                "bready.hangar.localhost.",
                ANY,
                ResponseCode::NoError,
                &["127.0.0.1", "::1"],
                false,
            ),
            (
                "bready.hangar.localhost.",
                MX,
                ResponseCode::NoError,
                &[],
                true,
            ),
            (
                "bgone.hangar.localhost.",
                A,
                ResponseCode::NXDomain,
                &[],
                true,
            ),
            (
                "bunknown.hangar.localhost.",
                A,
                ResponseCode::NXDomain,
                &[],
                true,
            ),
            (
                "x.bready.hangar.localhost.",
                A,
                ResponseCode::NXDomain,
                &[],
                true,
            ),
            ("*.hangar.localhost.", A, ResponseCode::NXDomain, &[], true),
            (
                "hangar.localhost.",
                A,
                ResponseCode::NoError,
                &["127.0.0.1"],
                false,
            ),
            (
                "hangar.localhost.",
                AAAA,
                ResponseCode::NoError,
                &["::1"],
                false,
            ),
            (
                "hangar.localhost.",
                NS,
                ResponseCode::NoError,
                &["ns.hangar.localhost."],
                false,
            ),
            ("hangar.localhost.", TXT, ResponseCode::NoError, &[], true),
            (
                "ns.hangar.localhost.",
                A,
                ResponseCode::NoError,
                &["127.0.0.53"],
                false,
            ),
            (
                "_acme-challenge.hangar.localhost.",
                TXT,
                ResponseCode::NoError,
                &["v1", "v2"],
                false,
            ),
            (
                "_acme-challenge.hangar.localhost.",
                A,
                ResponseCode::NoError,
                &[],
                true,
            ),
            (
                "_acme-challenge.api.hangar.localhost.",
                TXT,
                ResponseCode::NoError,
                &["v3"],
                false,
            ),
            // An empty non-terminal above a TXT owner exists: NODATA, not NXDOMAIN.
            ("api.hangar.localhost.", A, ResponseCode::NoError, &[], true),
            (
                "_acme-challenge.other.hangar.localhost.",
                TXT,
                ResponseCode::NXDomain,
                &[],
                true,
            ),
        ];
        for (name, qtype, rcode, answers, soa) in cases {
            let a = ask(&z, name, *qtype);
            let ctx = format!("{name} {qtype}");
            assert_eq!(a.rcode, *rcode, "{ctx}");
            assert!(a.authoritative, "{ctx}");
            let mut got = rdata(&a.answers);
            got.sort();
            assert_eq!(got, *answers, "{ctx}");
            assert_eq!(
                a.authorities
                    .iter()
                    .any(|r| r.record_type() == RecordType::SOA),
                *soa,
                "{ctx}"
            );
            // Answers carry the name as asked, and the configured TTL.
            for r in &a.answers {
                assert_eq!(r.name.to_string(), *name, "{ctx}");
                assert_eq!(r.ttl, 5, "{ctx}");
            }
        }
    }

    #[test]
    fn apex_soa_and_ns_glue() {
        let z = zone();
        let a = ask(&z, "hangar.localhost.", RecordType::SOA);
        let [soa] = a.answers.as_slice() else {
            panic!("one SOA expected: {a:?}")
        };
        let RData::SOA(soa) = &soa.data else {
            panic!("not a SOA: {soa:?}")
        };
        assert_eq!(soa.mname.to_string(), "ns.hangar.localhost.");
        assert_eq!(soa.rname.to_string(), "hostmaster.hangar.localhost.");
        assert_eq!(soa.serial, 42);
        assert_eq!(soa.minimum, 5);
        let ns = ask(&z, "hangar.localhost.", RecordType::NS);
        assert_eq!(rdata(&ns.additionals), ["127.0.0.53"]);
    }

    #[test]
    fn outside_the_zone_and_transfers_are_refused() {
        let z = zone();
        for (name, qtype) in [
            ("example.com.", RecordType::A),
            ("localhost.", RecordType::A),
            ("xhangar.localhost.", RecordType::A),
            (".", RecordType::NS),
            ("hangar.localhost.", RecordType::AXFR),
            ("hangar.localhost.", RecordType::IXFR),
        ] {
            let a = ask(&z, name, qtype);
            assert_eq!(a.rcode, ResponseCode::Refused, "{name} {qtype}");
            assert!(!a.authoritative, "{name}");
            assert!(a.answers.is_empty() && a.authorities.is_empty(), "{name}");
        }
        let mut q = Query::query(Name::from_str("hangar.localhost.").unwrap(), RecordType::A);
        q.set_query_class(DNSClass::CH);
        assert_eq!(z.lookup(&LowerQuery::query(q)).rcode, ResponseCode::Refused);
    }

    #[test]
    fn publishing_replaces_the_snapshot() {
        let z = zone();
        z.publish_routes(Arc::new(RouteTable::default()));
        assert_eq!(
            ask(&z, "bready.hangar.localhost.", RecordType::A).rcode,
            ResponseCode::NXDomain
        );
        z.publish_txt([]);
        assert_eq!(
            ask(&z, "_acme-challenge.hangar.localhost.", RecordType::TXT).rcode,
            ResponseCode::NXDomain
        );
    }
}
