//! `--reload` and `--touch-reload`: an edit to the app's own code, a syntax error, an app that does not import
//! at start-up, a touched file (also one whose directory appears later, replaced by a symlink swap, and
//! watched by polling), and a burst of writes. Each test talks raw uwsgi to its own ferrule, whose app lives
//! in the test's temp dir.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::ferrule::FerruleBuilder;
use crate::harness::log::count;
use crate::harness::procs::poll_until;
use crate::harness::server::Server;
use crate::harness::{EXIT_TIMEOUT, LOG_WAIT, WORKER_TIMEOUT};

/// How long a test waits to be sure that no second reload follows the one it expected: longer than the
/// watcher's quiet period and a polled look together.
const NO_SECOND_RELOAD: Duration = Duration::from_secs(3);

const RELOADING: &str = "file change: reloading";
const WATCHING: &str = "watching files for changes";

/// The app: `devapp.py` answers with `devhelper.VERSION` (a module it imports) and its pid.
struct DevApp {
    dir: PathBuf,
}

impl DevApp {
    fn new(builder: &FerruleBuilder, version: &str) -> DevApp {
        let dir = builder.tempdir().join("code");
        std::fs::create_dir(&dir).expect("create the app's dir");
        std::fs::write(
            dir.join("devapp.py"),
            "import os\nimport devhelper\n\n\
             def application(environ, start_response):\n\
             \x20   body = ('%s %d' % (devhelper.VERSION, os.getpid())).encode()\n\
             \x20   start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n\
             \x20   return [body]\n",
        )
        .expect("write devapp.py");
        let app = DevApp { dir };
        app.set_version(version);
        app
    }

    fn helper(&self) -> PathBuf {
        self.dir.join("devhelper.py")
    }

    fn set_version(&self, version: &str) {
        write_atomically(&self.helper(), &format!("VERSION = {version:?}\n"));
    }
}

/// Writes a file the way editors save: a temporary file renamed over it.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-save");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename onto {}: {e}", path.display()));
}

fn dev_server(workers: usize, extra: &[&str], version: &str) -> (Server, DevApp) {
    let builder = FerruleBuilder::new("devapp:application");
    let app = DevApp::new(&builder, version);
    let builder = builder
        .arg("--pythonpath")
        .arg(&app.dir)
        .arg("--workers")
        .arg(workers.to_string())
        .arg("--reload")
        .args(extra.iter().copied());
    (Server::start(builder, workers), app)
}

/// The version the app answers with, and the pid that answered.
fn version(server: &Server) -> (String, u32) {
    let r = server.get("/");
    assert_eq!(r.status, 200, "{}\n--- log ---\n{}", r.summary(), server.log());
    let text = r.text();
    let (version, pid) = text.split_once(' ').expect("VERSION PID");
    (version.to_owned(), pid.parse().expect("a pid"))
}

/// Waits until the watcher has the app's files: the workers report them as they start, and an edit before the
/// watcher has them is not seen.
fn wait_watching(server: &Server) {
    assert!(
        server.wait_for_log(WATCHING, LOG_WAIT),
        "no {WATCHING:?} line\n{}",
        server.log()
    );
}

/// Asks until the app answers with `wanted`; returns how long that took.
fn until_version(server: &Server, wanted: &str, bound: Duration) -> Duration {
    let started = Instant::now();
    // Until then, an app that did not import answers 503.
    let served = poll_until(bound, || {
        let r = server.get("/");
        r.status == 200 && r.text().split(' ').next() == Some(wanted)
    });
    assert!(
        served,
        "still not {wanted:?} after {bound:?}\n--- log ---\n{}",
        server.log()
    );
    started.elapsed()
}

/// An edit to a module the app imports (not the app module itself) is served by the next request within 2 s,
/// without a signal; `--reload` warns at start-up that it is for development.
fn an_edit_is_served_within_two_seconds(extra: &[&str]) {
    let (server, app) = dev_server(2, extra, "one");
    assert!(server.log().contains("--reload is for development"), "{}", server.log());
    assert_eq!(version(&server).0, "one");
    wait_watching(&server);
    let offset = server.log_offset();
    app.set_version("two");
    let took = until_version(&server, "two", WORKER_TIMEOUT);
    assert!(
        took <= Duration::from_secs(2),
        "the new code was served {took:?} after the edit\n{}",
        server.log_since(offset)
    );
    let log = server.log_since(offset);
    assert_eq!(count(&log, "a watched file changed"), 1, "{log}");
    assert!(log.contains("devhelper.py"), "the changed file is not named\n{log}");
}

#[test]
fn an_edit_is_served_by_the_next_request_within_two_seconds() {
    an_edit_is_served_within_two_seconds(&[]);
}

#[test]
fn an_edit_is_served_within_two_seconds_under_preload() {
    an_edit_is_served_within_two_seconds(&["--preload"]);
}

