//! Tier-3 tests of what a master leaves behind when it ends early: a start-up step that fails after the sockets
//! are bound (becoming the child subreaper `--preload` needs, building the async runtime) still removes the
//! socket files, with one error line; and a zygote whose master died before the zygote tied its life to the
//! master's (`PR_SET_PDEATHSIG`) exits at once instead of importing the app for nobody, also when it was
//! adopted by a subreaper that is not PID 1 (systemd --user, a container's init).
//!
//! A step is made to fail for real: `ferrule` is started by a small Python wrapper that installs a seccomp filter
//! (through ctypes) making one system call fail with an errno, then execs the real command; the filter is
//! inherited across exec. Run with `cargo test --release --test it lifecycle::master_exit::`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use crate::harness::ferrule::{FerruleBuilder, apps_dir, bin, temp_dir};
use crate::harness::procs::{poll_until, signal, state_and_ppid};

/// Bound for a start that is expected to fail before any worker exists.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for the zygote's Python to start and reach the point where the test holds it.
const HOLD_TIMEOUT: Duration = Duration::from_secs(30);

/// System call numbers and the audit architecture of the machine the tests run on, for the seccomp filter.
struct Arch {
    audit: u32,
    prctl: u32,
    /// epoll_create1, and the older epoll_create where the architecture has it.
    epoll: &'static [u32],
}

fn arch() -> Arch {
    match std::env::consts::ARCH {
        "x86_64" => Arch {
            audit: 0xc000_003e,
            prctl: 157,
            epoll: &[291, 213],
        },
        "aarch64" => Arch {
            audit: 0xc000_00b7,
            prctl: 167,
            epoll: &[20],
        },
        other => panic!("no seccomp numbers for {other}: add them to tests/master_exit.rs"),
    }
}

/// A system call the wrapper makes fail: its number, the first argument it must have (or any), and the errno.
struct Deny {
    nr: u32,
    arg0: Option<u32>,
    errno: u32,
}

/// The venv's Python, which runs the wrappers (the one the `ferrule` command itself runs on).
fn venv_python() -> PathBuf {
    bin()
        .parent()
        .expect("the ferrule command is in the venv's bin")
        .join("python")
}

/// Writes an executable Python script `name` into `dir` with this body, run by the venv's Python.
fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    let text = format!("#!{}\n{body}", venv_python().display());
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod the wrapper");
    path
}

/// A wrapper that installs a seccomp filter failing each of `denied` with its errno, then execs the real
/// `ferrule` with the same arguments.
fn seccomp_wrapper(dir: &Path, denied: &[Deny]) -> PathBuf {
    let arch = arch();
    let rules: Vec<String> = denied
        .iter()
        .map(|d| {
            let arg0 = d.arg0.map_or("None".to_owned(), |a| a.to_string());
            format!("({}, {arg0}, {})", d.nr, d.errno)
        })
        .collect();
    let body = format!(
        r#"import ctypes, os, sys
AUDIT_ARCH = {audit}
RULES = [{rules}]
class Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]
LD_ABS, JEQ, RET = 0x20, 0x15, 0x06
ALLOW, ERRNO = 0x7fff0000, 0x00050000
blocks = []
for nr, arg0, errno in RULES:
    block = [(LD_ABS, 0, 0, 0)]
    rest = [(RET, 0, 0, ERRNO | errno)]
    if arg0 is not None:
        rest = [(LD_ABS, 0, 0, 16), (JEQ, 0, 1, arg0)] + rest
    block.append((JEQ, 0, len(rest), nr))
    blocks += block + rest
prog = [(LD_ABS, 0, 0, 4), (JEQ, 0, len(blocks), AUDIT_ARCH)] + blocks + [(RET, 0, 0, ALLOW)]
filters = (Filter * len(prog))(*[Filter(*f) for f in prog])
program = Program(len(prog), filters)
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
        libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0) != 0:
    sys.exit("seccomp wrapper: cannot install the filter: " + os.strerror(ctypes.get_errno()))
os.execv({ferrule:?}, [{ferrule:?}] + sys.argv[1:])
"#,
        audit = arch.audit,
        rules = rules.join(", "),
        ferrule = bin().display().to_string(),
    );
    write_script(dir, "seccomp_ferrule", &body)
}

/// Starts ferrule through `wrapper` with a Unix socket at a path outside the harness's temp dir (which goes
/// with the process), expects it to fail, and checks what it left: a non-zero exit, the socket bound and then
/// removed, and one error line, which contains `error`.
fn assert_failed_start_cleans_up(wrapper: &Path, socket: &Path, builder: FerruleBuilder, error: &str) {
    let (status, log) = builder.program(wrapper).unix_at(socket).spawn_expect_exit(EXIT_TIMEOUT);
    assert!(
        !status.success(),
        "ferrule should have failed to start\n--- log ---\n{log}"
    );
    // The failure must come after binding, or this test would not be about the clean-up.
    assert!(
        log.lines()
            .any(|l| l.contains("listening") && l.contains(&socket.display().to_string())),
        "ferrule did not bind {} before failing\n--- log ---\n{log}",
        socket.display()
    );
    assert!(
        !socket.exists(),
        "the socket file {} was left behind by the failed start\n--- log ---\n{log}",
        socket.display()
    );
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "expected one error line\n--- log ---\n{log}");
    assert!(
        errors[0].contains(error),
        "the error line should say {error:?}\n--- log ---\n{log}"
    );
}

