//! The bodies of the cargo-fuzz targets over this crate (`fuzz/fuzz_targets/token.rs` and
//! `route.rs`), shared with the regression tests that replay `fuzz/corpus/<target>/` and
//! `fuzz/artifacts/<target>/` in the normal suite. Each one takes arbitrary bytes, runs the
//! real functions on them and panics when a property fails. Not an API.

use std::borrow::Cow;

use crate::ids::validate_label;
use crate::route::{self, RequestNames, RouteMode};
use crate::token::{self, TokenError, TokenKey};

/// The key the token target verifies with; the seed corpus holds tokens signed with it, so
/// that mutations start from tokens that verify.
pub const FUZZ_TOKEN_KEY: [u8; 32] = [7; 32];
/// The time the token target verifies at (the seeds expire later).
pub const FUZZ_NOW: u64 = 1_700_000_000;

/// The input's parts: split at NUL bytes, each read as UTF-8 (lossily).
fn parts(data: &[u8]) -> Vec<Cow<'_, str>> {
    data.split(|&b| b == 0)
        .map(String::from_utf8_lossy)
        .collect()
}

/// `token`: `<token>\0<backend>\0<hex key>` (the later parts optional). Token inspection
/// (`looks_like_token`, `peek_backend`, `token_id`) and verification never panic, and a token
/// that verifies is exactly the one the key signs for its claims (nothing else is accepted:
/// no second spelling of a payload or tag).
pub fn fuzz_token(data: &[u8]) {
    let parts = parts(data);
    let token = parts.first().map_or("", |s| s.as_ref());
    let backend = parts.get(1).map_or("b1", |s| s.as_ref());

    let looks = token::looks_like_token(token);
    let id = token::token_id(token);
    let peeked = token::peek_backend(token);
    if id.is_some() || peeked.is_some() {
        assert!(
            token.starts_with("v1."),
            "only v1 tokens have parts: {token:?}"
        );
        assert!(looks, "a token with parts looks like a token: {token:?}");
    }

    let key = TokenKey::from_bytes(FUZZ_TOKEN_KEY);
    match key.verify(token, backend, FUZZ_NOW) {
        Ok(claims) => {
            assert!(claims.expires_at > FUZZ_NOW);
            assert_eq!(
                key.sign(backend, &claims.user, claims.expires_at),
                token,
                "an accepted token is the one the key signs for its claims"
            );
            assert_eq!(peeked.as_deref(), Some(backend));
            assert!(looks && id.is_some());
        }
        Err(TokenError::Missing | TokenError::Revoked) => {
            unreachable!("verify never answers Missing or Revoked")
        }
        Err(_) => {}
    }

    // Signing what the input names and verifying it back round-trips whenever the parts
    // cannot be confused with the payload's separators and are as long as the API lets them
    // be (a backend id is at most 63 bytes, a user 200).
    if !backend.contains('\n') && !token.contains('\n') && backend.len() <= 63 && token.len() <= 200
    {
        let t = key.sign(backend, token, FUZZ_NOW + 1);
        let claims = key
            .verify(&t, backend, FUZZ_NOW)
            .expect("a fresh token verifies");
        assert_eq!(claims.user, token);
        assert_eq!(token::token_id(&t), t.rsplit('.').next());
        assert_eq!(token::peek_backend(&t).as_deref(), Some(backend));
        assert_eq!(
            key.verify(&t, backend, FUZZ_NOW + 1),
            Err(TokenError::Expired)
        );
    }

    if let Some(hex) = parts.get(2)
        && let Ok(k) = TokenKey::from_hex(hex)
    {
        assert_eq!(k.to_hex(), hex.trim().to_ascii_lowercase());
    }
}

/// The domains the route target resolves against (the first byte picks one).
const DOMAINS: [&str; 4] = [
    "hangar.localhost",
    "h.test",
    "example.com.",
    "xn--bcher-kva.example",
];

