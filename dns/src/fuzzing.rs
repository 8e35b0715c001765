//! The body of the `dns_query` cargo-fuzz target (`fuzz/fuzz_targets/dns_query.rs`), shared
//! with the regression test that replays `fuzz/corpus/dns_query/` and
//! `fuzz/artifacts/dns_query/` in the normal suite. Not an API.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use hangar_core::BackendId;
use hangar_core::route::{Route, RouteState, RouteTable};
use hickory_proto::op::{LowerQuery, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;

use crate::config::DnsConfig;
use crate::server::{EDNS_PAYLOAD, Handler};
use crate::udp;
use crate::zone::Zone;

/// The zone every input is asked of, with live, gone and TXT names in it.
fn zone() -> &'static Arc<Zone> {
    static ZONE: OnceLock<Arc<Zone>> = OnceLock::new();
    ZONE.get_or_init(|| {
        let mut config = DnsConfig::new(
            "Hangar.Test.",
            vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
        );
        config.nameserver_addresses = vec!["127.0.0.53".parse().unwrap()];
        let zone = Zone::new(&config).expect("the fuzz zone is valid");
        let route = |id: &str, state| Route::new(BackendId::parse(id).unwrap(), state);
        zone.publish_routes(Arc::new(RouteTable::new(
            42,
            [
                route("bready", RouteState::Ready),
                route("bstarting", RouteState::Starting),
                route("bgone", RouteState::Gone),
            ],
        )));
        zone.publish_txt([
            ("_acme-challenge.hangar.test", "v1"),
            ("_acme-challenge.api.hangar.test", "v2"),
        ]);
        Arc::new(zone)
    })
}

/// Whether two names have the same labels, whatever their case.
fn same_name(a: &Name, b: &Name) -> bool {
    a.num_labels() == b.num_labels()
        && a.iter()
            .zip(b.iter())
            .all(|(x, y)| x.eq_ignore_ascii_case(y))
}

/// `dns_query`: `<mode>` then, for an even mode, a DNS message (answered by the UDP fast path
/// when it takes it, which must match the general path byte for byte; decoded as hickory's
/// server decodes it and, when it is a query, answered by the server's handler: the answer
/// must encode and decode back, echo the id and never offer recursion); for an odd mode
/// `<type: 2 bytes><class: 2 bytes><name>` asked of `Zone::lookup` directly (the name read as
/// text or, with mode bit 1, as raw labels split at dots): names outside the zone are refused,
/// names in it get an authoritative answer about that name only.
pub fn fuzz_dns_query(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        fuzz_message(rest);
    } else {
        fuzz_lookup(mode, rest);
    }
}

fn fuzz_lookup(mode: u8, data: &[u8]) {
    let [t0, t1, c0, c1, name @ ..] = data else {
        return;
    };
    let qtype = RecordType::from(u16::from_be_bytes([*t0, *t1]));
    let class = DNSClass::from(u16::from_be_bytes([*c0, *c1]));
    let name = if mode & 2 == 0 {
        Name::from_ascii(String::from_utf8_lossy(name))
    } else {
        Name::from_labels(name.split(|&b| b == b'.'))
    };
    let Ok(mut name) = name else {
        return;
    };
    if mode & 4 != 0 {
        name.set_fqdn(true);
    }
    let mut query = Query::query(name.clone(), qtype);
    query.set_query_class(class);
    let answer = zone().lookup(&LowerQuery::query(query));

    let origin = Name::from_ascii("hangar.test.").unwrap();
    let in_zone = origin.zone_of(&name)
        && matches!(class, DNSClass::IN | DNSClass::ANY)
        && !matches!(qtype, RecordType::AXFR | RecordType::IXFR);
    if !in_zone {
        assert_eq!(
            answer.rcode,
            ResponseCode::Refused,
            "{name} {qtype} {class}"
        );
        assert!(!answer.authoritative);
        assert!(answer.answers.is_empty() && answer.authorities.is_empty());
        return;
    }
    assert!(answer.authoritative, "{name} {qtype}");
    assert!(matches!(
        answer.rcode,
        ResponseCode::NoError | ResponseCode::NXDomain
    ));
    if answer.rcode == ResponseCode::NXDomain {
        assert!(answer.answers.is_empty());
    }
    if answer.answers.is_empty() {
        assert_eq!(answer.authorities.len(), 1, "the SOA for negative caching");
    }
    for record in &answer.answers {
        assert!(same_name(&record.name, &name), "{record} answers {name}");
        assert!(
            qtype == RecordType::ANY || record.record_type() == qtype,
            "{record} answers {qtype}"
        );
    }
    for record in answer.additionals.iter() {
        assert!(same_name(
            &record.name,
            &Name::from_ascii("ns.hangar.test.").unwrap()
        ));
    }
}

/// A response handler that keeps the encoded response.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Option<Vec<u8>>>>);

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut bytes = Vec::new();
        let mut encoder = BinEncoder::new(&mut bytes);
        let info = response.destructive_emit(&mut encoder)?;
        *self.0.lock().unwrap() = Some(bytes);
        Ok(info)
    }
}

fn fuzz_message(data: &[u8]) {
    let src = SocketAddr::from(([127, 0, 0, 1], 5353));
    // Differential: whatever the UDP fast path answers, the general path (hickory's decoding
    // and encoding around the handler) answers with the same bytes.
    let mut fast = Vec::new();
    if crate::fast::answer(
        &mut crate::fast::Views::new(zone()),
        data,
        EDNS_PAYLOAD,
        &mut fast,
    )
    .is_some()
    {
        let handler = Handler {
            zone: zone().clone(),
        };
        assert_eq!(
            Some(fast),
            udp::general_answer(&handler, data, src),
            "the fast path and the general path answer {data:02x?} differently"
        );
    }
    let Ok(request) = Request::from_bytes(data.to_vec(), src, Protocol::Udp) else {
        return;
    };
    // hickory's server drops responses before any handler sees them.
    if request.metadata.message_type == MessageType::Response {
        return;
    }
    let handler = Handler {
        zone: zone().clone(),
    };
    let capture = Capture::default();
    let mut answering = pin!(handler.handle_request::<_, TokioTime>(&request, capture.clone()));
    let Poll::Ready(_) = answering
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    else {
        panic!("the handler waited on something");
    };
    let bytes = capture
        .0
        .lock()
        .unwrap()
        .take()
        .expect("a response was sent");
    let response = Message::from_vec(&bytes).expect("the response decodes");
    assert_eq!(response.metadata.id, request.metadata.id);
    assert_eq!(response.metadata.message_type, MessageType::Response);
    assert!(!response.metadata.recursion_available);
    assert_eq!(response.queries.len(), request.queries.queries().len());
    if response.metadata.response_code == ResponseCode::NoError {
        for record in &response.answers {
            assert!(
                same_name(&record.name, response.queries[0].name()),
                "{record} answers {}",
                response.queries[0].name()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn dns_query_corpus_replays() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut n = 0;
        for dir in ["corpus", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join("dns_query")) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                if std::panic::catch_unwind(|| super::fuzz_dns_query(&data)).is_err() {
                    panic!("fuzz input {} fails", path.display());
                }
                n += 1;
            }
        }
        assert!(n > 0, "fuzz/corpus/dns_query holds the target's corpus");
    }
}