/// `--preload` makes the master a child subreaper (it adopts the workers the zygote forks); when the kernel
/// refuses, the master stops, and removes the socket file it bound.
#[test]
fn refused_subreaper_removes_the_socket_file() {
    let dir = temp_dir();
    let wrapper = seccomp_wrapper(
        dir.path(),
        &[Deny {
            nr: arch().prctl,
            arg0: Some(libc::PR_SET_CHILD_SUBREAPER as u32),
            errno: libc::EPERM as u32,
        }],
    );
    let builder = FerruleBuilder::new("preload_app:application")
        .arg("--pythonpath")
        .arg(apps_dir())
        .arg("--preload");
    let socket = dir.path().join("subreaper.sock");
    assert_failed_start_cleans_up(&wrapper, &socket, builder, "subreaper");
}

/// The master's async runtime cannot be built (its epoll instance is refused): the master stops, and removes
/// the socket file it bound.
#[test]
fn failed_runtime_removes_the_socket_file() {
    let dir = temp_dir();
    let denied: Vec<Deny> = arch()
        .epoll
        .iter()
        .map(|&nr| Deny {
            nr,
            arg0: None,
            errno: libc::EMFILE as u32,
        })
        .collect();
    let wrapper = seccomp_wrapper(dir.path(), &denied);
    let builder = FerruleBuilder::new("wsgi_cases:application")
        .arg("--pythonpath")
        .arg(apps_dir());
    let socket = dir.path().join("runtime.sock");
    assert_failed_start_cleans_up(&wrapper, &socket, builder, "runtime");
}

/// Runs `ferrule` as the child of a subreaper that is not PID 1 (as under systemd --user or a container's
/// init): it adopts orphans, reaps every child and prints `reaped pid=PID code=CODE` for each (CODE negative
/// for a signal), and exits when it has no child left.
const SUBREAPER: &str = r#"import ctypes, os, subprocess, sys
PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit("subreaper: prctl failed: " + os.strerror(ctypes.get_errno()))
subprocess.Popen([os.environ["REAL_FERRULE"]] + sys.argv[1:])
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    print(f"reaped pid={pid} code={os.waitstatus_to_exitcode(status)}", flush=True)
"#;

/// Loaded by the zygote's Python before ferrule's code runs (through PYTHONPATH): writes the zygote's pid to
/// ZYGOTE_HOLD, then holds the zygote until its parent, the master, has exited (a pidfd becomes readable),
/// so the master dies in the window before the zygote sets PR_SET_PDEATHSIG. Other processes go on at once.
const HOLD_ZYGOTE: &str = r#"import os, select
if os.environ.get("FERRULE_ZYGOTE") == "1" and "ZYGOTE_HOLD" in os.environ:
    hold = os.environ.pop("ZYGOTE_HOLD")
    master = os.pidfd_open(os.getppid())
    with open(hold + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(hold + ".tmp", hold)
    select.select([master], [], [], 60)
"#;

/// A zygote whose master died before the zygote set PR_SET_PDEATHSIG notices it from its parent pid, even when
/// it was adopted by a subreaper rather than by PID 1: it exits at once (status 1), without importing the app.
#[test]
fn zygote_orphaned_under_a_subreaper_exits_at_once() {
    let dir = temp_dir();
    let site = dir.path().join("site");
    std::fs::create_dir(&site).expect("create the sitecustomize dir");
    std::fs::write(site.join("sitecustomize.py"), HOLD_ZYGOTE).expect("write sitecustomize.py");
    let wrapper = write_script(dir.path(), "subreaper", SUBREAPER);
    let hold = dir.path().join("zygote.pid");
    let imports = dir.path().join("imports.log");
    let builder = FerruleBuilder::new("preload_app:application")
        .program(&wrapper)
        .arg("--pythonpath")
        .arg(apps_dir())
        .arg("--preload")
        .env("REAL_FERRULE", bin())
        .env("PYTHONPATH", &site)
        .env("ZYGOTE_HOLD", &hold)
        .env("PRELOAD_IMPORT_LOG", &imports);
    let run = thread::spawn(move || builder.spawn_expect_exit(EXIT_TIMEOUT * 2));

    assert!(
        poll_until(HOLD_TIMEOUT, || hold.exists()),
        "the zygote did not start within {HOLD_TIMEOUT:?}"
    );
    let zygote: u32 = std::fs::read_to_string(&hold)
        .expect("read the zygote's pid")
        .parse()
        .expect("a pid");
    let (_, master) = state_and_ppid(zygote).expect("the held zygote is alive");
    signal(master, libc::SIGKILL);

    let (status, log) = run.join().expect("the subreaper's run");
    assert!(status.success(), "the subreaper failed\n--- log ---\n{log}");
    let reaped = format!("reaped pid={zygote} code=");
    let code = log
        .lines()
        .find_map(|l| l.split_once(&reaped).map(|(_, code)| code.trim().to_owned()))
        .unwrap_or_else(|| panic!("the subreaper did not reap the zygote {zygote}\n--- log ---\n{log}"));
    let imported = std::fs::read_to_string(&imports).unwrap_or_default();
    assert!(
        imported.is_empty(),
        "the orphaned zygote imported the app for a dead master\n--- log ---\n{log}"
    );
    assert_eq!(
        code, "1",
        "the orphaned zygote should exit with status 1\n--- log ---\n{log}"
    );
}
