//! `--reload` and `--touch-reload`: what the master watches, and the thread that watches it. Under `--reload`
//! the workers (or the zygote) report the files their app imported from outside the standard library and
//! site-packages; with the `--config` file, the `--reload-extra-file` paths and the `--touch-reload` files
//! they are the targets. A change to one, once the writes have been quiet for a moment, is sent to the
//! supervision loop as one `Event::Changed`, which reloads exactly as SIGHUP does.
//!
//! The master owns the set of targets here and hands a copy to the watching thread (`watcher`) whenever it
//! grows; the thread never touches the master's state.

mod stamp;
mod watcher;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::mpsc;

use crate::config::Config;

use super::error::LOG;
use super::events::Events;

/// The master's side: the targets, and the channel to the thread watching them (none when nothing is watched).
pub(super) struct Watch {
    targets: BTreeSet<PathBuf>,
    /// Files reported since the last `files-done`, not yet handed to the thread.
    unsent: bool,
    to_thread: Option<mpsc::Sender<Vec<PathBuf>>>,
}

impl Watch {
    /// Starts watching what the options name; the app's files come later, from the workers.
    pub(super) fn start(config: &Config, events: &Events) -> Watch {
        let options = &config.watch;
        let mut watch = Watch {
            targets: options.files.iter().chain(&options.touch).cloned().collect(),
            unsent: false,
            to_thread: None,
        };
        if !options.is_on() {
            return watch;
        }
        if options.on_change {
            tracing::warn!(target: LOG,
                "--reload is for development: every change to the app's files restarts the workers, and an app \
                 that does not import answers 503"
            );
        }
        for file in &options.touch {
            tracing::info!(target: LOG, file = %file.display(), "reloading when this file is touched");
        }
        match watcher::spawn(options.poll, events.clone()) {
            Ok(tx) => {
                watch.to_thread = Some(tx);
                watch.send();
            }
            Err(error) => {
                tracing::error!(target: LOG, %error, "cannot start the file watcher; only SIGHUP reloads")
            }
        }
        watch
    }

    /// Some of the files a worker's app imported (under `--reload`).
    pub(super) fn add(&mut self, files: Vec<PathBuf>) {
        for file in files {
            self.unsent |= self.targets.insert(file);
        }
    }

    /// A worker finished its report: new files go to the thread in one update. Every worker of every
    /// generation reports; files are only ever added (one that an app stopped importing costs a stat).
    pub(super) fn report_done(&mut self) {
        if self.unsent {
            self.unsent = false;
            self.send();
        }
    }

    fn send(&mut self) {
        let Some(tx) = &self.to_thread else { return };
        if tx.send(self.targets.iter().cloned().collect()).is_err() {
            tracing::error!(target: LOG, "the file watcher stopped; only SIGHUP reloads");
            self.to_thread = None;
        }
    }
}
