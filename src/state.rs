//! `hangar state export` and `hangar state import`: a snapshot of the store at one revision as
//! JSON lines, and its restoration into an empty store (the embedded one in a data directory,
//! or etcd), which also migrates between the two.
//!
//! Format: a header line `{"format": 1, "hangar": "<version>", "revision": R, "time": <ms>}`,
//! then one line per key: `{"key": "...", "value": <the record's JSON>, "leased": bool}`
//! (`"value_b64"` instead of `"value"` for a value that is not JSON). Leased records (the
//! leader, drones, instances, revocations) belong to running processes and are not restored.
//! Import raises every key's fencing epoch above the highest exported, so a restored key
//! never hands out an epoch a backend of the old store may have had.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use anyhow::Context;
use base64::Engine;
use hangar_scheduler::records::KEYS_PREFIX;
use hangar_store::{MAX_TXN_OPS, StoreLocation, TxnOp, TxnOutcome};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ConfigError;
use crate::cli::{StateExportArgs, StateImportArgs};

/// The format this version writes and reads.
const FORMAT: u64 = 1;
/// Operations per import transaction (the store's limit).
const BATCH: usize = MAX_TXN_OPS;
/// Bytes of values per import transaction (etcd refuses requests over 1.5 MiB).
const BATCH_BYTES: usize = 1024 * 1024;
/// Keys per export read (Hangar's records are small: a page is well within one response).
const PAGE: usize = 500;

#[derive(Serialize, Deserialize)]
struct Header {
    format: u64,
    hangar: String,
    revision: u64,
    time: u64,
}

#[derive(Serialize, Deserialize)]
struct Line {
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_b64: Option<String>,
    #[serde(default)]
    leased: bool,
}

fn location(store: &str) -> anyhow::Result<StoreLocation> {
    store
        .parse()
        .map_err(|e| ConfigError(format!("--store {store:?}: {e}")).into())
}

async fn open(
    store: &str,
    data_dir: &std::path::Path,
) -> anyhow::Result<std::sync::Arc<dyn hangar_store::Store>> {
    let location = location(store)?;
    hangar_store::open(&location, data_dir).await.map_err(|e| {
        ConfigError(format!(
            "cannot open the store ({store}, data directory {}): {e} (stop the hangar using it first)",
            data_dir.display()
        ))
        .into()
    })
}

/// `hangar state export`.
pub async fn export(args: StateExportArgs) -> anyhow::Result<ExitCode> {
    let store = open(&args.store, &args.data_dir).await?;
    let mut out: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let (keys, revision) = write_export(store.as_ref(), &mut out, PAGE).await?;
    eprintln!("hangar state export: {keys} keys at revision {revision}");
    Ok(ExitCode::SUCCESS)
}

/// Writes the whole store to `out` as of one revision, read `page` keys at a time (a keyspace
/// of any size, each request within etcd's limits); returns how many keys and the revision.
async fn write_export(
    store: &dyn hangar_store::Store,
    out: &mut dyn Write,
    page: usize,
) -> anyhow::Result<(usize, u64)> {
    let mut next = store
        .list_page("", None, page, None)
        .await
        .context("cannot read the store")?;
    let revision = next.revision;
    let header = Header {
        format: FORMAT,
        hangar: env!("CARGO_PKG_VERSION").to_string(),
        revision,
        time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64,
    };
    writeln!(out, "{}", serde_json::to_string(&header)?)?;
    let mut keys = 0;
    loop {
        for kv in &next.kvs {
            let (value, value_b64) = match serde_json::from_slice::<Value>(&kv.value) {
                Ok(v) => (Some(v), None),
                Err(_) => (
                    None,
                    Some(base64::engine::general_purpose::STANDARD.encode(&kv.value)),
                ),
            };
            let line = Line {
                key: kv.key.clone(),
                value,
                value_b64,
                leased: kv.lease.is_some(),
            };
            writeln!(out, "{}", serde_json::to_string(&line)?)?;
        }
        keys += next.kvs.len();
        let Some(last) = next.kvs.last().filter(|_| next.more) else {
            break;
        };
        let after = last.key.clone();
        next = match store
            .list_page("", Some(&after), page, Some(revision))
            .await
        {
            Ok(p) => p,
            Err(hangar_store::StoreError::Compacted { .. }) => anyhow::bail!(
                "the store moved past revision {revision} during the export (etcd compacted it, or something wrote to the embedded store): export again, with compaction paused or writers stopped"
            ),
            Err(e) => return Err(e).context("cannot read the store"),
        };
    }
    out.flush()?;
    Ok((keys, revision))
}

