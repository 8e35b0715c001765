//! The key that signs and verifies backend tokens, for `dev` and `serve`: given on the
//! command line, or generated once into the data directory and read from there afterwards.

use std::path::Path;

use anyhow::Context;
use hangar_core::token::TokenKey;

use crate::ConfigError;

/// The key from `--token-key` / `HANGAR_TOKEN_KEY`, or else the data directory's `token.key`
/// (generated on first use).
pub fn resolve(flag: Option<&str>, data_dir: &Path) -> anyhow::Result<TokenKey> {
    match flag {
        Some(hex) => TokenKey::from_hex(hex)
            .map_err(|e| ConfigError(format!("--token-key / HANGAR_TOKEN_KEY: {e}")).into()),
        None => load_or_create(&data_dir.join("token.key")),
    }
}

/// Reads the token key from `path`, generating it on first use (mode 0600).
fn load_or_create(path: &Path) -> anyhow::Result<TokenKey> {
    match std::fs::read_to_string(path) {
        Ok(s) => TokenKey::from_hex(&s).map_err(|e| {
            ConfigError(format!(
                "token key file {} is corrupt ({e}); delete it to generate a new one (issued tokens stop working)",
                path.display()
            ))
            .into()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = TokenKey::generate();
            write_private(path, key.to_hex().as_bytes())
                .with_context(|| format!("cannot write token key file {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(ConfigError(format!("cannot read token key file {}: {e}", path.display())).into()),
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}
