//! Tier 3: real frameworks from PyPI (Flask, Django) in a test venv, served by the real `ferrule`
//! binary (`--virtualenv`) on a Unix socket behind a real nginx.
//!
//! The first run builds `target/test-venv` with pip (needs PyPI); later runs reuse it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::LOG_WAIT;
use crate::harness::ferrule::{Ferrule, FerruleBuilder, apps_dir};
use crate::harness::http::{Client, ReqBody, form_encode, multipart, pseudo_random_bytes, sha256_hex};
use crate::harness::nginx::Nginx;
use crate::harness::response::{BodyEnd, Response};
use crate::harness::server::Server;
use crate::harness::stack::Stack;
use crate::harness::venv::test_venv;

/// `uwsgi_buffering off` so streamed responses reach the client as they are produced, as a
/// deployment serving streams would configure it (with buffering on nginx may hold the pieces).
const STREAMING_CONF: &str = "uwsgi_buffering off;";

fn flask() -> Stack {
    let venv = test_venv();
    let app = apps_dir().join("flask_app.py");
    let builder = FerruleBuilder::new(&format!("{}:app", app.display()))
        .arg("--virtualenv")
        .arg(venv.to_str().expect("utf-8 venv path"))
        .unix();
    Stack::start(builder, STREAMING_CONF)
}

/// The test Django site (tests/apps/django_site) on a Unix socket.
fn django_ferrule(builder: impl FnOnce(FerruleBuilder) -> FerruleBuilder) -> Ferrule {
    let venv = test_venv();
    let site = apps_dir().join("django_site");
    let base = FerruleBuilder::new("mysite.wsgi:application")
        .arg("--virtualenv")
        .arg(venv.to_str().expect("utf-8 venv path"))
        .arg("--chdir")
        .arg(site.to_str().expect("utf-8 site path"))
        .env("DJANGO_SETTINGS_MODULE", "mysite.settings")
        .unix();
    builder(base).spawn()
}

fn django() -> Stack {
    let ferrule = django_ferrule(|b| b);
    let nginx = Nginx::start(&ferrule.addr.nginx_upstream(), STREAMING_CONF);
    Stack { nginx, ferrule }
}

fn assert_ok(stack: &Stack, r: &Response, what: &str) {
    assert!(
        r.status == 200 && r.is_complete(),
        "{what}: want a complete 200, got {}\n{}",
        r.summary(),
        stack.logs()
    );
}

/// Reads a streamed response and checks it really streamed: the first piece arrived well before
/// the last. The app sleeps `delay` between its `n` pieces, so the spread between the first and
/// the last piece is at least (n-1)*delay if nothing holds them back; a buffered response arrives
/// all at once. Slowness only widens the spread, so the check cannot fail on a slow machine.
fn assert_streams(stack: &Stack, path: &str, n: usize, delay: f64, expected_body: &str) {
    let mut client = stack.client();
    let s = client.stream("GET", path, &[], ReqBody::Empty);
    assert_eq!(s.status, 200, "{path}: status\n{}", stack.logs());
    assert!(
        s.header("content-length").is_none(),
        "{path}: a streamed body has no Content-Length: {:?}",
        s.headers
    );
    assert_eq!(
        s.header("transfer-encoding").map(str::to_ascii_lowercase).as_deref(),
        Some("chunked"),
        "{path}: nginx should stream it chunked: {:?}",
        s.headers
    );
    let (pieces, end) = s.collect_timed();
    assert_eq!(
        end,
        BodyEnd::Complete,
        "{path}: body did not end cleanly\n{}",
        stack.logs()
    );
    let body: Vec<u8> = pieces.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    assert_eq!(String::from_utf8_lossy(&body), expected_body, "{path}: body");
    let first = pieces.first().expect("at least one piece").0;
    let last = pieces.last().expect("at least one piece").0;
    let spread = last.duration_since(first);
    let want = Duration::from_secs_f64((n - 1) as f64 * delay * 0.5);
    assert!(
        spread >= want,
        "{path}: first piece arrived only {spread:?} before the last (want >= {want:?}): the response was buffered, not streamed"
    );
}

// ---------------------------------------------------------------- Flask

