//! What a watched file is at one moment, as `stat` (following symlinks) says: a change of modification time,
//! size, inode or device is a change, so an edit, a touch, a replacement by rename and a symlink swapped to
//! another file all count, and a file that appears counts. A file that disappears does not, by itself: an
//! editor that saves by rename makes it appear again a moment later.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    mtime: (i64, i64),
    size: u64,
    inode: u64,
    device: u64,
}

impl Stamp {
    pub(super) fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            mtime: (m.mtime(), m.mtime_nsec()),
            size: m.size(),
            inode: m.ino(),
            device: m.dev(),
        })
    }
}

/// The stamps of a set of files.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Stamps(HashMap<PathBuf, Option<Stamp>>);

impl Stamps {
    pub(super) fn take<'p>(paths: impl IntoIterator<Item = &'p PathBuf>) -> Stamps {
        Stamps(paths.into_iter().map(|p| (p.clone(), Stamp::of(p))).collect())
    }

    /// The files of `now` that changed since `self` (see the module's doc); a file `self` does not know
    /// (just added) is not a change.
    pub(super) fn changed_in<'n>(&self, now: &'n Stamps) -> Vec<&'n PathBuf> {
        let mut changed: Vec<&PathBuf> = now
            .0
            .iter()
            .filter(|(path, stamp)| match (self.0.get(*path), stamp) {
                (Some(before), Some(_)) => before != *stamp,
                _ => false,
            })
            .map(|(path, _)| path)
            .collect();
        changed.sort();
        changed
    }

    /// Takes the stamps of `newer` for the files it has.
    pub(super) fn update(&mut self, newer: Stamps) {
        self.0.extend(newer.0);
    }

    /// Adds the files of `paths` not known yet, as they are now.
    pub(super) fn extend<'p>(&mut self, paths: impl IntoIterator<Item = &'p PathBuf>) {
        for path in paths {
            self.0.entry(path.clone()).or_insert_with(|| Stamp::of(path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_a_touch_a_rename_over_and_a_creation_are_changes_a_removal_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
        std::fs::write(&a, "1").unwrap();
        std::fs::write(&b, "1").unwrap();
        let files = [a.clone(), b.clone(), c.clone()];
        let before = Stamps::take(&files);
        assert!(before.changed_in(&Stamps::take(&files)).is_empty());

        std::fs::write(&a, "22").unwrap();
        assert_eq!(before.changed_in(&Stamps::take(&files)), [&a]);

        let before = Stamps::take(&files);
        std::fs::write(dir.path().join("tmp"), "1").unwrap();
        std::fs::rename(dir.path().join("tmp"), &b).unwrap();
        std::fs::write(&c, "new").unwrap();
        assert_eq!(before.changed_in(&Stamps::take(&files)), [&b, &c]);

        let before = Stamps::take(&files);
        std::fs::remove_file(&c).unwrap();
        assert!(before.changed_in(&Stamps::take(&files)).is_empty());
    }

    #[test]
    fn a_symlink_swapped_to_another_file_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two, link) = (dir.path().join("one"), dir.path().join("two"), dir.path().join("link"));
        std::fs::write(&one, "same").unwrap();
        std::fs::write(&two, "same").unwrap();
        std::os::unix::fs::symlink(&one, &link).unwrap();
        let before = Stamps::take([&link]);
        std::os::unix::fs::symlink(&two, dir.path().join("link.new")).unwrap();
        std::fs::rename(dir.path().join("link.new"), &link).unwrap();
        assert_eq!(before.changed_in(&Stamps::take([&link])), [&link]);
    }
}
