//! `kiln serve --config FILE`: a TOML file holding any of `serve`'s flags (and the global `data_dir` and
//! `socket`), keyed by the flag's long name (`max_sandboxes` or `max-sandboxes`). What the command line
//! or the environment sets wins over the file; the file wins over the defaults. An unknown key is an error
//! naming it, so a typo does not silently leave a default in force.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

/// Read when `--config` is not given and the file exists.
pub const DEFAULT_PATH: &str = "/etc/kiln/config.toml";

/// Global flags that also belong to the daemon.
const GLOBAL_KEYS: &[&str] = &["data-dir", "socket"];
/// Flags that make no sense in the file.
const EXCLUDED: &[&str] = &["config", "help", "version"];

/// The config file `serve` should read: `--config`/`KILN_CONFIG`, else the default one if it exists.
pub fn path_for(matches: &ArgMatches) -> Option<PathBuf> {
    let serve = matches.subcommand_matches("serve")?;
    if let Some(p) = serve.get_one::<PathBuf>("config") {
        return Some(p.clone());
    }
    let default = Path::new(DEFAULT_PATH);
    default.exists().then(|| default.to_path_buf())
}

/// `argv` with `--flag=value` appended for each key of the file the command line and environment left
/// unset.
pub fn apply(
    cmd: &Command,
    matches: &ArgMatches,
    argv: Vec<OsString>,
    path: &Path,
) -> anyhow::Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let extra = extra_args(cmd, matches, &text)
        .with_context(|| format!("in the config file {}", path.display()))?;
    let mut argv = argv;
    argv.extend(extra.into_iter().map(OsString::from));
    Ok(argv)
}

fn extra_args(cmd: &Command, matches: &ArgMatches, text: &str) -> anyhow::Result<Vec<String>> {
    let table: toml::Table = text.parse().context("not valid TOML")?;
    let serve_cmd = cmd.find_subcommand("serve").context("no serve command")?;
    let serve = matches
        .subcommand_matches("serve")
        .context("not a serve command line")?;
    let mut known: Vec<(String, String)> = Vec::new(); // (long name, arg id)
    for arg in serve_cmd.get_arguments().chain(cmd.get_arguments()) {
        let Some(long) = arg.get_long() else { continue };
        let global = cmd.get_arguments().any(|a| a.get_id() == arg.get_id());
        if EXCLUDED.contains(&long) || (global && !GLOBAL_KEYS.contains(&long)) {
            continue;
        }
        known.push((long.to_string(), arg.get_id().to_string()));
    }
    let mut out = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some((_, id)) = known.iter().find(|(l, _)| *l == long) else {
            let mut names: Vec<String> = known.iter().map(|(l, _)| l.replace('-', "_")).collect();
            names.sort();
            bail!(
                "unknown key `{key}`: `kiln serve` has no --{long} (known keys: {})",
                names.join(", ")
            );
        };
        let source = serve.value_source(id).or_else(|| matches.value_source(id));
        if matches!(
            source,
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let items: Vec<&toml::Value> = match value {
            toml::Value::Array(a) => a.iter().collect(),
            v => vec![v],
        };
        for item in items {
            match item {
                toml::Value::Boolean(true) => out.push(format!("--{long}")),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => out.push(format!("--{long}={s}")),
                toml::Value::Integer(i) => out.push(format!("--{long}={i}")),
                toml::Value::Float(f) => out.push(format!("--{long}={f}")),
                other => bail!(
                    "key `{key}`: expected a string, number, boolean or a list of them, not {}",
                    other.type_str()
                ),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::Cli;

    fn parse(args: &[&str], file: &str) -> anyhow::Result<Vec<String>> {
        let cmd = Cli::command();
        let m = cmd.clone().try_get_matches_from(args)?;
        extra_args(&cmd, &m, file)
    }

    #[test]
    fn file_fills_what_the_command_line_left_unset() {
        let file = r#"
            data_dir = "/var/lib/kiln"
            socket = "/run/kiln/kiln.sock"
            listen = "127.0.0.1:7070"
            max-sandboxes = 8
            memory_overcommit = 1.5
            unconfined = true
            log_json = false
            allow_net = ["10.20.0.0/16", "192.168.5.0/24"]
        "#;
        let extra = parse(&["kiln", "serve", "--max-sandboxes", "3"], file).unwrap();
        let mut want = vec![
            "--allow-net=10.20.0.0/16",
            "--allow-net=192.168.5.0/24",
            "--data-dir=/var/lib/kiln",
            "--listen=127.0.0.1:7070",
            "--memory-overcommit=1.5",
            "--socket=/run/kiln/kiln.sock",
            "--unconfined",
        ];
        // The environment wins over the file too (`make` exports KILN_DATA_DIR).
        for (var, flag) in [
            ("KILN_DATA_DIR", "--data-dir="),
            ("KILN_SOCKET", "--socket="),
        ] {
            if std::env::var_os(var).is_some() {
                want.retain(|a| !a.starts_with(flag));
            }
        }
        assert_eq!(extra, want);
        // The result parses, and the command line's value stands.
        let mut argv = vec!["kiln", "serve", "--max-sandboxes", "3"];
        argv.extend(extra.iter().map(String::as_str));
        let m = Cli::command().try_get_matches_from(argv).unwrap();
        let serve = m.subcommand_matches("serve").unwrap();
        assert_eq!(serve.get_one::<usize>("max_sandboxes"), Some(&3));
        assert!(serve.get_flag("unconfined"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_naming_them() {
        let e = parse(&["kiln", "serve"], "max_sandboxez = 3").unwrap_err();
        assert!(
            format!("{e:#}").contains("unknown key `max_sandboxez`"),
            "{e:#}"
        );
        for k in ["url", "token", "json", "config"] {
            let e = parse(&["kiln", "serve"], &format!("{k} = \"x\"")).unwrap_err();
            assert!(
                format!("{e:#}").contains(&format!("unknown key `{k}`")),
                "{e:#}"
            );
        }
        let e = parse(&["kiln", "serve"], "[limits]\nx = 1").unwrap_err();
        assert!(format!("{e:#}").contains("key `limits`"), "{e:#}");
        let e = parse(&["kiln", "serve"], "max_sandboxes = ").unwrap_err();
        assert!(format!("{e:#}").contains("not valid TOML"), "{e:#}");
    }
}
