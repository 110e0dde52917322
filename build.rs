//! Embeds where the interpreter lives: an rpath to libpython, and the interpreter's path and version.

fn main() {
    let config = pyo3_build_config::get();
    // The binary links the shared libpython it was built against; record its directory so it runs without
    // LD_LIBRARY_PATH (pyenv and other non-system Pythons live outside the loader's default paths).
    if let Some(lib_dir) = config.lib_dir() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    }
    let python = config.executable().unwrap_or("python3");
    let version = config.version();
    println!("cargo:rustc-env=FERRULE_PYTHON={python}");
    println!(
        "cargo:rustc-env=FERRULE_PYTHON_VERSION={}.{}",
        version.major, version.minor
    );
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
}
