//! Routes: the table the scheduler publishes and the proxy (and DNS) read, and the pure
//! functions that find which backend a request names.
//!
//! A [`RouteTable`] is an immutable snapshot: the scheduler publishes a new one for every batch
//! of changes and readers never see a half-applied update. A new table shares every shard the
//! batch did not touch with the one before, so a change costs what it touches, not the size of
//! the table.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::BackendId;

/// The cookie naming a backend.
pub const BACKEND_COOKIE: &str = "hangar-backend";
/// The header naming a backend.
pub const BACKEND_HEADER: &str = "x-hangar-backend";
/// The cookie carrying a token.
pub const TOKEN_COOKIE: &str = "hangar-token";
/// The query parameter carrying a token.
pub const TOKEN_QUERY: &str = "hangar_token";

/// What the proxy may do with requests for a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteState {
    /// Scheduled, starting or waiting: requests wait until it is ready (bounded).
    Starting,
    /// Ready at `address`.
    Ready,
    /// Terminating or terminated: requests get 410.
    Gone,
}

/// One backend's route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub backend: BackendId,
    pub state: RouteState,
    /// Where the backend listens; set once it is waiting or ready.
    pub address: Option<SocketAddr>,
    /// A public backend needs no token.
    pub public: bool,
    /// The drone running the backend and the pool it belongs to: the `drone` and `pool`
    /// labels of its metrics. Shared strings, so cloning a route on the request path never
    /// allocates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drone: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Arc<str>>,
    /// The key the backend serves, as `namespace/name`; `None` for a keyless backend (a warm
    /// one not claimed yet). Sent to the backend as `x-hangar-key` on every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Arc<str>>,
    /// The key's fencing epoch (0 when keyless). Sent to the backend as `x-hangar-epoch`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Route {
    /// A route to a private, keyless backend with no address yet, on no named drone or pool;
    /// set the other fields with struct update syntax.
    pub fn new(backend: BackendId, state: RouteState) -> Self {
        Route {
            backend,
            state,
            address: None,
            public: false,
            drone: None,
            pool: None,
            key: None,
            epoch: 0,
        }
    }
}

/// A table's routes are in 4,096 shards (a power of two), 64 groups of 64. A change copies
/// the list of groups (64 pointers), its group (64 pointers) and its shard (at 100,000 routes,
/// about 25 pointers to shared routes). With one level of 1,024 shards holding routes by value
/// a change copied about a hundred routes and every table the 1,024 pointers, so a burst of
/// changes (a lost drone's hundred backends, every drone lost at once) copied most of the
/// table at every publish.
const GROUP_BITS: u32 = 6;
const SHARD_BITS: u32 = 6;
const GROUPS: usize = 1 << GROUP_BITS;
const SHARDS_PER_GROUP: usize = 1 << SHARD_BITS;

/// An id's hash: its top bits choose the group and the shard, the rest find it in the shard.
/// Fixed, so every table (and every process) agrees; foldhash, because it is computed on
/// every proxied request and the ids are the scheduler's, not input an attacker chooses.
fn hash_of(id: &str) -> u64 {
    use std::hash::BuildHasher;
    const PLACE: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x68616e676172);
    PLACE.hash_one(id)
}

/// Which group and which shard in it hold the id of hash `h`.
fn place(h: u64) -> (usize, usize) {
    let group = (h >> (64 - GROUP_BITS)) as usize;
    let shard = (h >> (64 - GROUP_BITS - SHARD_BITS)) as usize & (SHARDS_PER_GROUP - 1);
    (group, shard)
}

/// The hash a shard's table uses: `h` with the bits every id of the shard shares moved to the
/// bottom (the table tells entries apart by the top bits).
fn in_shard(h: u64) -> u64 {
    h.rotate_left(GROUP_BITS + SHARD_BITS)
}

/// The routes whose ids fall in one shard, each an `Arc` shared by every table that holds the
/// same route: copying a shard copies pointers, not routes.
#[derive(Clone, Default)]
struct Shard(hashbrown::HashTable<Arc<Route>>);

