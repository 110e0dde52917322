//! Tier 3: ferrule as users install it, a Python package in a venv. The venv's `ferrule` command runs the app
//! in that venv's Python, `python -m ferrule` is the same command, `--virtualenv` serves another venv of the
//! same Python ahead of ferrule's own, and a venv of another Python version is refused at start-up.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::ferrule::{FerruleBuilder, apps_dir, bin};
use crate::harness::uwsgi::{Vars, encode_request, nginx_vars, send_raw};
use crate::harness::venv::test_venv;

const EXIT_WAIT: Duration = Duration::from_secs(30);

fn app() -> FerruleBuilder {
    FerruleBuilder::new("probe_app:application")
        .arg("--pythonpath")
        .arg(apps_dir())
}

/// The app's answer to `/python`: its interpreter, sys.path, VIRTUAL_ENV and whether `venv_marker` imports.
fn python_of(ferrule: &crate::harness::ferrule::Ferrule) -> String {
    let vars: Vars = nginx_vars("GET", "/python", b"");
    let mut stream = ferrule.connect();
    let raw = send_raw(&mut stream, &encode_request(vars.as_slice(), b""));
    let text = raw.text();
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "GET /python: {text}\n{}",
        ferrule.log()
    );
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// A venv without pip (quick to make) of `python`, in `dir`.
fn bare_venv(python: &Path, dir: &Path) -> PathBuf {
    let venv = dir.join("app-venv");
    let out = Command::new(python)
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .output()
        .unwrap_or_else(|e| panic!("run {} -m venv: {e}", python.display()));
    assert!(
        out.status.success(),
        "{} -m venv: {}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    venv
}

/// An installed CPython of `version` other than the test venv's: on PATH, else pyenv's.
fn other_python(version: &str) -> PathBuf {
    let pyenv_root = std::env::var("PYENV_ROOT").unwrap_or_else(|_| "/root/.pyenv".to_owned());
    let versions = Path::new(&pyenv_root).join("versions");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&versions)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{version}.")))
        .map(|e| e.path().join("bin").join(format!("python{version}")))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "no CPython {version} under {} (pyenv install {version})",
            versions.display()
        )
    })
}

/// The command the tests run is the venv's, and the app runs on that venv's Python (not a resolved symlink
/// that would lose the venv, not a libpython found elsewhere).
#[test]
fn the_app_runs_in_the_venv_ferrule_was_started_from() {
    let venv = test_venv();
    assert_eq!(bin(), venv.join("bin").join("ferrule"));
    let ferrule = app().spawn();
    let python = python_of(&ferrule);
    assert!(
        python.contains(&format!("\"prefix\": \"{}\"", venv.display())),
        "sys.prefix is not the venv {}: {python}",
        venv.display()
    );
    assert!(
        python.contains(&format!(
            "\"executable\": \"{}\"",
            venv.join("bin").join("python").display()
        )),
        "the worker is not the venv's python: {python}"
    );
}

/// `python -m ferrule` is the same command as `ferrule`: same version line, same validation and app import.
#[test]
fn python_dash_m_ferrule_is_the_same_command() {
    let python = test_venv().join("bin").join("python");
    let by_module = Command::new(&python)
        .args(["-m", "ferrule", "--version"])
        .output()
        .expect("python -m ferrule");
    let by_script = Command::new(bin())
        .arg("--version")
        .output()
        .expect("ferrule --version");
    assert!(by_module.status.success() && by_script.status.success());
    assert_eq!(
        String::from_utf8_lossy(&by_module.stdout),
        String::from_utf8_lossy(&by_script.stdout)
    );
    assert!(String::from_utf8_lossy(&by_script.stdout).starts_with("ferrule "));
    let check = Command::new(&python)
        .args(["-m", "ferrule", "--check-config", "--pythonpath"])
        .arg(apps_dir())
        .arg("probe_app:application")
        .output()
        .expect("python -m ferrule --check-config");
    assert!(
        check.status.success(),
        "python -m ferrule --check-config: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let help = Command::new(&python)
        .args(["-m", "ferrule", "--help"])
        .output()
        .expect("--help");
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("Usage: ferrule"),
        "the usage line names ferrule, not __main__.py: {}",
        String::from_utf8_lossy(&help.stdout)
    );
}

/// uWSGI's habit of one server install serving an app's venv: with `--virtualenv DIR` of the same Python, DIR's
/// site-packages come first on sys.path (ahead of ferrule's own venv), its packages import, and VIRTUAL_ENV is
/// set, as `DIR/bin/python -c 'import app'` would have it.
#[test]
fn a_virtualenv_of_the_same_python_comes_first_on_sys_path() {
    let builder = app();
    let venv = bare_venv(&test_venv().join("bin").join("python"), builder.tempdir());
    let version = Command::new(venv.join("bin").join("python"))
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .expect("the venv's python");
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let site = venv.join("lib").join(format!("python{version}")).join("site-packages");
    std::fs::write(site.join("venv_marker.py"), "VALUE = 'from the app venv'\n").expect("write venv_marker.py");
    let ferrule = builder.arg("--virtualenv").arg(&venv).spawn();
    let python = python_of(&ferrule);
    assert!(python.contains("\"marker\": \"from the app venv\""), "{python}");
    assert!(
        python.contains(&format!("\"virtual_env\": \"{}\"", venv.display())),
        "{python}"
    );
    let own = test_venv()
        .join("lib")
        .join(format!("python{version}"))
        .join("site-packages");
    let at = |p: &Path| python.find(&format!("\"{}\"", p.display()));
    match (at(&site), at(&own)) {
        (Some(app_venv), Some(ferrule_venv)) => assert!(
            app_venv < ferrule_venv,
            "the app's venv must come before ferrule's on sys.path: {python}"
        ),
        other => panic!("both site-packages should be on sys.path ({other:?}): {python}"),
    }
}

/// A venv made by another Python version holds packages built for another ABI: refused at start-up with one
/// line that names both versions (and no worker started).
#[test]
fn a_virtualenv_of_another_python_version_is_refused() {
    let builder = app();
    let other = other_python("3.12");
    let venv = bare_venv(&other, builder.tempdir());
    let (status, log) = builder.arg("--virtualenv").arg(&venv).spawn_expect_exit(EXIT_WAIT);
    assert!(!status.success(), "a 3.12 venv was accepted by a 3.11 ferrule\n{log}");
    let line = log
        .lines()
        .find(|l| l.contains(&venv.display().to_string()) && l.contains("3.12") && l.contains("3.11"))
        .unwrap_or_else(|| panic!("no line names the venv and both versions:\n{log}"));
    assert!(line.contains("made with Python 3.12"), "{line}");
}
