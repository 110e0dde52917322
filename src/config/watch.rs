//! The files whose change reloads the workers: under `--reload` the `--config` file and `--reload-extra-file`
//! paths (the app's own files come from the workers, see the master's `watch`), and the `--touch-reload`
//! files; and whether to poll them instead of using inotify. Paths are made absolute here, against the
//! directory ferrule was started in, since the workers may `--chdir` elsewhere.

use std::path::{Path, PathBuf};

use super::error::ConfigError;
use super::options::Options;

/// What the master watches, and how.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Watch {
    /// `--reload`: a change to the app's files, the config file or an extra file reloads; a worker whose app
    /// does not import answers 503 instead of exiting.
    pub(crate) on_change: bool,
    /// The `--config` file (under `--reload` only) and the `--reload-extra-file` paths.
    pub(crate) files: Vec<PathBuf>,
    /// `--touch-reload`.
    pub(crate) touch: Vec<PathBuf>,
    /// `--reload-poll`: a look every second instead of inotify.
    pub(crate) poll: bool,
}

impl Watch {
    pub(super) fn from_options(o: &Options) -> Result<Watch, ConfigError> {
        if !o.reload && !o.reload_extra_file.is_empty() {
            return Err(ConfigError::WatchWithoutReload("--reload-extra-file"));
        }
        if o.reload_poll && !o.reload && o.touch_reload.is_empty() {
            return Err(ConfigError::PollWithoutWatch);
        }
        let mut files: Vec<PathBuf> = Vec::new();
        if o.reload {
            if let Some(config) = &o.config {
                if config.to_str().is_none() {
                    return Err(ConfigError::NotUtf8Path {
                        option: "--config",
                        path: config.clone(),
                    });
                }
                files.push(absolute(config));
            }
            files.extend(o.reload_extra_file.iter().map(|f| absolute(f)));
        }
        let touch = o.touch_reload.iter().map(|f| absolute(f)).collect();
        Ok(Watch {
            on_change: o.reload,
            files,
            touch,
            poll: o.reload_poll,
        })
    }

    /// Whether the master has anything to watch.
    pub(crate) fn is_on(&self) -> bool {
        self.on_change || !self.touch.is_empty()
    }

    /// The option names whose value differs in `new`: the watcher is set up once, at start-up.
    pub(super) fn changed_in(&self, new: &Watch) -> Vec<&'static str> {
        let Watch {
            on_change,
            files,
            touch,
            poll,
        } = self;
        [
            ("reload", *on_change != new.on_change),
            ("reload_extra_file", *files != new.files),
            ("touch_reload", *touch != new.touch),
            ("reload_poll", *poll != new.poll),
        ]
        .into_iter()
        .filter_map(|(option, changed)| changed.then_some(option))
        .collect()
    }
}

/// The path against the current directory; `..` and symlinks are kept as given (a symlink swapped later is
/// what `--touch-reload` follows).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn watch(args: &[&str]) -> Result<Watch, ConfigError> {
        let argv = ["ferrule"].iter().chain(args).chain(&["app"]);
        Watch::from_options(&Options::parse_from(argv))
    }

    #[test]
    fn extra_files_need_reload_and_poll_needs_something_to_watch() {
        let e = watch(&["--reload-extra-file", "x.html"]).unwrap_err().to_string();
        assert!(e.contains("--reload-extra-file") && e.contains("--reload"), "{e}");
        let e = watch(&["--reload-poll"]).unwrap_err().to_string();
        assert!(e.contains("--reload-poll"), "{e}");
        assert!(watch(&["--reload-poll", "--touch-reload", "/tmp/t"]).unwrap().poll);
        assert!(!watch(&[]).unwrap().is_on());
    }

    #[test]
    fn paths_are_made_absolute_and_the_config_file_is_watched_only_under_reload() {
        let w = watch(&["--reload", "--reload-extra-file", "t.html,u.html", "-c", "f.toml"]).unwrap();
        let here = std::env::current_dir().unwrap();
        assert_eq!(w.files, [here.join("f.toml"), here.join("t.html"), here.join("u.html")]);
        assert!(w.on_change && w.is_on());
        let w = watch(&["--touch-reload", "deploy/touch", "-c", "f.toml"]).unwrap();
        assert_eq!(w.touch, [here.join("deploy/touch")]);
        assert!(w.files.is_empty() && !w.on_change && w.is_on());
    }

    #[test]
    fn a_changed_watch_option_is_named() {
        let old = watch(&["--reload"]).unwrap();
        let new = watch(&["--reload", "--touch-reload", "/t"]).unwrap();
        assert_eq!(old.changed_in(&new), ["touch_reload"]);
        assert!(old.changed_in(&old).is_empty());
    }
}
