//! Property tests of route resolution and tokens: resolution is total and picks the Host label
//! when there is one, the token helpers strip what the readers find, and tokens round-trip.

use proptest::prelude::*;

use crate::route::{
    self, BACKEND_COOKIE, RequestNames, RouteMode, TOKEN_COOKIE, TOKEN_QUERY, host_label,
};
use crate::token::{TokenError, TokenKey};

const DOMAIN: &str = "hangar.localhost";

/// `label` with each letter's case picked by `upper`.
fn with_case(label: &str, upper: &[bool]) -> String {
    label
        .chars()
        .zip(upper.iter().cycle())
        .map(|(c, &u)| if u { c.to_ascii_uppercase() } else { c })
        .collect()
}

proptest! {
    #[test]
    fn an_ascii_value_looks_like_a_token_read_in_place_as_it_does_read_as_text(
        pieces in proptest::collection::vec(
            prop_oneof![
                3 => prop::sample::select(vec![" ", "\t", "\x0b", "\r", "\"", "v1.", "V1.", "v1", "."])
                    .prop_map(String::from),
                1 => "[ -~]{0,3}",
            ],
            0..7,
        ),
    ) {
        let value = pieces.concat();
        prop_assert_eq!(
            crate::token::looks_like_ascii_token(value.as_bytes()),
            crate::token::looks_like_token(&value),
            "{:?}",
            value
        );
    }

    #[test]
    fn resolution_is_total(
        host in proptest::option::of(any::<String>()),
        header in proptest::option::of(any::<String>()),
        cookies in proptest::collection::vec(any::<String>(), 0..4),
        domain in prop_oneof![Just(DOMAIN.to_string()), any::<String>()],
    ) {
        let cookies: Vec<&str> = cookies.iter().map(String::as_str).collect();
        let names = RequestNames {
            host: host.as_deref(),
            header: header.as_deref(),
            cookies: &cookies,
        };
        let _ = route::resolve(&names, &domain);
        if let Some(h) = &host {
            let _ = host_label(h, &domain);
        }
    }

    #[test]
    fn a_host_label_wins(
        label in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
        upper in proptest::collection::vec(any::<bool>(), 1..8),
        port in proptest::option::of(any::<u16>()),
        trailing_dot in any::<bool>(),
        header in proptest::option::of("[ -~]{0,12}"),
        cookie in proptest::option::of("[ -~]{0,24}"),
    ) {
        let mut host = format!("{}.{}", with_case(&label, &upper), with_case(DOMAIN, &upper));
        if trailing_dot {
            host.push('.');
        }
        if let Some(p) = port {
            host.push_str(&format!(":{p}"));
        }
        let cookies: Vec<&str> = cookie.iter().map(String::as_str).collect();
        let names = RequestNames {
            host: Some(&host),
            header: header.as_deref(),
            cookies: &cookies,
        };
        let (name, mode) = route::resolve(&names, DOMAIN).expect("a host label resolves");
        prop_assert_eq!(mode, RouteMode::Host);
        prop_assert_eq!(name.as_ref(), label.as_str());
    }

    #[test]
    fn without_a_host_label_the_header_then_the_cookie_names_the_backend(
        host in proptest::option::of("[a-z0-9.:]{0,20}"),
        header in proptest::option::of("[a-z0-9]{1,12}"),
        before in "[a-z]{1,6}=[a-z0-9]{0,6}",
        cookie in "[a-z0-9]{1,12}",
    ) {
        let host = host.filter(|h| host_label(h, DOMAIN).is_none());
        let cookie_header = format!("{before}; {BACKEND_COOKIE}={cookie}");
        let cookies = [cookie_header.as_str()];
        let names = RequestNames {
            host: host.as_deref(),
            header: header.as_deref(),
            cookies: &cookies,
        };
        let got = route::resolve(&names, DOMAIN).map(|(n, m)| (n.into_owned(), m));
        let want = match &header {
            Some(h) => (h.clone(), RouteMode::Header),
            None => (cookie, RouteMode::Cookie),
        };
        prop_assert_eq!(got, Some(want));
    }

    #[test]
    fn stripping_the_token_parameter_keeps_the_others_in_order(
        params in proptest::collection::vec(("[a-z]{1,6}", "[a-zA-Z0-9.]{0,8}"), 0..6),
        tokens in proptest::collection::vec(
            (prop_oneof![
                Just("hangar_token"),
                Just("HANGAR_TOKEN"),
                Just("hangar%5Ftoken"),
                Just("hangar%5ftoken"),
                Just("%68angar_token"),
            ], "[a-zA-Z0-9.]{0,8}", any::<prop::sample::Index>()),
            0..3,
        ),
    ) {
        let mut pairs: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let kept = pairs.clone();
        for (name, value, at) in &tokens {
            pairs.insert(at.index(pairs.len() + 1), format!("{name}={value}"));
        }
        let query = pairs.join("&");
        prop_assert_eq!(route::has_query_param(&query, TOKEN_QUERY), !tokens.is_empty());
        let stripped = route::strip_query_param(&query, TOKEN_QUERY);
        prop_assert_eq!(stripped.clone(), (!kept.is_empty()).then(|| kept.join("&")));
        if let Some(q) = stripped {
            prop_assert!(!route::has_query_param(&q, TOKEN_QUERY));
        }
    }

    #[test]
    fn stripping_the_token_cookie_keeps_the_others(
        cookies in proptest::collection::vec(("[a-z]{1,6}", "[a-zA-Z0-9.]{0,8}"), 0..5),
        token in proptest::option::of("v1\\.[a-zA-Z0-9._-]{1,20}"),
    ) {
        let mut pairs: Vec<String> = cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let kept = pairs.join("; ");
        if let Some(t) = &token {
            pairs.push(format!("{TOKEN_COOKIE}={t}"));
        }
        let header = pairs.join("; ");
        prop_assert_eq!(route::cookie_value(&header, TOKEN_COOKIE), token.as_deref());
        let stripped = route::strip_cookie(&header, TOKEN_COOKIE);
        prop_assert_eq!(stripped.clone(), (!kept.is_empty()).then_some(kept));
        if let Some(s) = stripped {
            prop_assert_eq!(route::cookie_value(&s, TOKEN_COOKIE), None);
        }
    }

    #[test]
    fn tokens_round_trip_and_bind_their_backend(
        backend in "[a-z0-9]{1,20}",
        other in "[a-z0-9]{1,20}",
        user in "[^\n]{0,40}",
        expires_at in 1u64..u64::MAX,
        now in any::<u64>(),
    ) {
        let key = TokenKey::generate();
        let token = key.sign(&backend, &user, expires_at);
        let got = key.verify(&token, &backend, now);
        if now < expires_at {
            let claims = got.expect("a fresh token verifies");
            prop_assert_eq!(claims.user, user);
            prop_assert_eq!(claims.expires_at, expires_at);
        } else {
            prop_assert_eq!(got, Err(TokenError::Expired));
        }
        if other != backend {
            prop_assert_eq!(key.verify(&token, &other, 0), Err(TokenError::WrongBackend));
        }
        prop_assert_eq!(
            TokenKey::generate().verify(&token, &backend, 0),
            Err(TokenError::BadSignature)
        );
    }

    /// The fuzz targets' properties on arbitrary text.
    #[test]
    fn the_token_and_route_targets_hold_on_any_text(
        parts in proptest::collection::vec(any::<String>(), 0..5),
        selector in any::<u8>(),
    ) {
        let joined = parts.join("\0");
        crate::fuzzing::fuzz_token(joined.as_bytes());
        let mut data = vec![selector];
        data.extend_from_slice(joined.as_bytes());
        crate::fuzzing::fuzz_route(&data);
    }
}