/// A syntax error: one error with the traceback naming the file and line, the old worker keeps serving the old
/// code; the fix is then served.
fn a_syntax_error_keeps_the_old_code(extra: &[&str]) {
    let (server, app) = dev_server(1, extra, "one");
    wait_watching(&server);
    let (_, old_pid) = version(&server);
    let offset = server.log_offset();
    std::fs::write(app.helper(), "VERSION = (\n").expect("break devhelper.py");
    assert!(
        server.wait_for_log_since(offset, "reload failed", WORKER_TIMEOUT),
        "no `reload failed` after a syntax error\n{}",
        server.log_since(offset)
    );
    for _ in 0..10 {
        assert_eq!(
            version(&server),
            ("one".to_owned(), old_pid),
            "not the old worker's answer"
        );
    }
    let log = server.log_since(offset);
    assert_eq!(count(&log, "Traceback (most recent call last)"), 1, "{log}");
    // The traceback, and the worker's one-line summary of it.
    assert_eq!(count(&log, "SyntaxError: '(' was never closed"), 2, "{log}");
    assert_eq!(count(&log, "reload failed"), 1, "{log}");
    assert!(
        log.contains("devhelper.py\", line 1"),
        "the traceback does not name the file\n{log}"
    );

    let offset = server.log_offset();
    app.set_version("fixed");
    until_version(&server, "fixed", WORKER_TIMEOUT);
    assert!(
        poll_until(WORKER_TIMEOUT, || server.log_since(offset).contains("worker exited")),
        "the old worker did not leave\n{}",
        server.log_since(offset)
    );
}

#[test]
fn a_syntax_error_keeps_the_old_code_serving_and_logs_one_traceback() {
    a_syntax_error_keeps_the_old_code(&[]);
}

/// Under `--preload` the new zygote is the one that fails, and the one traceback is its.
#[test]
fn a_syntax_error_under_preload_keeps_the_old_code_serving() {
    a_syntax_error_keeps_the_old_code(&["--preload"]);
}

/// An app that does not import at start-up: ferrule starts all the same, answers 503 saying why, and serves the
/// app once an edit makes it import.
fn a_broken_start_is_fixed_by_an_edit(extra: &[&str]) {
    let builder = FerruleBuilder::new("devapp:application");
    let app = DevApp::new(&builder, "one");
    std::fs::write(app.helper(), "raise RuntimeError('not yet')\n").expect("break devhelper.py");
    let builder = builder
        .arg("--pythonpath")
        .arg(&app.dir)
        .arg("--workers")
        .arg("2")
        .arg("--reload")
        .args(extra.iter().copied());
    let server = Server::start(builder, 2);
    wait_watching(&server);
    let r = server.get("/");
    assert_eq!(r.status, 503, "{}\n{}", r.summary(), server.log());
    assert!(r.text().contains("could not be imported"), "{}", r.summary());
    assert!(server.log().contains("RuntimeError: not yet"), "{}", server.log());
    assert!(!server.log().contains("worker died"), "{}", server.log());

    app.set_version("working");
    until_version(&server, "working", WORKER_TIMEOUT);
}

#[test]
fn an_app_that_does_not_import_at_start_answers_503_until_an_edit_fixes_it() {
    a_broken_start_is_fixed_by_an_edit(&[]);
}

#[test]
fn an_app_that_does_not_import_at_start_under_preload_answers_503_until_fixed() {
    a_broken_start_is_fixed_by_an_edit(&["--preload"]);
}

/// A module the app imports that is not written yet: ferrule serves once it is.
#[test]
fn a_missing_module_is_served_once_it_is_written() {
    let builder = FerruleBuilder::new("devapp:application");
    let app = DevApp::new(&builder, "one");
    std::fs::write(app.helper(), "from devextra import VERSION\n").expect("write devhelper.py");
    let builder = builder
        .arg("--pythonpath")
        .arg(&app.dir)
        .arg("--workers")
        .arg("1")
        .arg("--reload");
    let server = Server::start(builder, 1);
    wait_watching(&server);
    assert_eq!(server.get("/").status, 503, "{}", server.log());
    assert!(server.log().contains("No module named 'devextra'"), "{}", server.log());
    std::fs::write(app.dir.join("devextra.py"), "VERSION = 'written'\n").expect("write devextra.py");
    until_version(&server, "written", WORKER_TIMEOUT);
}

/// 50 writes in a row to an imported file: one reload.
#[test]
fn a_burst_of_fifty_writes_is_one_reload() {
    let (server, app) = dev_server(1, &[], "one");
    wait_watching(&server);
    let offset = server.log_offset();
    for n in 0..50 {
        std::fs::write(app.helper(), format!("VERSION = 'burst'\n# write {n}\n")).expect("write");
    }
    until_version(&server, "burst", WORKER_TIMEOUT);
    let seen = server.wait_for_count_since(offset, RELOADING, 2, NO_SECOND_RELOAD);
    assert_eq!(seen, 1, "{}", server.log_since(offset));
}

