//! A virtualenv with real frameworks from PyPI (Flask, Django), made once per target dir and shared
//! by every test binary, and ferrule itself built from this checkout and installed into it as a user
//! installs it: the tests run that venv's `ferrule` command.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Pinned to major versions so a new major release cannot change what the tests exercise.
/// Changing this list rebuilds the venv (the marker file holds it).
const REQUIREMENTS: &[&str] = &["flask>=3,<4", "django>=5,<6", "maturin>=1.9,<2"];

/// The Python ferrule links against (pyenv 3.11); the venv must be made by the same minor version
/// or its site-packages would hold wheels built for another ABI. Helper scripts (load.py) run on it too.
pub const PYTHON: &str = "python3.11";

/// Bounds for `python -m venv` and `pip install` (pip downloads a few wheels, a few MB).
const VENV_TIMEOUT: Duration = Duration::from_secs(120);
const PIP_TIMEOUT: Duration = Duration::from_secs(600);
/// Bound for building ferrule's wheel: a release build of the whole crate graph on a loaded 2-core machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1200);

/// What the package is built from: a change to any of these rebuilds and reinstalls it.
const SOURCES: &[&str] = &[
    "Cargo.toml",
    "Cargo.lock",
    "pyproject.toml",
    "build.rs",
    "src",
    "python",
];

/// `<target>/test-venv`, made on first call (under a file lock, so parallel tests and test
/// binaries wait for one another instead of racing on pip).
pub fn test_venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(make_venv).clone()
}

/// The `ferrule` command the tests run: the package built from this checkout with maturin and installed into
/// the test venv, so the tests meet what users install. Built once per change of the sources (the venv holds
/// the hash of what it was built from), under a file lock shared by every test binary.
pub fn installed_ferrule() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(install_ferrule).clone()
}

fn install_ferrule() -> PathBuf {
    let venv = test_venv();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = target_dir();
    let key = source_key(root);
    let _lock = FileLock::acquire(&target.join("test-ferrule.lock"));
    let marker = venv.join(".ferrule-installed");
    let command = venv.join("bin").join("ferrule");
    if command.is_file() && std::fs::read_to_string(&marker).ok().as_deref() == Some(key.as_str()) {
        return command;
    }
    let wheels = target.join("test-wheels");
    let _ = std::fs::remove_dir_all(&wheels);
    // Its own target dir: the cargo running these tests may hold the lock on the usual one, and the extension
    // module is built with other settings than the test executables.
    run_bounded(
        Command::new(venv.join("bin").join("maturin"))
            .args(["build", "--release", "--out"])
            .arg(&wheels)
            .arg("--interpreter")
            .arg(venv.join("bin").join("python"))
            .current_dir(root)
            .env("CARGO_TARGET_DIR", target.join("wheel-build")),
        BUILD_TIMEOUT,
        &target.join("test-ferrule-build.log"),
        "maturin build --release (building ferrule's wheel for the tests)",
    );
    install_wheel(
        &venv,
        &built_wheel(&wheels),
        &target.join("test-ferrule-install.log"),
        "the test venv",
    );
    std::fs::write(&marker, &key).expect("write the install marker");
    command
}

/// The same package installed into a venv of the system's `/usr/bin/python3`, which users other than root can
/// run (pyenv's Pythons live under root's home, mode 700): for the tests that drop privileges with `--uid`.
/// The system Python must be the test venv's minor version, since the wheel is built for that one.
pub fn system_venv_ferrule() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(install_system_venv).clone()
}

fn install_system_venv() -> PathBuf {
    // Builds and installs the test venv's package first: its wheel is the one installed here too.
    installed_ferrule();
    let target = target_dir();
    let venv = target.join("system-venv");
    let wheels = target.join("test-wheels");
    let key = std::fs::read_to_string(test_venv().join(".ferrule-installed")).expect("the test venv's install marker");
    let _lock = FileLock::acquire(&target.join("system-venv.lock"));
    let marker = venv.join(".ferrule-installed");
    let command = venv.join("bin").join("ferrule");
    if command.is_file() && std::fs::read_to_string(&marker).ok().as_deref() == Some(key.as_str()) {
        return command;
    }
    let _ = std::fs::remove_dir_all(&venv);
    run_bounded(
        Command::new("/usr/bin/python3").arg("-m").arg("venv").arg(&venv),
        VENV_TIMEOUT,
        &target.join("system-venv-create.log"),
        "/usr/bin/python3 -m venv (apt-get install python3-venv)",
    );
    install_wheel(
        &venv,
        &built_wheel(&wheels),
        &target.join("system-venv-install.log"),
        "a venv of /usr/bin/python3 (is it the test venv's Python version?)",
    );
    std::fs::write(&marker, &key).expect("write the install marker");
    command
}