#[test]
fn flask_json_endpoint() {
    let stack = flask();
    let r = stack.client().get("/json?a=1&a=2&b=x%20y");
    assert_ok(&stack, &r, "GET /json");
    assert_eq!(r.header("content-type"), Some("application/json"), "{}", r.summary());
    let body = r.text();
    // Flask's JSON is compact with sorted keys, so substrings are stable.
    for want in [
        r#""args":{"a":["1","2"],"b":["x y"]}"#,
        r#""method":"GET""#,
        r#""ok":true"#,
        r#""remote_addr":"127.0.0.1""#,
        r#""scheme":"http""#,
    ] {
        assert!(body.contains(want), "GET /json: want {want} in {body}");
    }
}

#[test]
fn flask_form_post() {
    let stack = flask();
    let form = form_encode(&[
        ("name", "ferrule"),
        ("msg", "hello world & more"),
        ("multi", "1"),
        ("multi", "2"),
    ]);
    let r = stack.client().request(
        "POST",
        "/form",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        ReqBody::Fixed(form.as_bytes()),
    );
    assert_ok(&stack, &r, "POST /form");
    let body = r.text();
    for want in [
        r#""msg":["hello world & more"]"#,
        r#""multi":["1","2"]"#,
        r#""name":["ferrule"]"#,
        r#""content_type":"application/x-www-form-urlencoded""#,
    ] {
        assert!(body.contains(want), "POST /form: want {want} in {body}");
    }
}

