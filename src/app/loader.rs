//! Finding the WSGI callable named by APP: `pkg.module:callable`, `module`, `path/to/file.py[:callable]` and
//! factories `module:create_app()`.

use std::path::{Path, PathBuf};

use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use super::app_error::AppError;
use super::errors::format_exception;

/// Where the callable lives and how to get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AppSpec {
    pub(crate) source: Source,
    /// Attribute path (`app`, `handlers.wsgi`); `None` tries `application`, then `app`.
    pub(crate) attr: Option<String>,
    /// For a factory, the text between its parentheses (Python literals, possibly empty).
    pub(crate) call_args: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    Module(String),
    File(PathBuf),
}

impl AppSpec {
    pub(crate) fn parse(spec: &str) -> Result<AppSpec, AppError> {
        let bad = || AppError::BadSpec(spec.to_owned());
        let (target, attr) = match spec.rsplit_once(':') {
            // A colon inside a factory's arguments is not the separator.
            Some((t, a)) if !t.contains('(') => (t, Some(a)),
            _ => (spec, None),
        };
        if target.is_empty() {
            return Err(bad());
        }
        let source = if target.ends_with(".py") {
            Source::File(PathBuf::from(target))
        } else if target.split('.').all(is_identifier) {
            Source::Module(target.to_owned())
        } else {
            return Err(bad());
        };
        let (attr, call_args) = match attr {
            None => (None, None),
            Some(a) => match a.split_once('(') {
                Some((name, rest)) => {
                    let args = rest.strip_suffix(')').ok_or_else(bad)?;
                    (Some(name.to_owned()), Some(args.to_owned()))
                }
                None => (Some(a.to_owned()), None),
            },
        };
        if let Some(a) = &attr {
            if !a.split('.').all(is_identifier) {
                return Err(bad());
            }
        }
        Ok(AppSpec {
            source,
            attr,
            call_args,
        })
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_') && chars.all(|c| c.is_alphanumeric() || c == '_')
}

/// Imports the module and returns the callable.
pub(crate) fn load(py: Python<'_>, spec: &AppSpec) -> Result<Py<PyAny>, AppError> {
    let (module, module_name) = match &spec.source {
        Source::Module(name) => {
            let module = py.import(name.as_str()).map_err(|e| import_error(py, name, e))?;
            (module.into_any(), name.clone())
        }
        Source::File(path) => {
            let module = import_file(py, path)?;
            (module, path.display().to_string())
        }
    };
    let (name, obj) = match &spec.attr {
        Some(attr) => {
            let mut obj = module.clone();
            for part in attr.split('.') {
                obj = obj.getattr(part).map_err(|_| AppError::NoCallable {
                    module: module_name.clone(),
                    tried: format!("attribute {attr:?}"),
                })?;
            }
            (attr.clone(), obj)
        }
        None => ["application", "app"]
            .iter()
            .find_map(|n| module.getattr(*n).ok().map(|o| ((*n).to_owned(), o)))
            .ok_or_else(|| AppError::NoCallable {
                module: module_name.clone(),
                tried: "callable named 'application' or 'app'".into(),
            })?,
    };
    let obj = match &spec.call_args {
        Some(args) => call_factory(py, &name, &obj, args)?,
        None => obj,
    };
    if !obj.is_callable() {
        let kind = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        return Err(AppError::NotCallable {
            module: module_name,
            name,
            kind,
        });
    }
    Ok(obj.unbind())
}

/// Loads `path/to/file.py` as a module named after the file, with its directory on sys.path so its sibling
/// modules import.
fn import_file<'py>(py: Python<'py>, path: &Path) -> Result<Bound<'py, PyAny>, AppError> {
    let target = path.display().to_string();
    let fail = |error: String| AppError::Import {
        target: target.clone(),
        error,
        files: Vec::new(),
    };
    let path = path.canonicalize().map_err(|e| fail(e.to_string()))?;
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| is_identifier(s))
        .ok_or_else(|| fail("the file name is not a valid module name".into()))?
        .to_owned();
    let dir = path.parent().map(|d| d.display().to_string()).unwrap_or_default();
    let run = || -> PyResult<Bound<'py, PyAny>> {
        let sys = py.import("sys")?;
        sys.getattr("path")?.cast_into::<PyList>()?.insert(0, &dir)?;
        let util = py.import("importlib.util")?;
        let spec = util.call_method1("spec_from_file_location", (&name, path.display().to_string()))?;
        let module = util.call_method1("module_from_spec", (&spec,))?;
        sys.getattr("modules")?.set_item(&name, &module)?;
        spec.getattr("loader")?.call_method1("exec_module", (&module,))?;
        Ok(module)
    };
    run().map_err(|e| import_error(py, &target, e))
}

fn call_factory<'py>(
    py: Python<'py>,
    name: &str,
    factory: &Bound<'py, PyAny>,
    args: &str,
) -> Result<Bound<'py, PyAny>, AppError> {
    let fail = |e: PyErr| {
        tracing::error!(traceback = %format_exception(py, &e), "app factory failed");
        AppError::Factory {
            name: name.to_owned(),
            error: e.to_string(),
        }
    };
    let args = if args.trim().is_empty() {
        PyTuple::empty(py)
    } else {
        // Only literals: the factory's arguments come from the command line, never code to run.
        py.import("ast")
            .and_then(|ast| ast.call_method1("literal_eval", (format!("({args},)"),)))
            .and_then(|t| t.cast_into::<PyTuple>().map_err(PyErr::from))
            .map_err(fail)?
    };
    factory.call1(args).map_err(fail)
}

fn import_error(py: Python<'_>, target: &str, e: PyErr) -> AppError {
    tracing::error!(traceback = %format_exception(py, &e), "cannot import the app");
    AppError::Import {
        target: target.to_owned(),
        error: e.to_string(),
        files: super::watched::files_of_error(py, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_forms() {
        let s = AppSpec::parse("pkg.mod:app").unwrap();
        assert_eq!(s.source, Source::Module("pkg.mod".into()));
        assert_eq!(s.attr.as_deref(), Some("app"));
        assert_eq!(AppSpec::parse("mod").unwrap().attr, None);
        let f = AppSpec::parse("dir/app.py:wsgi").unwrap();
        assert_eq!(f.source, Source::File("dir/app.py".into()));
        let factory = AppSpec::parse("mod:create_app('x', 3)").unwrap();
        assert_eq!(factory.attr.as_deref(), Some("create_app"));
        assert_eq!(factory.call_args.as_deref(), Some("'x', 3"));
        assert_eq!(AppSpec::parse("mod:make()").unwrap().call_args.as_deref(), Some(""));
        for bad in ["", ":app", "mod:", "mod:bad-name", "has space:app", "mod:f(x"] {
            assert!(AppSpec::parse(bad).is_err(), "{bad:?}");
        }
    }
}
