//! Test and benchmark executables link libpython (the extension module maturin builds does not): record the
//! library's directory for them, since pyenv and other non-system Pythons live outside the loader's paths.

fn main() {
    println!("cargo:rerun-if-env-changed=PYO3_BUILD_EXTENSION_MODULE");
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    // maturin sets this when it builds the extension module, which must carry no path into the builder's
    // machine.
    if std::env::var_os("PYO3_BUILD_EXTENSION_MODULE").is_some() {
        return;
    }
    if let Some(lib_dir) = pyo3_build_config::get().lib_dir() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    }
}