impl Shard {
    fn get(&self, h: u64, id: &str) -> Option<&Arc<Route>> {
        self.0.find(in_shard(h), |r| r.backend.as_str() == id)
    }

    /// Removes `id`; whether it was there.
    fn remove(&mut self, h: u64, id: &str) -> bool {
        match self.0.find_entry(in_shard(h), |r| r.backend.as_str() == id) {
            Ok(entry) => {
                entry.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// Puts `route` in place of the one with its id; whether the id is new.
    fn upsert(&mut self, h: u64, route: Route) -> bool {
        let entry = self.0.entry(
            in_shard(h),
            |r| r.backend == route.backend,
            |r| in_shard(hash_of(r.backend.as_str())),
        );
        match entry {
            hashbrown::hash_table::Entry::Occupied(mut e) => {
                *e.get_mut() = Arc::new(route);
                false
            }
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(Arc::new(route));
                true
            }
        }
    }

    /// The route this shard holds under `r`'s id, if any.
    fn find(&self, r: &Route) -> Option<&Route> {
        let id = r.backend.as_str();
        self.get(hash_of(id), id).map(|r| &**r)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn values(&self) -> impl Iterator<Item = &Route> {
        self.0.iter().map(|r| &**r)
    }
}

impl PartialEq for Shard {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.values().all(|r| other.find(r) == Some(r))
    }
}

type Group = Vec<Arc<Shard>>;

/// An immutable snapshot of every known route, with the store revision it reflects.
///
/// Sharded in two levels: [`RouteTable::apply`] copies only the groups and shards its changes
/// fall in and shares the others with the table it started from, and [`RouteTable::diff`]
/// compares only the shards two tables do not share.
#[derive(Clone, Serialize, Deserialize)]
#[serde(from = "WireTable", into = "WireTable")]
pub struct RouteTable {
    pub revision: u64,
    groups: Vec<Arc<Group>>,
    len: usize,
}

/// A table as it travels (to a remote proxy's snapshot): every route by id.
#[derive(Serialize, Deserialize)]
struct WireTable {
    revision: u64,
    routes: HashMap<BackendId, Route>,
}

impl From<WireTable> for RouteTable {
    fn from(w: WireTable) -> Self {
        RouteTable::new(w.revision, w.routes.into_values())
    }
}

impl From<RouteTable> for WireTable {
    fn from(t: RouteTable) -> Self {
        WireTable {
            revision: t.revision,
            routes: t.routes().map(|r| (r.backend.clone(), r.clone())).collect(),
        }
    }
}

impl Default for RouteTable {
    fn default() -> Self {
        // One empty shard and one group of it, shared until a change copies them.
        let empty_shard = Arc::new(Shard::default());
        let empty = Arc::new(vec![empty_shard; SHARDS_PER_GROUP]);
        RouteTable {
            revision: 0,
            groups: vec![empty; GROUPS],
            len: 0,
        }
    }
}

/// The pairs of shards at the same place in two tables that are not one shared shard.
fn unshared<'a>(
    a: &'a [Arc<Group>],
    b: &'a [Arc<Group>],
) -> impl Iterator<Item = (&'a Arc<Shard>, &'a Arc<Shard>)> {
    a.iter()
        .zip(b)
        .filter(|(x, y)| !Arc::ptr_eq(x, y))
        .flat_map(|(x, y)| x.iter().zip(y.iter()))
        .filter(|(x, y)| !Arc::ptr_eq(x, y))
}

impl PartialEq for RouteTable {
    fn eq(&self, other: &Self) -> bool {
        self.revision == other.revision
            && self.len == other.len
            && unshared(&self.groups, &other.groups).all(|(a, b)| a == b)
    }
}

impl Eq for RouteTable {}

impl std::fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTable")
            .field("revision", &self.revision)
            .field("routes", &self.len)
            .finish()
    }
}

