//! Reading the options: the command line and the `FERRULE_*` variables (clap), then the `--config` TOML file
//! for what neither set. Precedence: command line, then environment, then file, then defaults.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgAction, CommandFactory, FromArgMatches, parser::ValueSource};

use super::error::ConfigError;
use super::options::Options;

/// Parses the command line and the environment, then fills in what neither set from the `--config` file.
/// Precedence: command line, then environment, then file, then defaults.
pub(crate) fn load_options(args: Vec<OsString>) -> Result<Options, ConfigError> {
    let matches = Options::command().get_matches_from(&args);
    let Some(file) = matches.get_one::<PathBuf>("config").cloned() else {
        // Cannot fail: these matches were just produced from the same definition.
        return Options::from_arg_matches(&matches)
            .map_err(|e| ConfigError::File {
                file: PathBuf::new(),
                error: e.to_string(),
            })
            .map(Options::with_ambient_virtualenv);
    };
    let text = std::fs::read_to_string(&file).map_err(|e| ConfigError::File {
        file: file.clone(),
        error: e.to_string(),
    })?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::File {
        file: file.clone(),
        error: e.to_string(),
    })?;
    let cmd = Options::command();
    let mut injected: Vec<OsString> = Vec::new();
    let mut app_from_file = None;
    for (key, value) in &table {
        let key = FileKey {
            file: &file,
            text: &text,
            key,
            value,
        };
        match key.as_args(&cmd, &matches)? {
            KeyArgs::Options(these) => injected.extend(these),
            KeyArgs::App(app) => app_from_file = app,
            KeyArgs::Overridden => {}
        }
    }
    let mut merged: Vec<OsString> = args.iter().take(1).cloned().collect();
    merged.extend(injected);
    merged.extend(args.iter().skip(1).cloned());
    if matches.get_one::<String>("app").is_none() {
        merged.extend(app_from_file.map(OsString::from));
    }
    let matches = Options::command()
        .try_get_matches_from(merged)
        .map_err(|e| ConfigError::File {
            file: file.clone(),
            error: first_line(&e.to_string()),
        })?;
    Options::from_arg_matches(&matches)
        .map_err(|e| ConfigError::File {
            file,
            error: e.to_string(),
        })
        .map(Options::with_ambient_virtualenv)
}

/// One `key = value` of the `--config` file.
struct FileKey<'f> {
    file: &'f Path,
    /// The whole file, for the literal of an integer.
    text: &'f str,
    key: &'f String,
    value: &'f toml::Value,
}

/// What a key of the file adds to the command line.
enum KeyArgs {
    /// Its options, as `--long=value` (or `--long` for a switch).
    Options(Vec<OsString>),
    /// The app, which is a positional argument.
    App(Option<String>),
    /// Nothing: the command line or the environment set the option, and they win over the file.
    Overridden,
}

impl FileKey<'_> {
    fn bad(&self, error: String) -> ConfigError {
        ConfigError::BadValue {
            file: self.file.to_path_buf(),
            key: self.key.clone(),
            error,
        }
    }

    /// The option this key names, checked alone so that an error names the key in the file rather than a
    /// command-line flag.
    fn as_args(&self, cmd: &clap::Command, matches: &clap::ArgMatches) -> Result<KeyArgs, ConfigError> {
        let id = self.key.replace('-', "_");
        let long = self.key.replace('_', "-");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == id.as_str() || a.get_long() == Some(long.as_str()))
            .filter(|a| !matches!(a.get_id().as_str(), "config" | "check_config"))
            .ok_or_else(|| ConfigError::UnknownKey {
                file: self.file.to_path_buf(),
                key: self.key.clone(),
            })?;
        let arg_id = arg.get_id().as_str();
        if matches!(
            matches.value_source(arg_id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            return Ok(KeyArgs::Overridden);
        }
        let values = self.values(arg_id)?;
        let Some(long) = arg.get_long() else {
            return Ok(KeyArgs::App(values.into_iter().next()));
        };
        let mut these: Vec<OsString> = Vec::new();
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match self.value {
                toml::Value::Boolean(true) => these.push(format!("--{long}").into()),
                toml::Value::Boolean(false) => {}
                _ => return Err(self.bad("expected true or false".into())),
            }
        } else {
            these.extend(values.into_iter().map(|v| format!("--{long}={v}").into()));
        }
        let mut probe: Vec<OsString> = vec!["ferrule".into()];
        probe.extend(these.iter().cloned());
        probe.push("app".into());
        Options::command()
            .try_get_matches_from(probe)
            .map_err(|e| self.bad(e.kind().to_string() + ": " + &first_line(&e.to_string())))?;
        Ok(KeyArgs::Options(these))
    }

    /// The value as the strings a command line would give.
    fn values(&self, arg_id: &str) -> Result<Vec<String>, ConfigError> {
        match self.value {
            toml::Value::Array(items) => items
                .iter()
                .map(scalar)
                .collect::<Result<_, _>>()
                .map_err(|e| self.bad(e)),
            // TOML reads both 660 and 0o660 as integers; only the literal tells which one was meant.
            toml::Value::Integer(mode) if arg_id == "socket_mode" => match integer_literal(self.text, self.key) {
                Some(literal) if literal.starts_with("0o") => Ok(vec![format!("{mode:o}")]),
                _ => Err(self.bad(format!(
                    "{mode} is ambiguous for a file mode: write it as an octal number, socket_mode = 0o660, \
                     or as a string, socket_mode = \"660\""
                ))),
            },
            other => Ok(vec![scalar(other).map_err(|e| self.bad(e))?]),
        }
    }
}

/// The text after `key =` on the line that sets `key` at the top of a TOML file.
fn integer_literal<'t>(text: &'t str, key: &str) -> Option<&'t str> {
    text.lines().find_map(|line| {
        let rest = line.trim_start().strip_prefix(key)?.trim_start().strip_prefix('=')?;
        rest.split('#').next().map(str::trim)
    })
}

fn scalar(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        _ => Err("expected a string, number, boolean or a list of them".into()),
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned()
}