/// `--touch-reload` with neither the file nor its directory there at start: the file's creation, a touch and
/// a symlink swap are one reload each; without `--reload`, and with `--reload-poll` too.
fn touches_reload_once_each(extra: &[&str]) {
    let builder = FerruleBuilder::new("devapp:application");
    let app = DevApp::new(&builder, "one");
    let deploy = builder.tempdir().join("deploy");
    let touch = deploy.join("reload.touch");
    let builder = builder
        .arg("--pythonpath")
        .arg(&app.dir)
        .arg("--workers")
        .arg("1")
        .arg("--touch-reload")
        .arg(&touch)
        .args(extra.iter().copied());
    let server = Server::start(builder, 1);
    wait_watching(&server);
    let reloads = |offset: usize| server.wait_for_count_since(offset, RELOADING, 2, NO_SECOND_RELOAD);

    let offset = server.log_offset();
    std::fs::create_dir(&deploy).expect("create the directory");
    std::fs::write(&touch, "").expect("create the touch file");
    assert!(
        server.wait_for_log_since(offset, RELOADING, LOG_WAIT),
        "{}",
        server.log_since(offset)
    );
    assert_eq!(reloads(offset), 1, "{}", server.log_since(offset));

    // A touch: only the modification time changes.
    let offset = server.log_offset();
    let later = std::fs::metadata(&touch).unwrap().modified().unwrap() + Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(&touch)
        .and_then(|f| f.set_modified(later))
        .expect("touch");
    assert!(
        server.wait_for_log_since(offset, RELOADING, LOG_WAIT),
        "{}",
        server.log_since(offset)
    );
    assert_eq!(reloads(offset), 1, "{}", server.log_since(offset));

    // A deploy tool's symlink swap onto another release's file.
    let offset = server.log_offset();
    let release = deploy.join("release-2.touch");
    std::fs::write(&release, "").expect("write the release's file");
    std::os::unix::fs::symlink(&release, deploy.join("swap")).expect("symlink");
    std::fs::rename(deploy.join("swap"), &touch).expect("swap");
    assert!(
        server.wait_for_log_since(offset, RELOADING, LOG_WAIT),
        "{}",
        server.log_since(offset)
    );
    assert_eq!(reloads(offset), 1, "{}", server.log_since(offset));
    server.wait_for_count_since(offset, "worker exited", 1, WORKER_TIMEOUT);

    // Not under --reload: an edit to the app is not watched.
    let offset = server.log_offset();
    app.set_version("two");
    assert_eq!(reloads(offset), 0, "{}", server.log_since(offset));
    assert!(
        !server.log().contains("--reload is for development"),
        "{}",
        server.log()
    );
}

#[test]
fn a_touch_reloads_once_even_when_the_file_and_its_directory_come_later() {
    touches_reload_once_each(&[]);
}

#[test]
fn a_touch_reloads_once_when_watched_by_polling() {
    touches_reload_once_each(&["--reload-poll"]);
}

/// The config file is watched under --reload: a changed value is applied by the reload.
#[test]
fn an_edit_to_the_config_file_reloads_with_its_new_value() {
    let builder = FerruleBuilder::new("devapp:application");
    let app = DevApp::new(&builder, "one");
    let file = builder.tempdir().join("ferrule.toml");
    std::fs::write(&file, "workers = 1\n").expect("write the config");
    let builder = builder
        .arg("--pythonpath")
        .arg(&app.dir)
        .arg("--reload")
        .arg("--config")
        .arg(&file);
    let server = Server::start(builder, 1);
    wait_watching(&server);
    let offset = server.log_offset();
    write_atomically(&file, "workers = 2\n");
    assert!(
        server.wait_for_log_since(offset, "file change: reloading generation=1 workers=2", LOG_WAIT),
        "{}",
        server.log_since(offset)
    );
}

/// The options as `--check-config` prints them, and the combinations refused with one line.
#[test]
fn the_options_are_printed_and_bad_combinations_refused() {
    let builder = FerruleBuilder::new("devapp:application");
    let app = DevApp::new(&builder, "one");
    let out = builder
        .arg("--pythonpath")
        .arg(&app.dir)
        .arg("--check-config")
        .args(["--reload", "--reload-extra-file", "/srv/t.html", "--reload-poll"])
        .env("FERRULE_TOUCH_RELOAD", "/srv/deploy/touch")
        .run(EXIT_TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    for line in [
        "reload = true",
        "reload_extra_file = [\"/srv/t.html\"]",
        "reload_poll = true",
        "touch_reload = [\"/srv/deploy/touch\"]",
    ] {
        assert!(out.stdout.contains(line), "no {line:?}\n{}", out.describe());
    }
    for (args, says) in [
        (
            &["--reload-extra-file", "t.html"][..],
            "--reload-extra-file is for --reload",
        ),
        (&["--reload-poll"][..], "--reload-poll changes how"),
    ] {
        let out = FerruleBuilder::new("devapp:application")
            .args(args.iter().copied())
            .run(EXIT_TIMEOUT);
        assert_eq!(out.status.code(), Some(1), "{}", out.describe());
        assert!(out.stderr.contains(says), "{}", out.describe());
    }
}