impl RouteTable {
    pub fn new(revision: u64, routes: impl IntoIterator<Item = Route>) -> Self {
        let mut groups: Vec<Vec<Shard>> = (0..GROUPS)
            .map(|_| (0..SHARDS_PER_GROUP).map(|_| Shard::default()).collect())
            .collect();
        let mut len = 0;
        for r in routes {
            let h = hash_of(r.backend.as_str());
            let (g, s) = place(h);
            if groups[g][s].upsert(h, r) {
                len += 1;
            }
        }
        RouteTable {
            revision,
            groups: groups
                .into_iter()
                .map(|g| Arc::new(g.into_iter().map(Arc::new).collect()))
                .collect(),
            len,
        }
    }

    pub fn get(&self, backend: &str) -> Option<&Route> {
        self.get_shared(backend).map(|r| &**r)
    }

    /// [`Self::get`], as the table holds it: a holder that keeps the route past the table
    /// (the proxy, for a request) clones one `Arc`, not the route's four shared strings.
    pub fn get_shared(&self, backend: &str) -> Option<&Arc<Route>> {
        let h = hash_of(backend);
        let (g, s) = place(h);
        self.groups[g][s].get(h, backend)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.groups
            .iter()
            .flat_map(|g| g.iter())
            .flat_map(|s| s.values())
    }

    /// The changes that turn `self` into `newer`: routes added or changed, and removed ids.
    /// Groups and shards the two tables share are skipped, so the cost is that of the shards
    /// changed between them.
    pub fn diff(&self, newer: &RouteTable) -> (Vec<Route>, Vec<BackendId>) {
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for (old, new) in unshared(&self.groups, &newer.groups) {
            upserts.extend(new.values().filter(|r| old.find(r) != Some(r)).cloned());
            removals.extend(
                old.values()
                    .filter(|r| new.find(r).is_none())
                    .map(|r| r.backend.clone()),
            );
        }
        (upserts, removals)
    }

    /// A new table at `revision` with `upserts` applied and `removals` removed. It shares
    /// every group and shard without a change with `self`.
    pub fn apply(&self, revision: u64, upserts: &[Route], removals: &[BackendId]) -> RouteTable {
        let mut groups = self.groups.clone();
        let mut len = self.len;
        for id in removals {
            let h = hash_of(id.as_str());
            let (g, s) = place(h);
            if groups[g][s].get(h, id.as_str()).is_some() {
                Arc::make_mut(&mut Arc::make_mut(&mut groups[g])[s]).remove(h, id.as_str());
                len -= 1;
            }
        }
        for r in upserts {
            let h = hash_of(r.backend.as_str());
            let (g, s) = place(h);
            if groups[g][s].get(h, r.backend.as_str()).map(|x| &**x) != Some(r)
                && Arc::make_mut(&mut Arc::make_mut(&mut groups[g])[s]).upsert(h, r.clone())
            {
                len += 1;
            }
        }
        RouteTable {
            revision,
            groups,
            len,
        }
    }

    /// How many shards `self` and `other` do not share (for tests of the cost of a change).
    pub fn shards_not_shared_with(&self, other: &RouteTable) -> usize {
        unshared(&self.groups, &other.groups).count()
    }

    /// How many groups `self` and `other` do not share (for tests of the cost of a change).
    pub fn groups_not_shared_with(&self, other: &RouteTable) -> usize {
        self.groups
            .iter()
            .zip(&other.groups)
            .filter(|(a, b)| !Arc::ptr_eq(a, b))
            .count()
    }

    /// Live routes (starting or ready): what DNS answers for.
    pub fn is_live(&self, backend: &str) -> bool {
        self.get(backend)
            .is_some_and(|r| r.state != RouteState::Gone)
    }
}

/// How a request named its backend (a metrics label and a debugging aid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteMode {
    Host,
    Header,
    Cookie,
}

impl RouteMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteMode::Host => "host",
            RouteMode::Header => "header",
            RouteMode::Cookie => "cookie",
        }
    }
}

/// The parts of a request that can name a backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestNames<'a> {
    pub host: Option<&'a str>,
    pub header: Option<&'a str>,
    /// Every `Cookie` header value, in order.
    pub cookies: &'a [&'a str],
}

