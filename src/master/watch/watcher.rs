//! The watching thread: inotify on the directories of the targets (editors replace a file by rename, so the
//! file itself is not what to watch), filtered by name; a look every second at targets whose directory does
//! not exist (yet), and at every target when inotify is not available, its watch limit is reached, or
//! `--reload-poll` asks. Activity is debounced: once nothing happened for `QUIET` (after inotify) or for one
//! look (after polling), the targets are compared with what they were at the last reload, and a change is
//! one `Event::Changed`, however many writes made it.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use super::super::error::LOG;
use super::super::events::{Event, Events};
use super::stamp::Stamps;

/// Quiet after the last inotify event before the targets are compared: a save is a few events within
/// milliseconds, a burst of writes keeps it waiting.
const QUIET: Duration = Duration::from_millis(250);
/// How often polled targets are looked at.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// The longest the thread sleeps before it looks for new targets from the master.
const WAKE_EVERY: Duration = Duration::from_millis(200);

/// Starts the thread; returns where to send it the whole set of targets whenever it changes.
pub(super) fn spawn(poll_only: bool, events: Events) -> std::io::Result<mpsc::Sender<Vec<PathBuf>>> {
    let (tx, rx) = mpsc::channel();
    let notify = if poll_only {
        tracing::info!(target: LOG, "--reload-poll: looking at the watched files every second");
        None
    } else {
        match Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK) {
            Ok(inotify) => Some(Notify::new(inotify)),
            Err(error) => {
                tracing::warn!(target: LOG, %error, "inotify is not available; looking at the watched files every second");
                None
            }
        }
    };
    let mut watcher = Watcher {
        targets: Vec::new(),
        at_reload: Stamps::default(),
        last_look: Stamps::default(),
        notify,
        activity: None,
        next_look: Instant::now() + POLL_EVERY,
        events,
    };
    std::thread::Builder::new()
        .name("ferrule-watch".into())
        .spawn(move || watcher.run(&rx))?;
    Ok(tx)
}

/// The inotify watches: one per directory holding a target, with the names in it that are targets.
struct Notify {
    inotify: Inotify,
    dirs: HashMap<WatchDescriptor, (PathBuf, HashSet<OsString>)>,
    /// The directories of `dirs`, to look up.
    watched: HashMap<PathBuf, WatchDescriptor>,
}

impl Notify {
    fn new(inotify: Inotify) -> Notify {
        Notify {
            inotify,
            dirs: HashMap::new(),
            watched: HashMap::new(),
        }
    }

    fn watches(&self, dir: &Path) -> bool {
        self.watched.contains_key(dir)
    }

    /// Adds `name` in `dir` to what is watched; an error but a missing or unreadable directory is returned.
    fn add(&mut self, dir: &Path, name: &std::ffi::OsStr) -> Result<(), Errno> {
        if let Some(wd) = self.watched.get(dir) {
            if let Some((_, names)) = self.dirs.get_mut(wd) {
                names.insert(name.to_owned());
            }
            return Ok(());
        }
        match self.inotify.add_watch(dir, MASK) {
            Ok(wd) => {
                // The kernel gives the same descriptor for a directory already watched under another path.
                let entry = self.dirs.entry(wd).or_insert_with(|| (dir.to_owned(), HashSet::new()));
                entry.1.insert(name.to_owned());
                self.watched.insert(dir.to_owned(), wd);
                Ok(())
            }
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::EACCES) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// The directory of `wd` went away: forgets it.
    fn forget(&mut self, wd: WatchDescriptor) -> Option<PathBuf> {
        let (dir, _) = self.dirs.remove(&wd)?;
        self.watched.retain(|_, w| *w != wd);
        let _ = self.inotify.rm_watch(wd);
        Some(dir)
    }
}

/// What happens in a watched directory that can be a change to a target in it, or to the directory itself.
const MASK: AddWatchFlags = AddWatchFlags::IN_MODIFY
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

struct Watcher {
    targets: Vec<PathBuf>,
    /// The targets as they were at the last reload (or when first watched).
    at_reload: Stamps,
    /// The polled targets as they were at the last look.
    last_look: Stamps,
    /// `None`: everything is polled.
    notify: Option<Notify>,
    /// When the last activity was seen, and how long the quiet after it must be.
    activity: Option<(Instant, Duration)>,
    next_look: Instant,
    events: Events,
}

impl Watcher {
    fn run(&mut self, updates: &mpsc::Receiver<Vec<PathBuf>>) {
        loop {
            loop {
                match updates.try_recv() {
                    Ok(targets) => self.set_targets(targets),
                    Err(mpsc::TryRecvError::Empty) => break,
                    // The master is gone.
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            self.wait_for_events();
            let now = Instant::now();
            if now >= self.next_look {
                self.next_look = now + POLL_EVERY;
                self.look();
            }
            if let Some((at, quiet)) = self.activity {
                if now >= at + quiet {
                    self.activity = None;
                    self.compare();
                }
            }
        }
    }

    fn set_targets(&mut self, targets: Vec<PathBuf>) {
        self.at_reload.extend(&targets);
        self.last_look.extend(&targets);
        let more = targets.len() > self.targets.len();
        self.targets = targets;
        self.add_watches(&self.targets.clone());
        if more {
            tracing::info!(target: LOG,
                files = self.targets.len(),
                inotify = self.notify.is_some(),
                "watching files for changes"
            );
        }
    }

    /// Adds a watch for the directory of each of `targets` (and for a symlink, the directory of the file it
    /// points to) that exists and has none; a directory that does not exist yet is polled until it does. A
    /// watch that cannot be added for another reason (the limit of watches) turns inotify off.
    fn add_watches(&mut self, targets: &[PathBuf]) {
        let Some(notify) = &mut self.notify else { return };
        let mut failed = None;
        'targets: for target in targets {
            for file in std::iter::once(target.clone()).chain(std::fs::canonicalize(target).ok()) {
                let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
                    continue;
                };
                if let Err(error) = notify.add(dir, name) {
                    failed = Some((error, dir.to_owned()));
                    break 'targets;
                }
            }
        }
        if let Some((error, dir)) = failed {
            tracing::warn!(target: LOG,
                %error,
                dir = %dir.display(),
                "cannot watch a directory with inotify (the watch limit, fs.inotify.max_user_watches?); looking at \
                 the watched files every second instead"
            );
            self.notify = None;
        }
    }

