//! Preparing the running interpreter for the app: `--chdir`, `--virtualenv` and `--pythonpath`. ferrule runs
//! inside the Python that started it (`venv/bin/ferrule`, `python -m ferrule`), so that interpreter, its venv
//! and its version are the app's.

use std::path::Path;

use pyo3::prelude::*;
use pyo3::types::PyList;

use super::app_error::AppError;
use crate::config::Config;

/// Changes directory and sets up `sys.path`; the interpreter is already running.
pub(crate) fn initialize(config: &Config) -> Result<(), AppError> {
    if let Some(dir) = &config.app.chdir {
        std::env::set_current_dir(dir)
            .map_err(|e| AppError::Interpreter(format!("cannot change to {}: {e}", dir.display())))?;
    }
    Python::attach(|py| {
        if let Some(venv) = &config.app.virtualenv {
            let (running, executable) = running_python(py);
            check_venv_version(venv, &running, &executable)?;
            activate_venv(py, venv, &running)
                .map_err(|e| AppError::Interpreter(format!("cannot use the virtualenv {}: {e}", venv.display())))?;
        }
        set_up_sys_path(py, config).map_err(|e| AppError::Interpreter(format!("cannot set sys.path: {e}")))
    })
}

/// `major.minor` of the running interpreter, and its path for messages.
fn running_python(py: Python<'_>) -> (String, String) {
    let sys = py.import("sys").ok();
    let version = sys
        .as_ref()
        .and_then(|s| s.getattr("version_info").ok())
        .and_then(|v| v.extract::<(u8, u8, u8, String, u8)>().ok())
        .map(|(major, minor, ..)| format!("{major}.{minor}"))
        .unwrap_or_default();
    let executable = sys
        .and_then(|s| s.getattr("executable").ok())
        .and_then(|e| e.extract::<String>().ok())
        .unwrap_or_default();
    (version, executable)
}

/// A venv made by another Python version holds extension modules built for another ABI: refused at start-up.
fn check_venv_version(venv: &Path, running: &str, executable: &str) -> Result<(), AppError> {
    let cfg = std::fs::read_to_string(venv.join("pyvenv.cfg")).unwrap_or_default();
    let version = cfg.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        matches!(key.trim(), "version" | "version_info").then(|| value.trim().to_owned())
    });
    if let Some(found) = version {
        let major_minor: Vec<&str> = found.split('.').take(2).collect();
        if major_minor.join(".") != running {
            return Err(AppError::VirtualenvVersion {
                venv: venv.display().to_string(),
                found,
                running: running.to_owned(),
                executable: executable.to_owned(),
            });
        }
    }
    Ok(())
}

/// Puts the venv's site-packages (and what its `.pth` files add) first on `sys.path` and sets `VIRTUAL_ENV`,
/// so the app imports what `venv/bin/python -c 'import app'` would, ahead of ferrule's own environment.
fn activate_venv(py: Python<'_>, venv: &Path, running: &str) -> PyResult<()> {
    let site_packages = venv.join("lib").join(format!("python{running}")).join("site-packages");
    let sys_path = py.import("sys")?.getattr("path")?.cast_into::<PyList>()?;
    let before: Vec<String> = sys_path.extract()?;
    py.import("site")?
        .call_method1("addsitedir", (site_packages.display().to_string(),))?;
    let after: Vec<String> = sys_path.extract()?;
    let added: Vec<&String> = after.iter().filter(|p| !before.contains(p)).collect();
    let mut ordered: Vec<String> = added.iter().map(|p| (*p).clone()).collect();
    ordered.extend(before);
    sys_path.call_method1("clear", ())?;
    for entry in ordered {
        sys_path.append(entry)?;
    }
    py.import("os")?
        .getattr("environ")?
        .set_item("VIRTUAL_ENV", venv.display().to_string())?;
    Ok(())
}

/// `--pythonpath` entries first, then the working directory, as `python -m` would see it.
fn set_up_sys_path(py: Python<'_>, config: &Config) -> PyResult<()> {
    let path = py.import("sys")?.getattr("path")?.cast_into::<PyList>()?;
    let cwd = std::env::current_dir().map_err(PyErr::from)?;
    let mut front: Vec<String> = config
        .app
        .pythonpath
        .iter()
        .map(|p| {
            std::path::absolute(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string()
        })
        .collect();
    front.push(cwd.display().to_string());
    for (i, entry) in front.iter().enumerate() {
        path.insert(i, entry)?;
    }
    Ok(())
}