/// Finds the backend a request names: the Host `<id>.<domain>` first, then the
/// `x-hangar-backend` header, then the `hangar-backend` cookie. Returns `None` if nothing
/// names one. Allocates only when the Host label has upper-case letters.
pub fn resolve<'a>(names: &RequestNames<'a>, domain: &str) -> Option<(Cow<'a, str>, RouteMode)> {
    if let Some(label) = names.host.and_then(|host| host_name(host, domain)) {
        return Some((label, RouteMode::Host));
    }
    if let Some(h) = names.header {
        let h = h.trim();
        if !h.is_empty() {
            return Some((Cow::Borrowed(h), RouteMode::Header));
        }
    }
    for c in names.cookies {
        if let Some(v) = cookie_value(c, BACKEND_COOKIE) {
            return Some((Cow::Borrowed(v), RouteMode::Cookie));
        }
    }
    None
}

/// The backend name `host` gives (its label, lowercased) when it is `<label>.<domain>`: what
/// [`resolve`] returns first, whatever else the request carries, so a caller that finds it
/// need not collect the rest of [`RequestNames`].
pub fn host_name<'a>(host: &'a str, domain: &str) -> Option<Cow<'a, str>> {
    let label = host_label(host, domain)?;
    Some(if label.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(label.to_ascii_lowercase())
    } else {
        Cow::Borrowed(label)
    })
}

/// If `host` (optionally with `:port`) is `<label>.<domain>` with a single label, returns it.
pub fn host_label<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let host = strip_port(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.len() <= domain.len() + 1 {
        return None;
    }
    let split = host.len() - domain.len();
    // A multi-byte character across the split cannot end in `domain` (which starts with a
    // whole character); splitting there used to panic (found by fuzzing).
    let (head, tail) = host.split_at_checked(split)?;
    if !tail.eq_ignore_ascii_case(domain) {
        return None;
    }
    let label = head.strip_suffix('.')?;
    // Byte loops here and in `strip_port`: a host name is short, and the proxy asks this of
    // every request (`memchr`'s set-up cost more than the search).
    if label.is_empty() || label.bytes().any(|b| b == b'.') {
        return None;
    }
    Some(label)
}

/// `host` without a `:port` (digits after its last colon, or none).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: never a backend name.
        return host;
    }
    // The trailing digits, then the colon before them (after the last colon, nothing but
    // digits).
    let bytes = host.as_bytes();
    let digits = bytes
        .iter()
        .rev()
        .take_while(|b| b.is_ascii_digit())
        .count();
    match bytes.len().checked_sub(digits + 1) {
        Some(colon) if bytes[colon] == b':' => &host[..colon],
        _ => host,
    }
}

/// The value of cookie `name` in one `Cookie` header value (`a=1; b=2`).
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// The value of query parameter `name` in a query string, percent-decoding not needed for
/// tokens (base64url and '.' only).
pub fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// Whether query parameter name `key` is `name`, the way a backend's framework would read
/// it: percent-decoded and in any case (`hangar%5Ftoken`, `HANGAR_TOKEN`).
fn param_is(key: &str, name: &str) -> bool {
    if !key.contains('%') {
        return key.eq_ignore_ascii_case(name);
    }
    let bytes = key.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) if bytes[i] == b'%' => {
                decoded.push(b);
                i += 3;
            }
            _ => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    decoded.eq_ignore_ascii_case(name.as_bytes())
}

fn param_key(pair: &str) -> &str {
    pair.split_once('=').map_or(pair, |(k, _)| k)
}

/// Whether `query` carries parameter `name` (under any spelling a backend would decode to it).
pub fn has_query_param(query: &str, name: &str) -> bool {
    query.split('&').any(|pair| param_is(param_key(pair), name))
}