    /// Sleeps until an inotify event, the next look or the end of the quiet, at most `WAKE_EVERY`; records
    /// activity on a target's name.
    fn wait_for_events(&mut self) {
        let now = Instant::now();
        let mut until = self.next_look.min(now + WAKE_EVERY);
        if let Some((at, quiet)) = self.activity {
            until = until.min(at + quiet);
        }
        let timeout = until.saturating_duration_since(now);
        let Some(notify) = &mut self.notify else {
            std::thread::sleep(timeout);
            return;
        };
        let mut fds = [PollFd::new(notify.inotify.as_fd(), PollFlags::POLLIN)];
        let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, millis) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
        let Ok(events) = notify.inotify.read_events() else {
            return;
        };
        let mut seen = false;
        for event in events {
            if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                seen = true;
                continue;
            }
            let gone = AddWatchFlags::IN_IGNORED | AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF;
            if event.mask.intersects(gone) {
                // The directory went away: its targets are polled until it is back, and then watched again.
                if let Some(dir) = notify.forget(event.wd) {
                    tracing::debug!(target: LOG, dir = %dir.display(), "a watched directory went away");
                }
                seen = true;
                continue;
            }
            let on_target = match (notify.dirs.get(&event.wd), &event.name) {
                (Some((_, names)), Some(name)) => names.contains(name),
                _ => false,
            };
            seen |= on_target;
        }
        if seen {
            self.activity = Some((Instant::now(), QUIET));
        }
    }

    /// Looks at the targets inotify does not cover (all of them without inotify); a change there is activity.
    /// Directories that appeared since are watched from now on.
    fn look(&mut self) {
        let polled: Vec<PathBuf> = match &self.notify {
            None => self.targets.clone(),
            Some(notify) => self
                .targets
                .iter()
                .filter(|t| t.parent().is_none_or(|dir| !notify.watches(dir)))
                .cloned()
                .collect(),
        };
        if polled.is_empty() {
            return;
        }
        self.add_watches(&polled);
        let now = Stamps::take(&polled);
        if !self.last_look.changed_in(&now).is_empty() {
            // Quiet for a whole look: a burst of writes that spans one is still one reload.
            self.activity = Some((Instant::now(), POLL_EVERY + POLL_EVERY / 2));
        }
        self.last_look.update(now);
    }

    /// After the quiet: a target that differs from the last reload's is a change, and the master reloads.
    fn compare(&mut self) {
        let now = Stamps::take(&self.targets);
        let changed: Vec<PathBuf> = self.at_reload.changed_in(&now).into_iter().cloned().collect();
        self.last_look.update(Stamps::take(&self.targets));
        self.at_reload = now;
        let Some(first) = changed.first() else { return };
        let _ = self.events.send(Event::Changed {
            file: first.clone(),
            others: changed.len() - 1,
        });
    }
}
