//! `--config FILE` for `dev`, `serve`, `drone` and `proxy`: a TOML file whose keys are the
//! role's flags (`api-tls-cert = "cert.pem"`, or `api_tls_cert`; `true` for a switch, a list
//! for a repeatable flag). The file's values become flags placed before the command line's,
//! so the same validation applies to both, a flag given on the command line wins, and an
//! environment variable that sets the flag wins over the file too. An unknown key is an error
//! naming the key and the file.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::ConfigError;

/// The roles that read a config file.
const ROLES: [&str; 4] = ["dev", "serve", "drone", "proxy"];

/// `args` (the process's, program name first) with the config file's flags inserted after the
/// role, when the role is given `--config`; unchanged otherwise.
pub fn expand(args: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    let Some(role_at) = args
        .iter()
        .skip(1)
        .position(|a| !a.to_string_lossy().starts_with('-'))
        .map(|i| i + 1)
    else {
        return Ok(args);
    };
    let role = args[role_at].to_string_lossy().into_owned();
    if !ROLES.contains(&role.as_str()) {
        return Ok(args);
    }
    let given: Vec<String> = args[role_at + 1..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let Some(path) = config_path(&given) else {
        return Ok(args);
    };
    let flags = flags_from_file(&role, &path, &given)?;
    let mut out = args[..=role_at].to_vec();
    out.extend(flags.into_iter().map(OsString::from));
    out.extend(args[role_at + 1..].iter().cloned());
    Ok(out)
}

/// The value of `--config FILE` / `--config=FILE`.
fn config_path(given: &[String]) -> Option<PathBuf> {
    let mut it = given.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// The flags the file at `path` sets for `role`, except those the command line (`given`) or
/// the environment sets.
fn flags_from_file(role: &str, path: &Path, given: &[String]) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read --config {}: {e}", path.display())))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| ConfigError(format!("--config {}: {e}", path.display())))?;
    let root = crate::cli::Cli::command();
    let cmd = root
        .find_subcommand(role)
        .ok_or_else(|| ConfigError(format!("no role {role}")))?;
    let on_command_line: BTreeSet<&str> = given
        .iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split_once('=').map_or(a, |(name, _)| name))
        .collect();
    let mut flags = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
            .ok_or_else(|| {
                ConfigError(format!(
                    "unknown key {key:?} in {}: keys are the flags of `hangar {role}` (see `hangar {role} --help`)",
                    path.display()
                ))
            })?;
        let from_env = arg
            .get_env()
            .is_some_and(|name| std::env::var_os(name).is_some());
        if on_command_line.contains(long.as_str()) || from_env {
            continue;
        }
        let switch = matches!(
            arg.get_action(),
            clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
        );
        let bad = |what: &str| ConfigError(format!("key {key:?} in {}: {what}", path.display()));
        // Each value is checked by the flag's own parser here, so that a bad one is a
        // configuration error naming the key and the file (clap would name only the flag).
        let check = |v: String| -> Result<String, ConfigError> {
            let probe = clap::Command::new("hangar")
                .no_binary_name(true)
                .arg(arg.clone().required(false));
            match probe.try_get_matches_from([format!("--{long}"), v.clone()]) {
                Err(e)
                    if matches!(
                        e.kind(),
                        clap::error::ErrorKind::InvalidValue
                            | clap::error::ErrorKind::ValueValidation
                    ) =>
                {
                    let why = e.to_string();
                    let why = why
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim_start_matches("error: ");
                    Err(bad(why))
                }
                _ => Ok(v),
            }
        };
        match value {
            toml::Value::Boolean(b) if switch => {
                if *b {
                    flags.push(format!("--{long}"));
                }
            }
            _ if switch => return Err(bad("is a switch: give true or false")),
            toml::Value::Array(items) => {
                for item in items {
                    flags.push(format!("--{long}"));
                    flags.push(check(
                        scalar(item).ok_or_else(|| bad("list items must be strings or numbers"))?,
                    )?);
                }
            }
            other => {
                flags.push(format!("--{long}"));
                flags.push(check(
                    scalar(other).ok_or_else(|| bad("must be a string, a number or a list"))?,
                )?);
            }
        }
    }
    Ok(flags)
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn file(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hangar.toml");
        std::fs::write(&path, text).unwrap();
        let p = path.to_string_lossy().into_owned();
        (dir, p)
    }

    #[test]
    fn the_file_sets_flags_and_the_command_line_wins() {
        let (_d, path) = file(
            r#"
api = "127.0.0.1:7999"
idle_timeout = 120
drone-secret = "from-the-file"
lease-ttl = 7
relieve-hot = true
"#,
        );
        let out = expand(args(&[
            "hangar",
            "serve",
            "--config",
            &path,
            "--lease-ttl",
            "3",
        ]))
        .unwrap();
        let s: Vec<String> = out
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(&s[..2], ["hangar", "serve"]);
        for pair in [["--api", "127.0.0.1:7999"], ["--idle-timeout", "120"]] {
            assert!(s.windows(2).any(|w| w == pair), "{s:?}");
        }
        assert!(s.contains(&"--relieve-hot".to_string()), "{s:?}");
        // The command line's --lease-ttl wins: the file's is not added.
        assert_eq!(s.iter().filter(|a| *a == "--lease-ttl").count(), 1, "{s:?}");
        // What clap makes of it.
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(&out).unwrap();
        let crate::cli::Command::Serve(serve) = cli.command else {
            panic!("serve")
        };
        assert_eq!(serve.lease_ttl, 3);
        assert_eq!(serve.plane.api.to_string(), "127.0.0.1:7999");
        assert_eq!(serve.plane.idle_timeout, 120);
    }

    #[test]
    fn bad_files_name_the_key_and_the_file() {
        let (_d, path) = file("api = \"127.0.0.1:1\"\nno-such-flag = 1\n");
        let err = expand(args(&["hangar", "dev", "--config", &path])).unwrap_err();
        assert!(
            err.0.contains("no-such-flag") && err.0.contains(&path),
            "{}",
            err.0
        );
        let (_d, path) = file("relieve-hot = \"yes\"\n");
        let err = expand(args(&["hangar", "dev", "--config", &path])).unwrap_err();
        assert!(err.0.contains("switch"), "{}", err.0);
        let (_d, path) = file("api = [\n");
        let err = expand(args(&["hangar", "dev", "--config", &path])).unwrap_err();
        assert!(err.0.contains(&path), "{}", err.0);
        let err = expand(args(&["hangar", "dev", "--config", "/nonexistent/h.toml"])).unwrap_err();
        assert!(err.0.contains("cannot read"), "{}", err.0);
        // Other commands, and roles without --config, are left alone.
        let plain = args(&["hangar", "ls", "--config", "x"]);
        assert_eq!(expand(plain.clone()).unwrap(), plain);
    }

    #[test]
    fn lists_repeat_a_flag() {
        let (_d, path) = file("allow-command = [\"/usr/bin/python3\", \"/srv/app\"]\n");
        let out = expand(args(&[
            "hangar",
            "drone",
            "--config",
            &path,
            "--scheduler",
            "http://a:1",
            "--name",
            "d1",
        ]))
        .unwrap();
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(&out).unwrap();
        let crate::cli::Command::Drone(d) = cli.command else {
            panic!("drone")
        };
        assert_eq!(d.allow_commands, ["/usr/bin/python3", "/srv/app"]);
    }

    /// Parses a command line into what clap makes of it, as text to compare.
    fn parsed(argv: &[String]) -> String {
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        format!("{:?}", cli.command)
    }

    /// For every role, a file and the same settings as flags give the same configuration.
    #[test]
    fn every_role_gets_the_same_configuration_from_the_file_as_from_flags() {
        let cases: [(&str, &[&str], &str); 4] = [
            (
                "dev",
                &[
                    "--api",
                    "127.0.0.1:7001",
                    "--idle-timeout",
                    "90",
                    "--relieve-hot",
                    "--log-retention",
                    "2h",
                ],
                "api = \"127.0.0.1:7001\"\nidle-timeout = 90\nrelieve-hot = true\nlog_retention = \"2h\"\n",
            ),
            (
                "serve",
                &[
                    "--drone-secret",
                    "s3",
                    "--lease-ttl",
                    "4",
                    "--dns",
                    "off",
                    "--metrics",
                    "127.0.0.1:9100",
                    "--metrics-top-k",
                    "500",
                ],
                "drone-secret = \"s3\"\nlease-ttl = 4\ndns = \"off\"\nmetrics = \"127.0.0.1:9100\"\nmetrics-top-k = 500\n",
            ),
            (
                "drone",
                &[
                    "--scheduler",
                    "http://a:1",
                    "--name",
                    "d1",
                    "--runtime",
                    "process",
                    "--allow-command",
                    "/bin/a",
                    "--allow-command",
                    "/bin/b",
                ],
                "scheduler = \"http://a:1\"\nname = \"d1\"\nruntime = \"process\"\nallow-command = [\"/bin/a\", \"/bin/b\"]\n",
            ),
            (
                "proxy",
                &[
                    "--scheduler",
                    "http://a:1",
                    "--token-key",
                    &"ab".repeat(32),
                    "--proxy",
                    "127.0.0.1:8081",
                    "--header-read-timeout",
                    "5s",
                    "--metrics-top-k",
                    "50",
                ],
                &format!(
                    "scheduler = \"http://a:1\"\ntoken-key = \"{}\"\nproxy = \"127.0.0.1:8081\"\nheader-read-timeout = \"5s\"\nmetrics-top-k = 50\n",
                    "ab".repeat(32)
                ),
            ),
        ];
        for (role, flags, toml) in cases {
            let by_flags: Vec<String> = ["hangar", role]
                .iter()
                .copied()
                .chain(flags.iter().copied())
                .map(str::to_string)
                .collect();
            let (_d, path) = file(toml);
            let by_file: Vec<String> = expand(args(&["hangar", role, "--config", &path]))
                .unwrap_or_else(|e| panic!("{role}: {}", e.0))
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            // The file's run also carries `--config FILE` itself.
            let file_parsed = parsed(&by_file).replace(&format!("Some({path:?})"), "None");
            assert_eq!(file_parsed, parsed(&by_flags), "{role}");
        }
    }

    /// A bad value in the file is a configuration error (exit 64) naming the key and the
    /// file, for every role.
    #[test]
    fn a_bad_value_names_the_key_and_the_file_for_every_role() {
        for (role, toml, key) in [
            ("dev", "idle-timeout = \"soon\"\n", "idle-timeout"),
            ("serve", "lease-ttl = \"soon\"\n", "lease-ttl"),
            ("drone", "runtime = \"vm\"\n", "runtime"),
            ("proxy", "proxy = \"not an address\"\n", "proxy"),
        ] {
            let (_d, path) = file(toml);
            let err = expand(args(&["hangar", role, "--config", &path])).unwrap_err();
            assert!(
                err.0.contains(key) && err.0.contains(&path),
                "{role}: {}",
                err.0
            );
        }
    }
}