/// `query` without parameter `name` (all occurrences, under any spelling a backend would
/// decode to it); `None` if nothing remains.
pub fn strip_query_param(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty() && !param_is(param_key(pair), name))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// A `Cookie` header value without cookie `name`; `None` if nothing remains.
pub fn strip_cookie(header: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = header
        .split(';')
        .map(str::trim)
        .filter(|pair| {
            let k = pair.split_once('=').map_or(*pair, |(k, _)| k).trim();
            k != name && !pair.is_empty()
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "hangar.localhost";

    fn names<'a>(
        host: Option<&'a str>,
        header: Option<&'a str>,
        cookies: &'a [&'a str],
    ) -> RequestNames<'a> {
        RequestNames {
            host,
            header,
            cookies,
        }
    }

    type Case<'a> = (
        Option<&'a str>,
        Option<&'a str>,
        &'a [&'a str],
        Option<(&'a str, RouteMode)>,
    );

    #[test]
    fn resolution_table() {
        let cases: &[Case<'_>] = &[
            (
                Some("b1.hangar.localhost"),
                None,
                &[],
                Some(("b1", RouteMode::Host)),
            ),
            (
                Some("b1.hangar.localhost:8080"),
                None,
                &[],
                Some(("b1", RouteMode::Host)),
            ),
            (
                Some("B1.Hangar.Localhost"),
                None,
                &[],
                Some(("b1", RouteMode::Host)),
            ),
            (
                Some("b1.hangar.localhost."),
                None,
                &[],
                Some(("b1", RouteMode::Host)),
            ),
            (Some("a.b1.hangar.localhost"), None, &[], None),
            (Some("hangar.localhost"), None, &[], None),
            (Some("b1.other.example"), None, &[], None),
            (Some("xhangar.localhost"), None, &[], None),
            (
                Some("127.0.0.1:8080"),
                Some("b2"),
                &[],
                Some(("b2", RouteMode::Header)),
            ),
            (
                Some("127.0.0.1"),
                Some("  "),
                &["hangar-backend=b3"],
                Some(("b3", RouteMode::Cookie)),
            ),
            (
                None,
                None,
                &["a=1; hangar-backend=b4; c=2"],
                Some(("b4", RouteMode::Cookie)),
            ),
            (
                None,
                None,
                &["a=1", "hangar-backend=\"b5\""],
                Some(("b5", RouteMode::Cookie)),
            ),
            // Host wins over header and cookie.
            (
                Some("b1.hangar.localhost"),
                Some("b2"),
                &["hangar-backend=b3"],
                Some(("b1", RouteMode::Host)),
            ),
            (Some("[::1]:80"), None, &["hangar-backendx=b9"], None),
            (None, None, &[], None),
        ];
        for (host, header, cookies, want) in cases {
            let got = resolve(&names(*host, *header, cookies), D);
            let got = got.as_ref().map(|(s, m)| (s.as_ref(), *m));
            assert_eq!(
                got, *want,
                "host={host:?} header={header:?} cookies={cookies:?}"
            );
        }
    }

    /// `strip_port` takes off what splitting at the last colon took off before (kept here as
    /// the reference): digits after the last colon, or nothing after it.
    #[test]
    fn a_port_is_digits_after_the_last_colon() {
        fn by_split(host: &str) -> &str {
            if host.starts_with('[') {
                return host;
            }
            match host.rsplit_once(':') {
                Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => host,
            }
        }
        let parts = [
            "",
            ":",
            "a",
            "b1.hangar.localhost",
            "80",
            "8x",
            "\u{e9}",
            "[::1]",
            ".",
        ];
        for a in parts {
            for b in parts {
                for c in parts {
                    let host = format!("{a}{b}{c}");
                    assert_eq!(strip_port(&host), by_split(&host), "{host:?}");
                }
            }
        }
        assert_eq!(
            strip_port("b1.hangar.localhost:8080"),
            "b1.hangar.localhost"
        );
        assert_eq!(strip_port("b1.hangar.localhost:"), "b1.hangar.localhost");
        assert_eq!(strip_port("b1:8x"), "b1:8x");
    }

    /// Found by fuzzing (`fuzz/artifacts/route/`): a multi-byte character where the domain
    /// would start panicked, and the proxy asks this of every `Host`.
    #[test]
    fn a_multibyte_character_across_the_domain_is_no_label() {
        assert_eq!(
            host_label("\u{e9}\u{e9}.hangar.localhost", D),
            Some("\u{e9}\u{e9}")
        );
        for host in [
            "a\u{e9}angar.localhost",
            "\u{10348}aaaaaaaaaaaaaa",
            "b1.\u{fffd}\u{fffd}xxxxxxxxxxxx:8080",
        ] {
            assert_eq!(host_label(host, D), None, "{host:?}");
            assert!(resolve(&names(Some(host), None, &[]), D).is_none());
        }
    }

    #[test]
    fn query_and_cookie_helpers() {
        assert_eq!(
            query_value("a=1&hangar_token=t.x&b", TOKEN_QUERY),
            Some("t.x")
        );
        assert_eq!(query_value("a=1", TOKEN_QUERY), None);
        assert_eq!(
            strip_query_param("a=1&hangar_token=t&b=2", TOKEN_QUERY).as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(strip_query_param("hangar_token=t", TOKEN_QUERY), None);
        assert_eq!(
            strip_cookie("a=1; hangar-token=x; b=2", TOKEN_COOKIE).as_deref(),
            Some("a=1; b=2")
        );
        assert_eq!(strip_cookie("hangar-token=x", TOKEN_COOKIE), None);
    }

    #[test]
    fn diff_then_apply_reproduces_the_newer_table() {
        let r = |id: &str, state| Route::new(BackendId::parse(id).unwrap(), state);
        let old = RouteTable::new(1, [r("a", RouteState::Starting), r("b", RouteState::Ready)]);
        let new = RouteTable::new(5, [r("a", RouteState::Ready), r("c", RouteState::Starting)]);
        let (up, rm) = old.diff(&new);
        assert_eq!(up.len(), 2);
        assert_eq!(rm, vec![BackendId::parse("b").unwrap()]);
        assert_eq!(old.apply(5, &up, &rm), new);
        let (up, rm) = new.diff(&new);
        assert!(up.is_empty() && rm.is_empty());
    }

    /// Routes serialized before `key` and `epoch` existed still decode (keyless), and a keyless
    /// route serializes without them.
    #[test]
    fn key_and_epoch_are_optional_on_the_wire() {
        let old = r#"{"backend":"b1","state":"ready","address":null,"public":false}"#;
        let r: Route = serde_json::from_str(old).unwrap();
        assert_eq!((r.key.as_deref(), r.epoch), (None, 0));
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("key") && !json.contains("epoch"), "{json}");

        let keyed = Route {
            key: Some("team/alice".into()),
            epoch: 7,
            ..Route::new(BackendId::parse("b1").unwrap(), RouteState::Ready)
        };
        let json = serde_json::to_string(&keyed).unwrap();
        assert!(json.contains(r#""key":"team/alice","epoch":7"#), "{json}");
        assert_eq!(serde_json::from_str::<Route>(&json).unwrap(), keyed);
    }

    #[test]
    fn table_lookup() {
        let id = BackendId::parse("b1").unwrap();
        let t = RouteTable::new(7, [Route::new(id.clone(), RouteState::Gone)]);
        assert_eq!(t.revision, 7);
        assert_eq!(t.get("b1").unwrap().state, RouteState::Gone);
        assert!(!t.is_live("b1"));
        assert!(t.get("b2").is_none());
    }

    /// A change copies only the shard it falls in; the rest of a 10,000-route table is shared,
    /// and the diff of the two tables is exactly the change.
    #[test]
    fn a_change_copies_its_shard_and_shares_the_rest() {
        let r = |i: usize, state| Route::new(BackendId::parse(&format!("b{i}")).unwrap(), state);
        let big = RouteTable::new(1, (0..10_000).map(|i| r(i, RouteState::Ready)));
        assert_eq!(big.len(), 10_000);
        let changed = big.apply(2, &[r(7, RouteState::Gone)], &[]);
        assert_eq!(changed.shards_not_shared_with(&big), 1);
        assert_eq!(changed.groups_not_shared_with(&big), 1);
        assert_eq!(changed.len(), 10_000);
        assert_eq!(changed.get("b7").unwrap().state, RouteState::Gone);
        assert_eq!(
            big.get("b7").unwrap().state,
            RouteState::Ready,
            "the old table is intact"
        );
        let (up, rm) = big.diff(&changed);
        assert_eq!((up, rm), (vec![r(7, RouteState::Gone)], vec![]));

        let removed = BackendId::parse("b9").unwrap();
        let next = changed.apply(
            3,
            &[r(20_000, RouteState::Starting)],
            std::slice::from_ref(&removed),
        );
        assert!(next.shards_not_shared_with(&changed) <= 2);
        assert_eq!(next.len(), 10_000);
        assert!(next.get("b9").is_none());
        let (up, rm) = changed.diff(&next);
        assert_eq!(
            (up, rm),
            (vec![r(20_000, RouteState::Starting)], vec![removed])
        );
        // An upsert that changes nothing copies nothing.
        let same = next.apply(4, &[r(20_000, RouteState::Starting)], &[]);
        assert_eq!(same.shards_not_shared_with(&next), 0);
        // Built whole or by changes, the same routes make equal tables.
        let whole = RouteTable::new(3, next.routes().cloned());
        assert_eq!(whole, next);
    }

    /// Random batches of upserts and removals applied change by change give the table built
    /// whole from the same routes, and each diff is exactly the batch's effect.
    #[test]
    fn batches_applied_match_the_table_built_whole() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let route = |i: u32, state| Route::new(BackendId::parse(&format!("b{i}")).unwrap(), state);
        let mut model: HashMap<BackendId, Route> = HashMap::new();
        let mut table = RouteTable::default();
        for revision in 1..200u64 {
            let size = if revision % 20 == 0 {
                3_000
            } else {
                rng.random_range(1..40)
            };
            let (mut upserts, mut removals) = (Vec::new(), Vec::new());
            for _ in 0..size {
                let i = rng.random_range(0..5_000u32);
                if rng.random_bool(0.3) {
                    removals.push(BackendId::parse(&format!("b{i}")).unwrap());
                } else {
                    let state = [RouteState::Starting, RouteState::Ready, RouteState::Gone]
                        [rng.random_range(0..3)];
                    upserts.push(route(i, state));
                }
            }
            // One id in one batch at most once, as the route feed sends them.
            let mut seen = std::collections::HashSet::new();
            upserts.retain(|r| seen.insert(r.backend.clone()));
            removals.retain(|id| seen.insert(id.clone()));
            let before = model.clone();
            for id in &removals {
                model.remove(id);
            }
            for r in &upserts {
                model.insert(r.backend.clone(), r.clone());
            }
            let next = table.apply(revision, &upserts, &removals);
            assert_eq!(next, RouteTable::new(revision, model.values().cloned()));
            assert_eq!(next.len(), model.len());
            let (mut up, mut rm) = table.diff(&next);
            let mut want_up: Vec<Route> = upserts
                .iter()
                .filter(|r| before.get(&r.backend) != Some(r))
                .cloned()
                .collect();
            let mut want_rm: Vec<BackendId> = removals
                .iter()
                .filter(|id| before.contains_key(*id))
                .cloned()
                .collect();
            for v in [&mut up, &mut want_up] {
                v.sort_by(|a, b| a.backend.cmp(&b.backend));
            }
            rm.sort();
            want_rm.sort();
            assert_eq!((up, rm), (want_up, want_rm), "revision {revision}");
            table = next;
        }
    }

    /// On the wire a table is its revision and its routes by id, as before it was sharded.
    #[test]
    fn a_table_travels_as_routes_by_id() {
        let id = BackendId::parse("b1").unwrap();
        let t = RouteTable::new(7, [Route::new(id, RouteState::Ready)]);
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["revision"], 7);
        assert_eq!(v["routes"]["b1"]["state"], "ready");
        let back: RouteTable = serde_json::from_value(v).unwrap();
        assert_eq!(back, t);
    }
}