#[test]
fn flask_file_upload() {
    let stack = flask();
    // Larger than ferrule's default body buffer (1 MiB), so the spooled-to-disk input is what
    // werkzeug's multipart parser reads.
    let data = pseudo_random_bytes(3 * 1024 * 1024 + 17, 11);
    let (ctype, body) = multipart(&[("note", "from the test")], &[("file", "blob.bin", &data)]);
    let r = stack
        .client()
        .request("POST", "/upload", &[("Content-Type", &ctype)], ReqBody::Fixed(&body));
    assert_ok(&stack, &r, "POST /upload");
    let text = r.text();
    for want in [
        r#""filename":"blob.bin""#.to_string(),
        r#""note":"from the test""#.to_string(),
        format!(r#""sha256":"{}""#, sha256_hex(&data)),
        format!(r#""size":{}"#, data.len()),
    ] {
        assert!(text.contains(&want), "POST /upload: want {want} in {text}");
    }
}

#[test]
fn flask_streamed_response() {
    let stack = flask();
    let expected: String = (0..4).map(|i| format!("part {i} of 4 for /stream\n")).collect();
    assert_streams(&stack, "/stream?n=4&delay=0.3", 4, 0.3, &expected);
}

#[test]
fn flask_not_found() {
    let stack = flask();
    let r = stack.client().get("/no/such/route");
    assert_eq!(r.status, 404, "{}\n{}", r.summary(), stack.logs());
    assert!(r.is_complete(), "{}", r.summary());
    assert!(r.text().contains("Not Found"), "{}", r.summary());
}

#[test]
fn flask_exception_is_500_with_traceback_in_log() {
    let stack = flask();
    let r = stack.client().get("/boom");
    assert_eq!(r.status, 500, "{}\n{}", r.summary(), stack.logs());
    assert!(r.is_complete(), "{}", r.summary());
    // Flask answers the 500 itself and logs the exception to wsgi.errors, which ferrule must
    // put in its log.
    assert!(r.text().contains("Internal Server Error"), "{}", r.summary());
    assert!(
        stack
            .ferrule
            .wait_for_log("ValueError: flask boom from the exception route", LOG_WAIT),
        "Flask's exception log (written to wsgi.errors) is not in ferrule's log:\n{}",
        stack.logs()
    );
    assert!(
        stack.ferrule.log().contains("Traceback (most recent call last)"),
        "{}",
        stack.logs()
    );
    let after = stack.client().get("/json");
    assert_ok(&stack, &after, "GET /json after the 500");
}

// ---------------------------------------------------------------- Django

/// The value of the hidden `csrfmiddlewaretoken` input in a page.
fn csrf_token_in(page: &str) -> String {
    let marker = r#"name="csrfmiddlewaretoken" value=""#;
    let start = page
        .find(marker)
        .unwrap_or_else(|| panic!("no csrfmiddlewaretoken input in page:\n{page}"))
        + marker.len();
    let len = page[start..].find('"').expect("closing quote of the token");
    page[start..start + len].to_string()
}

#[test]
fn django_csrf_form() {
    let stack = django();
    let mut client = stack.client();
    let page = client.get("/form/");
    assert_ok(&stack, &page, "GET /form/");
    assert!(
        client.cookies.contains_key("csrftoken"),
        "GET /form/ should set the csrftoken cookie: {}",
        page.summary()
    );
    let token = csrf_token_in(&page.text());
    let form_with = form_encode(&[("csrfmiddlewaretoken", &token), ("name", "ferrule")]);
    let form_without = form_encode(&[("name", "ferrule")]);
    let ctype = [("Content-Type", "application/x-www-form-urlencoded")];

    let ok = client.request("POST", "/form/", &ctype, ReqBody::Fixed(form_with.as_bytes()));
    assert_ok(&stack, &ok, "POST /form/ with cookie and token");
    assert_eq!(ok.text(), "thanks ferrule");

    // The cookie alone is not enough: the token must be in the form.
    let no_token = client.request("POST", "/form/", &ctype, ReqBody::Fixed(form_without.as_bytes()));
    assert_eq!(
        no_token.status,
        403,
        "POST /form/ without token: {}\n{}",
        no_token.summary(),
        stack.logs()
    );

    // Nor is the token without its cookie.
    let no_cookie = stack
        .client()
        .request("POST", "/form/", &ctype, ReqBody::Fixed(form_with.as_bytes()));
    assert_eq!(
        no_cookie.status,
        403,
        "POST /form/ without cookie: {}\n{}",
        no_cookie.summary(),
        stack.logs()
    );
}

#[test]
fn django_session_counter_via_signed_cookie() {
    let stack = django();
    let mut client = stack.client();
    for n in 1..=3 {
        let r = client.get("/counter/");
        assert_ok(&stack, &r, "GET /counter/");
        assert_eq!(r.text(), format!(r#"{{"count": {n}}}"#), "request {n}: {}", r.summary());
        assert!(
            client.cookies.contains_key("sessionid"),
            "no session cookie after request {n}: {}",
            r.summary()
        );
    }
    // A client without the cookie starts over.
    let fresh = stack.client().get("/counter/");
    assert_ok(&stack, &fresh, "GET /counter/ (fresh client)");
    assert_eq!(fresh.text(), r#"{"count": 1}"#);
}

#[test]
fn django_multipart_upload() {
    let stack = django();
    // Above both FILE_UPLOAD_MAX_MEMORY_SIZE and ferrule's body buffer: Django writes it to a
    // temp file from ferrule's spooled input.
    let data = pseudo_random_bytes(3 * 1024 * 1024 + 5, 23);
    let (ctype, body) = multipart(&[("note", "django note")], &[("file", "upload.bin", &data)]);
    let r = stack
        .client()
        .request("POST", "/upload/", &[("Content-Type", &ctype)], ReqBody::Fixed(&body));
    assert_ok(&stack, &r, "POST /upload/");
    let text = r.text();
    for want in [
        r#""name": "upload.bin""#.to_string(),
        format!(r#""size": {}"#, data.len()),
        format!(r#""sha256": "{}""#, sha256_hex(&data)),
        r#""note": "django note""#.to_string(),
    ] {
        assert!(text.contains(&want), "POST /upload/: want {want} in {text}");
    }
}

#[test]
fn django_streaming_http_response() {
    let stack = django();
    let expected: String = (0..4).map(|i| format!("django line {i}\n")).collect();
    assert_streams(&stack, "/stream/?n=4&delay=0.3", 4, 0.3, &expected);
}

/// The `location /static/ { ... }` block of the shipped nginx/ferrule.conf, with its `alias` pointed at
/// `static_root`, so the test serves static files exactly as the shipped config does.
fn shipped_static_location(static_root: &Path) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("nginx/ferrule.conf");
    let conf = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let start = conf
        .find("location /static/ {")
        .unwrap_or_else(|| panic!("{} has no `location /static/ {{` block", path.display()));
    let end = start + conf[start..].find('}').expect("the static location block is closed");
    let block = &conf[start..=end];
    assert!(
        block.contains("alias "),
        "the shipped static location has no alias:\n{block}"
    );
    block
        .lines()
        .map(|line| match line.trim_start().starts_with("alias ") {
            true => format!("        alias {}/;", static_root.display()),
            false => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Django's admin comes up styled behind nginx: `manage.py collectstatic` fills STATIC_ROOT, the
/// `location /static/` block shipped in nginx/ferrule.conf serves it, and the app's pages still reach ferrule.
#[test]
fn django_admin_css_is_served_by_the_shipped_static_location() {
    let venv = test_venv();
    let site = apps_dir().join("django_site");
    let static_root = tempfile::Builder::new()
        .prefix("ferrule-static-")
        .tempdir_in("/tmp")
        .expect("create STATIC_ROOT");
    let out = Command::new(venv.join("bin/python"))
        .args(["manage.py", "collectstatic", "--noinput"])
        .current_dir(&site)
        .env("DJANGO_SETTINGS_MODULE", "mysite.settings_static")
        .env("STATIC_ROOT", static_root.path())
        .output()
        .expect("run manage.py collectstatic");
    assert!(
        out.status.success(),
        "collectstatic failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let css = std::fs::read(static_root.path().join("admin/css/base.css")).expect("collectstatic wrote the admin CSS");

    let ferrule = django_ferrule(|b| b.arg("--access-log"));
    let location = shipped_static_location(static_root.path());
    let nginx = Nginx::start_with_server_conf(&ferrule.addr.nginx_upstream(), "", &location);
    let stack = Stack { nginx, ferrule };

    let r = stack.client().get("/static/admin/css/base.css");
    assert_ok(&stack, &r, "GET /static/admin/css/base.css");
    assert_eq!(r.body, css, "nginx served other bytes than the collected file");
    assert!(
        r.header("content-type").is_some_and(|t| t.starts_with("text/css")),
        "the admin CSS must come as text/css or browsers ignore it: {}",
        r.summary()
    );
    assert!(
        r.header("cache-control").is_some_and(|c| c.contains("max-age")),
        "the shipped block sets a cache lifetime: {}",
        r.summary()
    );
    assert_eq!(stack.client().get("/static/admin/css/no-such.css").status, 404);
    // The static files never reach ferrule; the app's own pages still do.
    assert_ok(&stack, &stack.client().get("/form/"), "GET /form/ through ferrule");
    assert!(
        stack.ferrule.wait_for_log("/form/", LOG_WAIT),
        "the access log shows no /form/:\n{}",
        stack.ferrule.log()
    );
    assert!(
        !stack.ferrule.log().contains("/static/"),
        "a static file request reached ferrule:\n{}",
        stack.ferrule.log()
    );
}

// ---------------------------------------------------------------------------------------------------------
// Django behind nginx on a non-default port
// ---------------------------------------------------------------------------------------------------------

/// Django's CSRF check compares Origin with `request.get_host()`, which must carry the port on a non-default
/// port: with the host:port param, a POST with its token succeeds (today Django gets "localhost,
/// localhost:PORT", refuses it as an invalid host and answers 400).
#[test]
fn django_csrf_post_succeeds_on_a_non_default_port() {
    let venv = test_venv();
    let site = apps_dir().join("django_site");
    let server = Server::spawn(
        FerruleBuilder::new("mysite.wsgi:application")
            .arg("--virtualenv")
            .arg(venv.to_str().expect("utf-8 venv path"))
            .arg("--chdir")
            .arg(site.to_str().expect("utf-8 site path"))
            .env("DJANGO_SETTINGS_MODULE", "mysite.settings"),
    );
    let nginx = Nginx::start(
        &server.addr.nginx_upstream(),
        "uwsgi_param HTTP_HOST $host:$server_port;",
    );
    let mut client = Client::new(nginx.port());
    let page = client.get("/form/");
    assert_eq!(
        page.status,
        200,
        "GET /form/: {}\n--- log ---\n{}",
        page.summary(),
        server.log()
    );
    let marker = r#"name="csrfmiddlewaretoken" value=""#;
    let text = page.text();
    let start = text.find(marker).unwrap_or_else(|| panic!("no token in {text}")) + marker.len();
    let token = &text[start..start + text[start..].find('"').expect("closing quote")];
    let origin = format!("http://localhost:{}", nginx.port());
    let form = form_encode(&[("csrfmiddlewaretoken", token), ("name", "ferrule")]);
    let r = client.request(
        "POST",
        "/form/",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Origin", &origin),
        ],
        ReqBody::Fixed(form.as_bytes()),
    );
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "thanks ferrule"),
        "POST /form/ with token and Origin {origin}: {}\n--- log ---\n{}",
        r.summary(),
        server.log()
    );
}
