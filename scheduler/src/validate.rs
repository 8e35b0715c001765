//! Checks of what a connect (or a pool's template) asks to run: every error names the field.
//! Pure: no IO.

use hangar_core::api::{ConnectRequest, Resources};

use crate::error::ApiError;

/// Variables the drone sets for every backend; a spawn may not override them.
const RESERVED_ENV: [&str; 5] = [
    "PORT",
    "HANGAR_BIND",
    "HANGAR_BACKEND_ID",
    "HANGAR_KEY",
    "HANGAR_EPOCH",
];

/// Bounds on what a spawn may carry.
const MAX_ENV: usize = 64;
const MAX_ENV_NAME: usize = 128;
const MAX_ENV_VALUE: usize = 4096;
const MAX_ARGS: usize = 64;
const MAX_ARG: usize = 4096;
const MAX_IMAGE: usize = 255;

/// Validates a connect request; errors name the field.
pub fn validate_connect(req: &ConnectRequest) -> Result<(), ApiError> {
    if let Some(key) = &req.key {
        key.validate()
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    if let Some(user) = &req.user
        && (user.len() > 200 || user.contains(['\n', '\r']) || user.chars().any(char::is_control))
    {
        return Err(ApiError::BadRequest(
            "user must be at most 200 characters with no control characters".into(),
        ));
    }
    if let Some(spawn) = &req.spawn {
        if let Some(cmd) = &spawn.command
            && (cmd.is_empty() || cmd[0].is_empty())
        {
            return Err(ApiError::BadRequest(
                "spawn.command must name an executable: a non-empty list of strings".into(),
            ));
        }
        if spawn.command.is_some() && spawn.image.is_some() {
            return Err(ApiError::BadRequest(
                "spawn.command and spawn.image are exclusive: give one".into(),
            ));
        }
        if let Some(image) = &spawn.image
            && image.trim().is_empty()
        {
            return Err(ApiError::BadRequest("spawn.image is empty".into()));
        }
        if spawn.idle_timeout_s == Some(0) {
            return Err(ApiError::BadRequest(
                "spawn.idle_timeout_s must be at least 1 (omit it for the default)".into(),
            ));
        }
        if spawn.lifetime_s == Some(0) {
            return Err(ApiError::BadRequest(
                "spawn.lifetime_s must be at least 1 (omit it for no limit)".into(),
            ));
        }
        if spawn.env.len() > MAX_ENV {
            return Err(ApiError::BadRequest(format!(
                "spawn.env has {} variables: at most {MAX_ENV} are allowed",
                spawn.env.len()
            )));
        }
        for (k, v) in &spawn.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || k.len() > MAX_ENV_NAME {
                return Err(ApiError::BadRequest(format!(
                    "spawn.env has an invalid variable name {k:?} (1 to {MAX_ENV_NAME} bytes, no '=' or NUL)"
                )));
            }
            if RESERVED_ENV.contains(&k.as_str())
                || k.eq_ignore_ascii_case("PORT")
                || k.to_ascii_uppercase().starts_with("HANGAR_")
            {
                return Err(ApiError::BadRequest(format!(
                    "spawn.env may not set {k}: PORT and HANGAR_* are Hangar's ({} are set for every backend)",
                    RESERVED_ENV.join(", ")
                )));
            }
            if v.len() > MAX_ENV_VALUE || v.contains('\0') {
                return Err(ApiError::BadRequest(format!(
                    "spawn.env.{k} must be at most {MAX_ENV_VALUE} bytes with no NUL"
                )));
            }
        }
        if let Some(cmd) = &spawn.command
            && (cmd.len() > MAX_ARGS || cmd.iter().any(|a| a.len() > MAX_ARG || a.contains('\0')))
        {
            return Err(ApiError::BadRequest(format!(
                "spawn.command must have at most {MAX_ARGS} arguments of at most {MAX_ARG} bytes each, with no NUL"
            )));
        }
        if let Some(image) = &spawn.image
            && (image.len() > MAX_IMAGE
                || image.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(ApiError::BadRequest(format!(
                "spawn.image must be an image reference of at most {MAX_IMAGE} characters, without spaces"
            )));
        }
        if let Some(Resources {
            cpu_millis,
            memory_mb,
        }) = spawn.resources
        {
            if cpu_millis == Some(0) {
                return Err(ApiError::BadRequest(
                    "spawn.resources.cpu_millis must be at least 1".into(),
                ));
            }
            if memory_mb == Some(0) {
                return Err(ApiError::BadRequest(
                    "spawn.resources.memory_mb must be at least 1".into(),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_core::KeyRef;
    use hangar_core::api::SpawnSpec;

    fn req(spawn: SpawnSpec) -> ConnectRequest {
        ConnectRequest {
            spawn: Some(spawn),
            ..Default::default()
        }
    }

    #[test]
    fn validation_names_fields() {
        let cases = [
            (
                req(SpawnSpec {
                    command: Some(vec![]),
                    ..Default::default()
                }),
                "spawn.command",
            ),
            (
                req(SpawnSpec {
                    idle_timeout_s: Some(0),
                    ..Default::default()
                }),
                "spawn.idle_timeout_s",
            ),
            (
                req(SpawnSpec {
                    lifetime_s: Some(0),
                    ..Default::default()
                }),
                "spawn.lifetime_s",
            ),
            (
                req(SpawnSpec {
                    env: [("PORT".to_string(), "1".to_string())].into(),
                    ..Default::default()
                }),
                "PORT",
            ),
            (
                req(SpawnSpec {
                    env: [("hangar_token".to_string(), "x".to_string())].into(),
                    ..Default::default()
                }),
                "hangar_token",
            ),
            (
                req(SpawnSpec {
                    env: [("port".to_string(), "1".to_string())].into(),
                    ..Default::default()
                }),
                "port",
            ),
            (
                req(SpawnSpec {
                    env: (0..65).map(|i| (format!("V{i}"), String::new())).collect(),
                    ..Default::default()
                }),
                "spawn.env",
            ),
            (
                req(SpawnSpec {
                    env: [("BIG".to_string(), "x".repeat(4097))].into(),
                    ..Default::default()
                }),
                "spawn.env.BIG",
            ),
            (
                req(SpawnSpec {
                    command: Some(vec!["x".to_string(); 65]),
                    ..Default::default()
                }),
                "spawn.command",
            ),
            (
                req(SpawnSpec {
                    image: Some("a b".into()),
                    ..Default::default()
                }),
                "spawn.image",
            ),
            (
                ConnectRequest {
                    key: Some(KeyRef::new("default", "")),
                    ..Default::default()
                },
                "key.name",
            ),
        ];
        for (r, field) in cases {
            let e = validate_connect(&r).unwrap_err();
            assert!(matches!(e, ApiError::BadRequest(_)));
            assert!(e.to_string().contains(field), "{e} should name {field}");
        }
        assert!(validate_connect(&ConnectRequest::default()).is_ok());
    }
}
