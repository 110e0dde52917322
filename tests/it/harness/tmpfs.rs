//! A tmpfs the test mounts (as root, which CI is) and unmounts on drop: a small file system to fill up.

use std::path::Path;
use std::process::Command;

use super::ferrule::temp_dir;
use super::procs::require_root;

/// A small tmpfs mounted on a temp dir, unmounted on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        require_root("mounting a tmpfs");
        let dir = temp_dir();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=1777"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(out.status.success(), "mount tmpfs on {}: {out:?}", dir.path().display());
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes in use on the file system.
    pub fn used(&self) -> u64 {
        let path = std::ffi::CString::new(self.path().to_str().expect("utf-8 path")).expect("no NUL");
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: statvfs writes one struct into the zeroed storage it is given; the path is NUL-terminated.
        let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
        assert_eq!(rc, 0, "statvfs: {}", std::io::Error::last_os_error());
        // SAFETY: statvfs succeeded, so it filled the struct.
        let st = unsafe { st.assume_init() };
        (st.f_blocks - st.f_bfree) * st.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process that still holds a file there cannot keep the temp dir from being removed.
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}
