//! DNS metrics through the `metrics` facade: `hangar_dns_queries_total{type, rcode}`, one
//! increment per answered query. Labels come from small fixed sets so that random query types
//! cannot grow the number of series.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

/// Queries answered, by query type and response code.
pub const QUERIES_TOTAL: &str = "hangar_dns_queries_total";

/// The `type` label of a query with no single question (answered FORMERR).
pub const TYPE_NONE: &str = "none";

/// Describes the metrics to the installed recorder (call once after installing it).
pub fn describe() {
    metrics::describe_counter!(
        QUERIES_TOTAL,
        metrics::Unit::Count,
        "DNS queries answered, by query type and response code."
    );
}

/// The `type` label: the common types by name, everything else `other`.
pub fn type_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::ANY => "ANY",
        RecordType::AXFR => "AXFR",
        RecordType::CAA => "CAA",
        RecordType::CNAME => "CNAME",
        RecordType::DNSKEY => "DNSKEY",
        RecordType::DS => "DS",
        RecordType::HTTPS => "HTTPS",
        RecordType::IXFR => "IXFR",
        RecordType::MX => "MX",
        RecordType::NS => "NS",
        RecordType::PTR => "PTR",
        RecordType::SOA => "SOA",
        RecordType::SRV => "SRV",
        RecordType::SVCB => "SVCB",
        RecordType::TXT => "TXT",
        _ => "other",
    }
}

/// The `rcode` label, in the mnemonic form `dig` prints.
pub fn rcode_label(r: ResponseCode) -> &'static str {
    match r {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "other",
    }
}

pub(crate) fn count(qtype: &'static str, rcode: ResponseCode) {
    metrics::counter!(QUERIES_TOTAL, "type" => qtype, "rcode" => rcode_label(rcode)).increment(1);
}
