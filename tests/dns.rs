//! DNS end to end with `dig` (Debian's `dnsutils`) against `hangar dev`: answers for live
//! backends, NXDOMAIN within a second of terminate, the ACME TXT lifecycle through the API,
//! REFUSED outside the zone, TCP, and flag validation.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{DEADLINE, Dev, cli, dev_cli};

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// One record line of dig's output: owner, TTL, type, data.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rr {
    name: String,
    ttl: u32,
    rtype: String,
    data: String,
}

/// What dig printed, parsed.
#[derive(Debug)]
struct Dig {
    status: String,
    flags: Vec<String>,
    answer: Vec<Rr>,
    authority: Vec<Rr>,
    raw: String,
}

impl Dig {
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn data(&self, rtype: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .answer
            .iter()
            .filter(|r| r.rtype == rtype)
            .map(|r| r.data.clone())
            .collect();
        v.sort();
        v
    }
}

/// Runs `dig @server name type` plus `extra` (one try, 2 s) and parses the answer.
fn dig(server: SocketAddr, name: &str, rtype: &str, extra: &[&str]) -> Dig {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=2", "+tries=1"])
        .args(extra)
        .args([name, rtype])
        .output()
        .expect(
            "cannot run dig: install it with `apt-get install dnsutils` (scripts/test.sh does)",
        );
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut dig = Dig {
        status: String::new(),
        flags: Vec::new(),
        answer: Vec::new(),
        authority: Vec::new(),
        raw: raw.clone(),
    };
    let mut section = "";
    for line in raw.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            dig.status = rest.split(',').next().unwrap_or("").trim().to_string();
        } else if let Some(rest) = line.strip_prefix(";; flags: ") {
            let flags = rest.split(';').next().unwrap_or("");
            dig.flags = flags.split_whitespace().map(str::to_string).collect();
        } else if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
        } else if line.is_empty() || line.starts_with(';') {
            section = "";
        } else if !section.is_empty() {
            let mut parts = line.split_whitespace();
            let (Some(name), Some(ttl), Some(_class), Some(rtype)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                panic!("unexpected dig line {line:?} in\n{raw}");
            };
            let rr = Rr {
                name: name.to_string(),
                ttl: ttl.parse().unwrap(),
                rtype: rtype.to_string(),
                data: parts.collect::<Vec<_>>().join(" "),
            };
            match section {
                "answer" => dig.answer.push(rr),
                _ => dig.authority.push(rr),
            }
        }
    }
    assert!(
        !dig.status.is_empty(),
        "dig got no answer from {server} for {name} {rtype}:\n{raw}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dig
}

