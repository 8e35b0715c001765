//! The scheduler's part of the `token` fuzz target (`fuzz/fuzz_targets/token.rs`), shared with
//! the regression test that replays `fuzz/corpus/token/` and `fuzz/artifacts/token/` in the
//! normal suite. Not an API.

use crate::api_tokens;

/// API token parsing (`hgr_<id>_<secret>`) never panics, and what it accepts is exactly a
/// non-empty id without `_` and a non-empty secret that spell the input back.
pub fn fuzz_api_token(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // The token target's inputs are `<token>\0<backend>...`: the first part is the token.
    let token = text.split('\0').next().unwrap_or_default();
    for candidate in [token, text.as_ref()] {
        if let Some((id, secret)) = api_tokens::parse(candidate) {
            assert!(!id.is_empty() && !secret.is_empty());
            assert!(!id.contains('_'), "the id ends at the first '_': {id:?}");
            assert_eq!(format!("hgr_{id}_{secret}"), candidate);
        } else {
            assert!(
                !candidate.starts_with("hgr_")
                    || candidate["hgr_".len()..]
                        .split_once('_')
                        .is_none_or(|(id, secret)| id.is_empty() || secret.is_empty()),
                "a well-formed token is refused: {candidate:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn token_corpus_replays() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut n = 0;
        for dir in ["corpus", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join("token")) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                if std::panic::catch_unwind(|| super::fuzz_api_token(&data)).is_err() {
                    panic!("fuzz input {} fails", path.display());
                }
                n += 1;
            }
        }
        assert!(n > 0, "fuzz/corpus/token holds the target's corpus");
    }
}