/// `route`: `<domain selector byte><host>\0<header>\0<query>\0<cookie>...`. Resolution is total
/// (never panics), picks the Host label when there is one (lower-cased, a single label of the
/// domain), and the helpers that strip the token from a query or a cookie leave nothing the
/// readers would find.
pub fn fuzz_route(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let domain = DOMAINS[usize::from(selector) % DOMAINS.len()];
    let parts = parts(rest);
    let host = parts.first().map(|s| s.as_ref());
    let header = parts.get(1).map(|s| s.as_ref());
    let query = parts.get(2).map_or("", |s| s.as_ref());
    let cookies: Vec<&str> = parts.iter().skip(3).map(|s| s.as_ref()).collect();
    let names = RequestNames {
        host,
        header,
        cookies: &cookies,
    };

    let label = host.and_then(|h| route::host_label(h, domain));
    let resolved = route::resolve(&names, domain);
    if let Some(label) = label {
        assert!(!label.is_empty() && !label.contains('.'), "{label:?}");
        let h = host.unwrap_or_default();
        assert!(
            h.len() > label.len() && h.is_char_boundary(label.len()),
            "{label:?} starts {h:?}"
        );
        assert!(
            h[label.len()..].starts_with('.'),
            "the label is the host's first: {label:?} in {h:?}"
        );
        let (name, mode) = resolved.as_ref().expect("a host label resolves");
        assert_eq!(*mode, RouteMode::Host);
        assert_eq!(name.as_ref(), label.to_ascii_lowercase());
    }
    match &resolved {
        Some((name, RouteMode::Header)) => {
            assert!(label.is_none());
            assert_eq!(name.as_ref(), header.unwrap_or_default().trim());
            assert!(!name.is_empty());
        }
        Some((name, RouteMode::Cookie)) => {
            assert!(label.is_none());
            assert!(header.is_none_or(|h| h.trim().is_empty()));
            assert_eq!(
                Some(name.as_ref()),
                cookies
                    .iter()
                    .find_map(|c| route::cookie_value(c, route::BACKEND_COOKIE))
            );
        }
        Some((_, RouteMode::Host)) => assert!(label.is_some()),
        None => {
            assert!(label.is_none() && header.is_none_or(|h| h.trim().is_empty()));
        }
    }
    if let Some((name, _)) = &resolved {
        // What the proxy does next with the name: look it up (ids are DNS labels).
        let _ = validate_label(name);
    }

    for name in [route::TOKEN_QUERY, "a"] {
        let had = route::has_query_param(query, name);
        if route::query_value(query, name).is_some() {
            assert!(
                had,
                "query_value finds {name} where has_query_param does not"
            );
        }
        match route::strip_query_param(query, name) {
            Some(q) => {
                assert!(!route::has_query_param(&q, name), "{q:?} still has {name}");
                assert_eq!(route::query_value(&q, name), None);
                assert!(!q.is_empty() && q.len() <= query.len());
            }
            None => assert!(
                query.split('&').all(|p| p.is_empty()) || had,
                "only an empty query or the parameter alone strips to nothing: {query:?}"
            ),
        }
    }
    for c in &cookies {
        for name in [route::TOKEN_COOKIE, route::BACKEND_COOKIE] {
            let _ = route::cookie_value(c, name);
            if let Some(rest) = route::strip_cookie(c, name) {
                assert_eq!(route::cookie_value(&rest, name), None, "{rest:?}");
                assert!(!rest.is_empty());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// Every input kept for `target`: its corpus and any crash artifacts.
    pub(crate) fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut inputs = Vec::new();
        for dir in ["corpus", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                if path.is_file() {
                    inputs.push((path.clone(), std::fs::read(&path).unwrap()));
                }
            }
        }
        inputs.sort();
        inputs
    }

    fn replay(target: &str, run: fn(&[u8])) {
        let inputs = corpus(target);
        assert!(
            !inputs.is_empty(),
            "fuzz/corpus/{target} holds the target's corpus"
        );
        for (path, data) in inputs {
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                panic!("fuzz input {} fails", path.display());
            }
        }
    }

    #[test]
    fn token_corpus_replays() {
        replay("token", super::fuzz_token);
    }

    #[test]
    fn route_corpus_replays() {
        replay("route", super::fuzz_route);
    }
}