/// Digs until `pred` holds; fails the test at the deadline.
fn dig_until(
    server: SocketAddr,
    name: &str,
    rtype: &str,
    what: &str,
    pred: impl Fn(&Dig) -> bool,
) -> Dig {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let d = dig(server, name, rtype, &[]);
        if pred(&d) {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "{name} {rtype} never {what}; last:\n{}",
            d.raw
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_negative(d: &Dig, status: &str) {
    assert_eq!(d.status, status, "{}", d.raw);
    assert!(d.has_flag("aa"), "authoritative: {}", d.raw);
    assert!(d.answer.is_empty(), "{}", d.raw);
    assert!(
        d.authority.iter().any(|r| r.rtype == "SOA"),
        "the SOA comes with negative answers: {}",
        d.raw
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_for_a_live_backend_and_nxdomain_within_a_second_of_terminate() {
    let dir = scratch();
    let dev = Dev::start(dir.path(), &[]);
    let dns = dev.dns.expect("dns listening");
    let a = dev.connect_key("dns-doc").await;
    let id = a.backend_id.as_str().to_string();
    let name = format!("{id}.hangar.localhost");

    // Live (starting or ready): the proxy's address, authoritative, short TTL, no recursion.
    let d = dig_until(dns, &name, "A", "resolved", |d| d.status == "NOERROR");
    assert_eq!(d.data("A"), [dev.proxy.ip().to_string()], "{}", d.raw);
    assert!(d.has_flag("aa") && !d.has_flag("ra"), "{}", d.raw);
    assert!(d.answer.iter().all(|r| r.ttl == 5), "{}", d.raw);
    dev.wait_ready(&id).await;
    let d = dig(dns, &name.to_uppercase(), "A", &[]);
    assert_eq!(d.status, "NOERROR", "names are case-insensitive: {}", d.raw);

    // Unknown backends and deeper names are NXDOMAIN.
    assert_negative(
        &dig(dns, "bnosuchbackend.hangar.localhost", "A", &[]),
        "NXDOMAIN",
    );
    assert_negative(&dig(dns, &format!("x.{name}"), "A", &[]), "NXDOMAIN");

    // Terminate: NXDOMAIN within a second.
    let r = dev
        .http
        .post(dev.api_url(&format!("/v1/backends/{id}/terminate")))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let terminated = Instant::now();
    let d = dig_until(dns, &name, "A", "became NXDOMAIN", |d| {
        d.status == "NXDOMAIN"
    });
    let took = terminated.elapsed();
    assert!(took < Duration::from_secs(1), "NXDOMAIN took {took:?}");
    assert_negative(&d, "NXDOMAIN");
    eprintln!("dns: NXDOMAIN {took:?} after terminate");
}

async fn acme(dev: &Dev, method: reqwest::Method, body: Value) -> (u16, Value) {
    let r = dev
        .http
        .request(method, dev.api_url("/v1/dns/acme-challenge"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_acme_challenge_txt_lifecycle_through_the_api() {
    let dir = scratch();
    let dev = Dev::start(dir.path(), &[]);
    let dns = dev.dns.expect("dns listening");
    let name = "_acme-challenge.hangar.localhost";
    assert_negative(&dig(dns, name, "TXT", &[]), "NXDOMAIN");

    let (status, v) = acme(&dev, reqwest::Method::POST, json!({"value": "tok-A_1"})).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["name"], name);
    let (status, _) = acme(&dev, reqwest::Method::POST, json!({"value": "tok-A_1"})).await;
    assert_eq!(status, 200, "setting the same value again is a no-op");
    let (status, _) = acme(
        &dev,
        reqwest::Method::POST,
        json!({"value": "tok-B", "name": "_acme-challenge.hangar.localhost."}),
    )
    .await;
    assert_eq!(status, 201);
    let d = dig_until(dns, name, "TXT", "had both values", |d| {
        d.data("TXT").len() == 2
    });
    assert_eq!(d.data("TXT"), ["\"tok-A_1\"", "\"tok-B\""], "{}", d.raw);
    assert!(d.has_flag("aa"), "{}", d.raw);
    let (status, v) = acme(&dev, reqwest::Method::GET, json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(v["challenges"].as_array().unwrap().len(), 2, "{v}");

    // Bad input is a 400 naming the field.
    let (status, v) = acme(
        &dev,
        reqwest::Method::POST,
        json!({"value": "x", "name": "_acme-challenge.example.com"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("`name`"),
        "{v}"
    );
    let (status, v) = acme(&dev, reqwest::Method::POST, json!({"value": "has space"})).await;
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("`value`"),
        "{v}"
    );
    let (status, _) = acme(&dev, reqwest::Method::POST, json!({})).await;
    assert_eq!(status, 400);

    // Clear one value, then all.
    let (status, v) = acme(&dev, reqwest::Method::DELETE, json!({"value": "tok-A_1"})).await;
    assert_eq!((status, v["deleted"].as_u64()), (200, Some(1)), "{v}");
    let d = dig_until(dns, name, "TXT", "lost the first value", |d| {
        d.data("TXT").len() == 1
    });
    assert_eq!(d.data("TXT"), ["\"tok-B\""], "{}", d.raw);
    let (status, v) = acme(&dev, reqwest::Method::DELETE, json!({})).await;
    assert_eq!((status, v["deleted"].as_u64()), (200, Some(1)), "{v}");
    let d = dig_until(dns, name, "TXT", "vanished", |d| d.status == "NXDOMAIN");
    assert_negative(&d, "NXDOMAIN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_refuses_other_zones_and_answers_over_tcp() {
    let dir = scratch();
    let dev = Dev::start(
        dir.path(),
        &[
            "--dns-proxy-address",
            "127.0.0.7",
            "--dns-proxy-address",
            "::1",
            "--dns-ttl",
            "3",
            // The batched UDP calls, end to end (the other tests run the default, a call per
            // query).
            "--dns-udp-batching",
        ],
    );
    let dns = dev.dns.expect("dns listening");

    for name in ["example.com", "localhost", "xhangar.localhost"] {
        let d = dig(dns, name, "A", &[]);
        assert_eq!(d.status, "REFUSED", "{}", d.raw);
        assert!(!d.has_flag("aa") && !d.has_flag("ra"), "{}", d.raw);
        assert!(d.answer.is_empty(), "{}", d.raw);
    }

    // Over TCP: the apex, and a live backend with the configured addresses and TTL.
    let d = dig(dns, "hangar.localhost", "SOA", &["+tcp"]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    let soa = d.data("SOA");
    assert!(
        soa.len() == 1 && soa[0].starts_with("ns.hangar.localhost. hostmaster.hangar.localhost."),
        "{}",
        d.raw
    );
    let d = dig(dns, "hangar.localhost", "NS", &["+tcp"]);
    assert_eq!(d.data("NS"), ["ns.hangar.localhost."], "{}", d.raw);
    let d = dig(dns, "hangar.localhost", "A", &["+tcp"]);
    assert_eq!(d.data("A"), ["127.0.0.7"], "{}", d.raw);

    let a = dev.connect_key("dns-tcp").await;
    let name = format!("{}.hangar.localhost", a.backend_id);
    let d = dig_until(dns, &name, "A", "resolved", |d| d.status == "NOERROR");
    assert_eq!(d.data("A"), ["127.0.0.7"], "{}", d.raw);
    let d = dig(dns, &name, "AAAA", &["+tcp"]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.data("AAAA"), ["::1"], "{}", d.raw);
    assert!(d.answer.iter().all(|r| r.ttl == 3), "{}", d.raw);
    assert!(d.has_flag("aa"), "{}", d.raw);
    let d = dig(dns, "example.com", "A", &["+tcp"]);
    assert_eq!(d.status, "REFUSED", "{}", d.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_flags_are_validated_before_binding_and_dns_can_be_off() {
    let dir = scratch();
    let data_dir = dir.path().to_str().unwrap();
    let run = |extra: &[&str]| dev_cli(data_dir, extra);
    let (code, _, err) = run(&["--dns", "nonsense"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--dns"), "{err}");
    let (code, _, err) = run(&["--dns", "127.0.0.1:0", "--dns-ttl", "100000"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("ttl"), "{err}");
    // A proxy on every interface has no single address to answer with.
    let args: Vec<&str> = [
        "dev",
        "--api",
        "127.0.0.1:0",
        "--proxy",
        "0.0.0.0:0",
        "--data-dir",
        data_dir,
        "--dns",
        "127.0.0.1:0",
    ]
    .to_vec();
    let (code, _, err) = cli(&args);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--dns-proxy-address"), "{err}");

    // Taken: the port of another running DNS server.
    let other = scratch();
    let first = Dev::start(other.path(), &[]);
    let taken = first.dns.unwrap().to_string();
    let (code, _, err) = run(&["--dns", &taken]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--dns off"), "{err}");

    let dev = Dev::start(dir.path(), &["--dns", "off"]);
    assert_eq!(dev.dns, None);
    let r = dev.http.get(dev.api_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
