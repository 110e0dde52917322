//! Why the app could not be started: preparing the interpreter, finding and importing the callable.

/// Why the app could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppError {
    #[error("cannot prepare Python for the app: {0}")]
    Interpreter(String),
    #[error(
        "virtualenv {venv} was made with Python {found}, but ferrule runs on Python {running} ({executable}): \
         install ferrule into that venv (pip install ferrule) and run its bin/ferrule, or make the venv with \
         Python {running}"
    )]
    VirtualenvVersion {
        venv: String,
        found: String,
        running: String,
        executable: String,
    },
    #[error("invalid APP {0:?}: expected module:callable, module, path/to/file.py[:callable] or module:factory()")]
    BadSpec(String),
    #[error("cannot import the app from {target}: {error}")]
    Import {
        target: String,
        error: String,
        /// The app's own files its traceback went through (a syntax error's file too), for `--reload` to watch.
        files: Vec<std::path::PathBuf>,
    },
    #[error("module {module:?} has no {tried} (name the callable: {module}:NAME)")]
    NoCallable { module: String, tried: String },
    #[error("{name} in {module:?} is not callable (it is a {kind})")]
    NotCallable { module: String, name: String, kind: String },
    #[error("the app factory {name} failed: {error}")]
    Factory { name: String, error: String },
}