/// Installs (or reinstalls) `wheel` into `venv` with its own pip, without dependencies.
fn install_wheel(venv: &Path, wheel: &Path, log: &Path, what: &str) {
    run_bounded(
        Command::new(venv.join("bin").join("python"))
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-deps",
                "--force-reinstall",
            ])
            .arg(wheel),
        PIP_TIMEOUT,
        log,
        &format!("pip install {} into {what}", wheel.display()),
    );
}

/// The wheel maturin wrote into `dir`.
fn built_wheel(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .unwrap_or_else(|| panic!("no wheel in {}", dir.display()))
}

/// A hash of every source file the package is built from, paths included.
fn source_key(root: &Path) -> String {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "__pycache__") {
                    walk(&path, files);
                }
            } else if path.extension().is_none_or(|x| x != "pyc") {
                files.push(path);
            }
        }
    }
    let mut files = Vec::new();
    for source in SOURCES {
        let path = root.join(source);
        if path.is_dir() {
            walk(&path, &mut files);
        } else {
            files.push(path);
        }
    }
    files.sort();
    let mut all = Vec::new();
    for file in files {
        all.extend_from_slice(file.strip_prefix(root).unwrap_or(&file).to_string_lossy().as_bytes());
        all.push(0);
        all.extend_from_slice(&std::fs::read(&file).unwrap_or_default());
        all.push(0);
    }
    super::http::sha256_hex(&all)
}

/// The cargo target dir: the parent of the per-target temp dir cargo gives integration tests.
fn target_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().map(Path::to_path_buf).unwrap_or_else(|| tmp.to_path_buf())
}

/// An exclusive `flock` held until dropped (the kernel also drops it if the process dies).
struct FileLock(File);

impl FileLock {
    fn acquire(path: &Path) -> FileLock {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open lock file {}: {e}", path.display()));
        // Blocking: whoever holds it is installing, which is bounded by PIP_TIMEOUT.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {}: {}", path.display(), std::io::Error::last_os_error());
        FileLock(f)
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn make_venv() -> PathBuf {
    let target = target_dir();
    std::fs::create_dir_all(&target).expect("create target dir");
    let venv = target.join("test-venv");
    let marker = venv.join(".ferrule-test-venv-ready");
    let want = format!("{PYTHON}\n{}\n", REQUIREMENTS.join("\n"));

    let _lock = FileLock::acquire(&target.join("test-venv.lock"));
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return venv;
    }

    // Whatever is there is a half-made venv or one for other requirements.
    if venv.exists() {
        std::fs::remove_dir_all(&venv).unwrap_or_else(|e| panic!("remove old {}: {e}", venv.display()));
    }
    run_bounded(
        Command::new(PYTHON).arg("-m").arg("venv").arg(&venv),
        VENV_TIMEOUT,
        &target.join("test-venv-create.log"),
        &format!("{PYTHON} -m venv {} (is pyenv's python3.11 on PATH?)", venv.display()),
    );
    let python = venv.join("bin").join("python");
    run_bounded(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--timeout",
                "30",
                "--retries",
                "2",
            ])
            .args(REQUIREMENTS),
        PIP_TIMEOUT,
        &target.join("test-venv-pip.log"),
        &format!(
            "pip install {} into {} (no network to PyPI?)",
            REQUIREMENTS.join(" "),
            venv.display()
        ),
    );
    // Written last: its presence means the install finished.
    std::fs::write(&marker, want).expect("write venv marker");
    venv
}

/// Runs `cmd` with output to `log`, killing it after `timeout`; panics with `what` and the log's
/// tail on failure.
fn run_bounded(cmd: &mut Command, timeout: Duration, log: &Path, what: &str) {
    let out = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let err = out.try_clone().expect("clone log handle");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if status.is_some_and(|s| s.success()) {
        return;
    }
    let mut text = String::new();
    File::open(log).and_then(|mut f| f.read_to_string(&mut text)).ok();
    let tail: Vec<&str> = text
        .lines()
        .rev()
        .take(30)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    match status {
        None => panic!(
            "{what}: timed out after {timeout:?}; log {}:\n{}",
            log.display(),
            tail.join("\n")
        ),
        Some(s) => panic!("{what}: failed ({s}); log {}:\n{}", log.display(), tail.join("\n")),
    }
}
