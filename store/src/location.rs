//! Where the store lives, as `hangar serve --store` spells it, and opening it: `embedded` (a
//! redb file in the data directory) or `etcd://host:port[,host:port...][/prefix]`.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use crate::embedded::EmbeddedStore;
use crate::etcd::{EtcdOptions, EtcdStore};
use crate::{Store, StoreResult};

/// The embedded store's file in the data directory.
pub const EMBEDDED_FILE: &str = "state.redb";

/// Which store to open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StoreLocation {
    /// [`EmbeddedStore`] in [`EMBEDDED_FILE`] of the data directory.
    #[default]
    Embedded,
    /// [`EtcdStore`] on these members, under this key prefix.
    Etcd(EtcdOptions),
}

/// A `--store` value that names no store.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LocationError {
    #[error("expected `embedded` or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`")]
    Unknown,
    #[error("no etcd endpoint given: list the members as etcd://HOST:PORT[,HOST:PORT...]")]
    NoEndpoint,
    #[error("etcd endpoint {0:?} is not HOST:PORT (with a port from 1 to 65535)")]
    BadEndpoint(String),
    #[error("key prefix {0:?} may only contain printable ASCII other than spaces")]
    BadPrefix(String),
}

impl FromStr for StoreLocation {
    type Err = LocationError;

    fn from_str(s: &str) -> Result<StoreLocation, LocationError> {
        if s == "embedded" {
            return Ok(StoreLocation::Embedded);
        }
        let rest = s.strip_prefix("etcd://").ok_or(LocationError::Unknown)?;
        let (hosts, prefix) = match rest.find('/') {
            Some(slash) => (&rest[..slash], rest[slash..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if !prefix.chars().all(|c| c.is_ascii_graphic()) {
            return Err(LocationError::BadPrefix(prefix.to_owned()));
        }
        if hosts.is_empty() {
            return Err(LocationError::NoEndpoint);
        }
        let endpoints = hosts
            .split(',')
            .map(|endpoint| {
                valid_endpoint(endpoint)
                    .then(|| endpoint.to_owned())
                    .ok_or_else(|| LocationError::BadEndpoint(endpoint.to_owned()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StoreLocation::Etcd(
            EtcdOptions::new(endpoints).with_prefix(prefix),
        ))
    }
}

/// `host:port` or `[v6]:port`, with a non-zero port.
fn valid_endpoint(endpoint: &str) -> bool {
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        return false;
    };
    let host_ok = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']').is_some_and(|v6| !v6.is_empty()),
        None => {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        }
    };
    host_ok && port.parse::<u16>().is_ok_and(|port| port != 0)
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Embedded => f.write_str("embedded"),
            StoreLocation::Etcd(options) => {
                write!(
                    f,
                    "etcd://{}{}",
                    options.endpoints_display(),
                    options.prefix
                )
            }
        }
    }
}

/// Opens the store at `location`; the embedded one in `data_dir`.
pub async fn open(location: &StoreLocation, data_dir: &Path) -> StoreResult<Arc<dyn Store>> {
    Ok(match location {
        StoreLocation::Embedded => {
            EmbeddedStore::open_default(data_dir.join(EMBEDDED_FILE)).await?
        }
        StoreLocation::Etcd(options) => EtcdStore::connect(options.clone()).await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etcd(endpoints: &[&str], prefix: &str) -> StoreLocation {
        StoreLocation::Etcd(
            EtcdOptions::new(endpoints.iter().map(|e| (*e).to_owned()).collect())
                .with_prefix(prefix),
        )
    }

    #[test]
    fn locations_parse() {
        let cases: &[(&str, Result<StoreLocation, LocationError>)] = &[
            ("embedded", Ok(StoreLocation::Embedded)),
            ("etcd://h1:2379", Ok(etcd(&["h1:2379"], ""))),
            (
                "etcd://h1:2379,h2:2379,10.0.0.3:2379",
                Ok(etcd(&["h1:2379", "h2:2379", "10.0.0.3:2379"], "")),
            ),
            ("etcd://h1:2379/team-a", Ok(etcd(&["h1:2379"], "/team-a"))),
            ("etcd://h1:2379/team-a/", Ok(etcd(&["h1:2379"], "/team-a"))),
            ("etcd://h1:2379/a/b", Ok(etcd(&["h1:2379"], "/a/b"))),
            ("etcd://h1:2379/", Ok(etcd(&["h1:2379"], ""))),
            ("etcd://[::1]:2379", Ok(etcd(&["[::1]:2379"], ""))),
            ("redb", Err(LocationError::Unknown)),
            ("", Err(LocationError::Unknown)),
            ("http://h1:2379", Err(LocationError::Unknown)),
            ("etcd://", Err(LocationError::NoEndpoint)),
            ("etcd:///prefix", Err(LocationError::NoEndpoint)),
            (
                "etcd://h1",
                Err(LocationError::BadEndpoint("h1".to_owned())),
            ),
            (
                "etcd://h1:2379,",
                Err(LocationError::BadEndpoint(String::new())),
            ),
            (
                "etcd://h1:0",
                Err(LocationError::BadEndpoint("h1:0".to_owned())),
            ),
            (
                "etcd://h1:99999",
                Err(LocationError::BadEndpoint("h1:99999".to_owned())),
            ),
            (
                "etcd://h 1:2379",
                Err(LocationError::BadEndpoint("h 1:2379".to_owned())),
            ),
            (
                "etcd://[]:2379",
                Err(LocationError::BadEndpoint("[]:2379".to_owned())),
            ),
            (
                "etcd://h1:2379/a b",
                Err(LocationError::BadPrefix("/a b".to_owned())),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(&input.parse::<StoreLocation>(), expected, "{input:?}");
        }
    }

    #[test]
    fn locations_display_as_parsed() {
        for input in [
            "embedded",
            "etcd://h1:2379,h2:2379/team-a",
            "etcd://h1:2379",
        ] {
            let location: StoreLocation = input.parse().unwrap();
            assert_eq!(location.to_string(), input);
        }
    }

    #[tokio::test]
    async fn open_embedded_uses_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&StoreLocation::Embedded, dir.path()).await.unwrap();
        store.put("k", b"v".to_vec(), None).await.unwrap();
        assert!(dir.path().join(EMBEDDED_FILE).exists());
    }
}
