//! What a drone agrees to run: its own default backend, plus the commands (process runtime)
//! and images (Docker) its operator allowed (`hangar drone --allow-command PATH`,
//! `--allow-image PATTERN`). The control plane's admins decide what a spawn asks for; the
//! drone's operator decides what this host runs, so that a stolen admin token (or a
//! compromised control plane) cannot run arbitrary code on every drone.

use hangar_core::drone::SpawnCommand;

/// The allow-lists. A spawn without a command or image runs the runtime's default and is
/// always allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpawnPolicy {
    /// Executables (`spawn.command[0]`, compared as given) a spawn may name.
    pub commands: Vec<String>,
    /// Image patterns a spawn's image must match; `*` matches any run of characters
    /// (`registry.example/team/*`, `hangar-demo:*`).
    pub images: Vec<String>,
}

impl SpawnPolicy {
    /// Whether this drone runs `cmd`; the error says what was refused and how to allow it.
    pub fn check(&self, cmd: &SpawnCommand) -> Result<(), String> {
        if let Some(argv) = &cmd.command {
            let exe = argv.first().map(String::as_str).unwrap_or_default();
            if !self.commands.iter().any(|c| c == exe) {
                return Err(format!(
                    "this drone does not run {exe:?}: its operator allows {} (start it with --allow-command {exe} to allow it)",
                    listed(&self.commands, "no command but its default backend")
                ));
            }
        }
        if let Some(image) = &cmd.image
            && !self.images.iter().any(|p| glob(p, image))
        {
            return Err(format!(
                "this drone does not run image {image:?}: its operator allows {} (start it with --allow-image PATTERN to allow it)",
                listed(&self.images, "no image but its default")
            ));
        }
        Ok(())
    }
}

fn listed(items: &[String], none: &str) -> String {
    if items.is_empty() {
        none.to_string()
    } else {
        items.join(", ")
    }
}

/// `*`-only glob match over the whole string.
fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return pattern == s;
    };
    if parts.len() == 1 {
        return pattern == s;
    }
    let Some(mut rest) = s.strip_prefix(first) else {
        return false;
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn(command: Option<&[&str]>, image: Option<&str>) -> SpawnCommand {
        SpawnCommand {
            backend: hangar_core::BackendId::generate(),
            key: None,
            epoch: 1,
            command: command.map(|c| c.iter().map(|s| s.to_string()).collect()),
            image: image.map(Into::into),
            env: Default::default(),
            resources: Default::default(),
            startup_timeout_ms: 1000,
        }
    }

    #[test]
    fn only_the_default_and_what_the_operator_allowed_runs() {
        let none = SpawnPolicy::default();
        assert!(none.check(&spawn(None, None)).is_ok(), "the default runs");
        let err = none
            .check(&spawn(Some(&["/bin/sh", "-c", "id"]), None))
            .unwrap_err();
        assert!(
            err.contains("/bin/sh") && err.contains("--allow-command"),
            "{err}"
        );
        let err = none.check(&spawn(None, Some("evil:latest"))).unwrap_err();
        assert!(err.contains("--allow-image"), "{err}");

        let policy = SpawnPolicy {
            commands: vec!["/usr/bin/python3".into()],
            images: vec!["registry.example/team/*".into(), "hangar-demo:dev".into()],
        };
        assert!(
            policy
                .check(&spawn(Some(&["/usr/bin/python3", "app.py"]), None))
                .is_ok()
        );
        assert!(
            policy.check(&spawn(Some(&["python3"]), None)).is_err(),
            "as given"
        );
        assert!(
            policy
                .check(&spawn(None, Some("registry.example/team/app:1")))
                .is_ok()
        );
        assert!(policy.check(&spawn(None, Some("hangar-demo:dev"))).is_ok());
        assert!(
            policy
                .check(&spawn(None, Some("hangar-demo:dev2")))
                .is_err()
        );
        assert!(
            policy
                .check(&spawn(None, Some("registry.example/other/app")))
                .is_err()
        );
    }

    #[test]
    fn globs() {
        for (p, s, m) in [
            ("a*", "abc", true),
            ("*c", "abc", true),
            ("a*c", "ac", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "acb", false),
            ("*", "", true),
            ("ab", "ab", true),
            ("ab", "abc", false),
            ("a*a", "a", false),
        ] {
            assert_eq!(glob(p, s), m, "{p} ~ {s}");
        }
    }
}