/// `hangar state import`.
pub async fn import(args: StateImportArgs) -> anyhow::Result<ExitCode> {
    let file = std::fs::File::open(&args.file)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", args.file.display())))?;
    let mut lines = std::io::BufReader::new(file).lines();
    let header: Header = match lines.next() {
        Some(l) => serde_json::from_str(&l?).map_err(|e| {
            ConfigError(format!(
                "{} does not start with a hangar state header: {e}",
                args.file.display()
            ))
        })?,
        None => return Err(ConfigError(format!("{} is empty", args.file.display())).into()),
    };
    if header.format != FORMAT {
        return Err(ConfigError(format!(
            "{} is format {}, this hangar reads format {FORMAT}",
            args.file.display(),
            header.format
        ))
        .into());
    }
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    let mut skipped_leased = 0;
    for (n, l) in lines.enumerate() {
        let l = l?;
        let line: Line = serde_json::from_str(&l)
            .map_err(|e| ConfigError(format!("{} line {}: {e}", args.file.display(), n + 2)))?;
        if line.leased {
            skipped_leased += 1;
            continue;
        }
        let value = match (line.value, line.value_b64) {
            (Some(v), _) => serde_json::to_vec(&v)?,
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|e| ConfigError(format!("{}: {e}", line.key)))?,
            (None, None) => {
                return Err(ConfigError(format!("{}: no value", line.key)).into());
            }
        };
        records.push((line.key, value));
    }
    // Every key's epoch above the highest exported.
    let highest = records
        .iter()
        .filter(|(k, _)| k.starts_with(KEYS_PREFIX))
        .filter_map(|(_, v)| serde_json::from_slice::<Value>(v).ok())
        .filter_map(|v| v["epoch"].as_u64())
        .max()
        .unwrap_or(0);
    for (k, v) in records.iter_mut() {
        if k.starts_with(KEYS_PREFIX)
            && let Ok(mut rec) = serde_json::from_slice::<Value>(v)
            && rec["epoch"].is_u64()
        {
            rec["epoch"] = Value::from(highest + 1);
            *v = serde_json::to_vec(&rec)?;
        }
    }

    let store = open(&args.store, &args.data_dir).await?;
    let existing = store
        .list("")
        .await
        .context("cannot read the target store")?;
    let unleased = existing.kvs.iter().filter(|kv| kv.lease.is_none()).count();
    if unleased > 0 && !args.force {
        return Err(ConfigError(format!(
            "the target store is not empty ({unleased} keys): import into an empty store, or pass --force to write over what is there"
        ))
        .into());
    }
    let mut written = 0;
    let mut batch: Vec<TxnOp> = Vec::new();
    let mut bytes = 0;
    for (key, value) in records {
        if batch.len() == BATCH || bytes + value.len() > BATCH_BYTES {
            written += commit(&*store, std::mem::take(&mut batch)).await?;
            bytes = 0;
        }
        bytes += value.len() + key.len();
        batch.push(TxnOp::put(key, value, None));
    }
    written += commit(&*store, batch).await?;
    eprintln!(
        "hangar state import: {written} keys from revision {} of hangar {} ({skipped_leased} leased records left out; key epochs now start above {highest})",
        header.revision, header.hangar
    );
    Ok(ExitCode::SUCCESS)
}

async fn commit(store: &dyn hangar_store::Store, ops: Vec<TxnOp>) -> anyhow::Result<usize> {
    let n = ops.len();
    if n == 0 {
        return Ok(0);
    }
    match store
        .txn(Vec::new(), ops)
        .await
        .context("cannot write to the store")?
    {
        TxnOutcome::Committed(_) => Ok(n),
        TxnOutcome::Failed { .. } => anyhow::bail!("the store refused the import"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_store::Store;
    use hangar_store::embedded::EmbeddedStore;

    /// An export read in many pages is every key once, in key order, at one revision, with
    /// leased keys marked and values that are not JSON kept as base64.
    #[tokio::test]
    async fn an_export_in_pages_is_the_whole_store_at_one_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_default(dir.path().join("s.redb"))
            .await
            .unwrap();
        for i in 0..1234 {
            let value = serde_json::to_vec(&serde_json::json!({"n": i})).unwrap();
            store.put(&format!("/k/{i:05}"), value, None).await.unwrap();
        }
        store.put("/raw", vec![0xff, 0x00], None).await.unwrap();
        let lease = store
            .lease_grant(std::time::Duration::from_secs(60))
            .await
            .unwrap();
        let last = store
            .put("/leased", b"{}".to_vec(), Some(lease))
            .await
            .unwrap();
        let mut out = Vec::new();
        let (keys, revision) = write_export(store.as_ref(), &mut out, 100).await.unwrap();
        assert_eq!((keys, revision), (1236, last));
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        let header: Header = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!((header.format, header.revision), (FORMAT, last));
        let lines: Vec<Line> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
        let listed: Vec<String> = store
            .list("")
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        let exported: Vec<String> = lines.iter().map(|l| l.key.clone()).collect();
        assert_eq!(exported, listed, "every key once, in order");
        let leased = lines.iter().find(|l| l.key == "/leased").unwrap();
        assert!(leased.leased);
        let raw = lines.iter().find(|l| l.key == "/raw").unwrap();
        assert_eq!(raw.value_b64.as_deref(), Some("/wA="));
        let n = lines.iter().find(|l| l.key == "/k/01233").unwrap();
        assert_eq!(n.value, Some(serde_json::json!({"n": 1233})));
    }
}
