//! Starting the embedded CPython: the virtualenv, `--chdir` and `--pythonpath`.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyList;

use super::AppError;
use crate::config::Config;

/// The interpreter ferrule was built against (set by build.rs).
const BUILD_PYTHON: &str = env!("FERRULE_PYTHON");
const BUILD_PYTHON_VERSION: &str = env!("FERRULE_PYTHON_VERSION");

/// Starts the interpreter once, then releases the GIL so any thread can attach.
pub fn initialize(config: &Config) -> Result<(), AppError> {
    if let Some(dir) = &config.chdir {
        std::env::set_current_dir(dir)
            .map_err(|e| AppError::Interpreter(format!("cannot change to {}: {e}", dir.display())))?;
    }
    // The program name decides where Python looks for its prefix: with a virtualenv it is the venv's python,
    // so CPython finds pyvenv.cfg and sets up sys.prefix and site-packages exactly as `venv/bin/python` does.
    let program = match &config.virtualenv {
        Some(venv) => {
            check_venv_version(venv)?;
            venv.join("bin").join("python")
        }
        None => PathBuf::from(BUILD_PYTHON),
    };
    init_from_config(&program)?;
    Python::attach(|py| set_up_sys_path(py, config))
        .map_err(|e| AppError::Interpreter(format!("cannot set sys.path: {e}")))
}

fn init_from_config(program: &Path) -> Result<(), AppError> {
    let program = CString::new(program.as_os_str().as_bytes())
        .map_err(|_| AppError::Interpreter("program path contains a NUL byte".into()))?;
    // SAFETY: the PyConfig API is used as CPython documents it: the struct is initialised by
    // PyConfig_InitPythonConfig before any field is read or written, strings are copied in by
    // PyConfig_SetBytesString, and PyConfig_Clear frees them after initialisation. This runs once, on the main
    // thread, before any other Python call.
    unsafe {
        let mut config = std::mem::MaybeUninit::<ffi::PyConfig>::uninit();
        ffi::PyConfig_InitPythonConfig(config.as_mut_ptr());
        let mut config = config.assume_init();
        // Signals belong to the server: Python must not turn SIGINT into KeyboardInterrupt in a request thread.
        config.install_signal_handlers = 0;
        config.parse_argv = 0;
        // print() from the app should reach the log at once, not when a buffer fills.
        config.buffered_stdio = 0;
        let name_ptr = std::ptr::addr_of_mut!(config.program_name);
        let status = ffi::PyConfig_SetBytesString(&mut config, name_ptr, program.as_ptr());
        if ffi::PyStatus_Exception(status) != 0 {
            ffi::PyConfig_Clear(&mut config);
            return Err(status_error(status));
        }
        let status = ffi::Py_InitializeFromConfig(&config);
        ffi::PyConfig_Clear(&mut config);
        if ffi::PyStatus_Exception(status) != 0 {
            return Err(status_error(status));
        }
        // Initialisation leaves this thread holding the GIL; release it so request threads can take it.
        ffi::PyEval_SaveThread();
    }
    Ok(())
}

fn status_error(status: ffi::PyStatus) -> AppError {
    let msg = if status.err_msg.is_null() {
        "unknown error".to_owned()
    } else {
        // SAFETY: a non-null err_msg of a PyStatus is a static NUL-terminated C string.
        unsafe { CStr::from_ptr(status.err_msg) }.to_string_lossy().into_owned()
    };
    AppError::Interpreter(msg)
}

/// A venv made by another Python version would load extension modules built for the wrong ABI.
fn check_venv_version(venv: &Path) -> Result<(), AppError> {
    let cfg = std::fs::read_to_string(venv.join("pyvenv.cfg")).unwrap_or_default();
    let version = cfg.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        matches!(key.trim(), "version" | "version_info").then(|| value.trim().to_owned())
    });
    if let Some(found) = version {
        let major_minor: Vec<&str> = found.split('.').take(2).collect();
        if major_minor.join(".") != BUILD_PYTHON_VERSION {
            return Err(AppError::VirtualenvVersion {
                venv: venv.display().to_string(),
                found,
                embedded: BUILD_PYTHON_VERSION.to_owned(),
            });
        }
    }
    Ok(())
}

/// `--pythonpath` entries first, then the working directory, as `python -m` would see it.
fn set_up_sys_path(py: Python<'_>, config: &Config) -> PyResult<()> {
    let path = py.import("sys")?.getattr("path")?.cast_into::<PyList>()?;
    let cwd = std::env::current_dir().map_err(PyErr::from)?;
    let mut front: Vec<String> = config
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
