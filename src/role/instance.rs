//! This control-plane instance's id in leader election: generated once into the data
//! directory, so that an instance restarted on the same directory takes its own leader key
//! back at once instead of waiting for its old lease to run out.

use std::path::Path;

/// The id in `<data_dir>/instance.id`, created on first use.
pub fn id(data_dir: &Path) -> String {
    let path = data_dir.join("instance.id");
    if let Ok(s) = std::fs::read_to_string(&path)
        && !s.trim().is_empty()
    {
        return s.trim().to_string();
    }
    let id = format!("i-{}", hangar_core::BackendId::generate());
    if let Err(e) = std::fs::write(&path, &id) {
        tracing::warn!(path = %path.display(), error = %e, "cannot keep the instance id; a restart will wait for its old leader lease");
    }
    id
}
