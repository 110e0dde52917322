//! Tier 3, several machines: three ferrule hosts, each in a network namespace of its own (its own address,
//! traffic only with the test's namespace), behind one nginx configured by the repository's recipe,
//! nginx/upstream.conf (its upstream group's settings and its `location /` directives, read from the file), under
//! 6 clients sending GETs and 6 POSTing 1 KiB. One test, three scenarios on the same hosts:
//!
//! 1. a host SIGKILLed, master and workers: only requests in flight on it may fail, and only POSTs (nginx retries
//!    a GET on another server, but not a POST it has already sent);
//! 2. a rolling restart, host by host (SIGTERM, wait for the exit, start again, wait until it is ready and back
//!    in nginx's rotation, next): no request may fail. A stopping ferrule must not leave connections queued on a
//!    socket nobody will accept on, or the kernel resets them when the socket closes;
//! 3. the rolling restart again over `tls://`, with nginx's client certificate.
//!
//! The test prints each scenario's requests, failures and drain times (SIGTERM to exit).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::ferrule::{Ferrule, FerruleBuilder, apps_dir};
use crate::harness::http::{Client, ReqBody, pseudo_random_bytes};
use crate::harness::netns::{Host, Hosts};
use crate::harness::nginx::{Group, Nginx};
use crate::harness::procs::{alive, live_children, poll_until};
use crate::harness::tls::Pki;

const HOSTS: usize = 3;
const GET_CLIENTS: usize = 6;
const POST_CLIENTS: usize = 6;
const POST_BODY: usize = 1024;
/// Each host's port. A fixed port is safe here: each host has a network namespace of its own.
const PORT: u16 = 3031;
/// The GET route: the app sleeps this long, so requests are in flight when a host stops.
const GET_PATH: &str = "/sleep?s=0.005";
/// The POST route: the app reads the body and sends it back, which the client checks.
const POST_PATH: &str = "/echo";
/// Requests every host must have answered before a scenario acts: proof that nginx balances over all.
const WARM_UP_EACH: usize = 20;
/// Requests after the SIGKILL, so that nginx has had to route around the dead host for a while.
const AFTER_KILL: usize = 500;
/// Bounds of the waits: a phase of traffic, a stop (a drain of 5 ms requests is far shorter), and a restarted
/// host back in nginx's rotation (the recipe's fail_timeout, 5 s, and a margin).
const PHASE: Duration = Duration::from_secs(30);
const STOP: Duration = Duration::from_secs(30);
const BACK_IN_ROTATION: Duration = Duration::from_secs(20);

/// One finished request as its client saw it.
struct Outcome {
    post: bool,
    /// nginx's `$upstream_addr`: one address, or several separated by ", " when nginx tried more than one.
    upstream: String,
    ok: bool,
    summary: String,
    started: Instant,
    ended: Instant,
}

/// What a scenario reports.
struct Tally {
    requests: usize,
    gets: usize,
    posts: usize,
    failed_gets: usize,
    failed_posts: usize,
    retried: usize,
}

#[test]
fn a_rolling_restart_of_three_hosts_loses_no_request() {
    let net = Hosts::new(HOSTS);
    let recipe = Recipe::read();
    let pki = Pki::new();

    let clock = Instant::now();
    let mut hosts = start_hosts(&net, None);
    eprintln!("[{:.1} s] {HOSTS} hosts ready", clock.elapsed().as_secs_f64());
    let addrs: Vec<String> = net.hosts.iter().map(upstream_addr).collect();
    let mut report = Vec::new();

    // 1. SIGKILL.
    let nginx = recipe.nginx(&addrs, None);
    let load = Load::start(nginx.port());
    load.wait_served_by_all(&addrs, WARM_UP_EACH, &nginx);
    let (killed_at, dead_at) = sigkill(&mut hosts[0]);
    let enough = poll_until(PHASE, || load.count_started_after(dead_at) >= AFTER_KILL);
    let outcomes = load.stop();
    let tally = tally(&outcomes);
    // In flight on the victim: passed to it, sent before it was dead and not answered before the SIGKILL.
    let in_flight_posts = outcomes
        .iter()
        .filter(|o| o.post && o.upstream.contains(&addrs[0]) && o.started < dead_at && o.ended > killed_at)
        .count();
    let stray: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !o.ok && (!o.post || o.started > dead_at || !o.upstream.contains(&addrs[0])))
        .collect();
    let line = format!(
        "SIGKILL of {}: {} requests ({} GET, {} POST), {} failed GETs, {} failed POSTs of {in_flight_posts} POSTs in \
         flight at the kill, {} retried by nginx on another server",
        addrs[0], tally.requests, tally.gets, tally.posts, tally.failed_gets, tally.failed_posts, tally.retried
    );
    eprintln!("{line}");
    report.push(line);
    assert!(enough, "too few requests after the SIGKILL\n{}", report.join("\n"));
    assert!(
        stray.is_empty(),
        "failures other than POSTs in flight on the killed host:\n{}\n{}\n{}",
        summaries(&stray),
        report.join("\n"),
        error_log_tail(&nginx)
    );
    assert!(tally.failed_posts <= in_flight_posts, "{}", report.join("\n"));
    hosts[0] = start_host(&net.hosts[0], None);
    eprintln!(
        "[{:.1} s] the killed host is ready again",
        clock.elapsed().as_secs_f64()
    );

    // 2. A rolling restart over TCP.
    let line = rolling_restart("rolling restart, tcp", &net, &mut hosts, &addrs, &nginx, None, clock);
    report.push(line);
    drop(nginx);

    // 3. The same over tls://, nginx presenting its client certificate.
    for host in &mut hosts {
        stop_gracefully(host);
    }
    hosts = start_hosts(&net, Some(&pki));
    eprintln!("[{:.1} s] {HOSTS} hosts ready on tls://", clock.elapsed().as_secs_f64());
    let nginx = recipe.nginx(&addrs, Some(&pki));
    let line = rolling_restart(
        "rolling restart, tls",
        &net,
        &mut hosts,
        &addrs,
        &nginx,
        Some(&pki),
        clock,
    );
    report.push(line);
    eprintln!(
        "--- summary ({:.1} s) ---\n{}",
        clock.elapsed().as_secs_f64(),
        report.join("\n")
    );
}

/// Restarts every host in turn under load; asserts that no request failed; returns the scenario's line.
fn rolling_restart(
    what: &str,
    net: &Hosts,
    hosts: &mut [Ferrule],
    addrs: &[String],
    nginx: &Nginx,
    pki: Option<&Pki>,
    clock: Instant,
) -> String {
    let load = Load::start(nginx.port());
    load.wait_served_by_all(addrs, WARM_UP_EACH, nginx);
    let mut drains = Vec::new();
    let mut taken = 0;
    for (i, host) in hosts.iter_mut().enumerate() {
        let started = Instant::now();
        let (drain, log) = stop_gracefully(host);
        taken += log
            .lines()
            .filter_map(|l| l.split("taken_from_queue=").nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse::<usize>().ok())
            .sum::<usize>();
        drains.push(format!("{} ms", drain.as_millis()));
        *host = start_host(&net.hosts[i], pki);
        let restarted = Instant::now();
        let back = poll_until(BACK_IN_ROTATION, || load.served_by_since(&addrs[i], restarted) > 0);
        assert!(
            back,
            "{} not back in nginx's rotation\n{}",
            addrs[i],
            error_log_tail(nginx)
        );
        eprintln!(
            "[{:.1} s] {what}: {} stopped in {} ms, ready again after {:.1} s, back in nginx's rotation after {:.1} s",
            clock.elapsed().as_secs_f64(),
            addrs[i],
            drain.as_millis(),
            (restarted - started).as_secs_f64(),
            restarted.elapsed().as_secs_f64()
        );
    }
    let outcomes = load.stop();
    let tally = tally(&outcomes);
    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok).collect();
    let line = format!(
        "{what}: {} requests ({} GET, {} POST), {} failed GETs, {} failed POSTs, {} retried by nginx on another \
         server; drain (SIGTERM to exit) per host: {}; connections taken from the queue at the stops: {taken}",
        tally.requests,
        tally.gets,
        tally.posts,
        tally.failed_gets,
        tally.failed_posts,
        tally.retried,
        drains.join(", ")
    );
    eprintln!("{line}");
    assert!(
        failures.is_empty(),
        "{line}\nfailed requests:\n{}\n{}",
        summaries(&failures),
        error_log_tail(nginx)
    );
    line
}

/// Every host started at once (each start is mostly Python importing), then waited for.
fn start_hosts(net: &Hosts, pki: Option<&Pki>) -> Vec<Ferrule> {
    thread::scope(|scope| {
        let starts: Vec<_> = net
            .hosts
            .iter()
            .map(|h| scope.spawn(move || start_host(h, pki)))
            .collect();
        starts
            .into_iter()
            .map(|s| s.join().expect("a host did not start (see above)"))
            .collect()
    })
}

/// ferrule on `host`'s address, 2 workers, plain or `tls://` with `pki`'s certificates (nginx's required).
fn start_host(host: &Host, pki: Option<&Pki>) -> Ferrule {
    let app = apps_dir().join("wsgi_cases.py");
    let address = SocketAddr::from((host.addr, PORT));
    let builder = FerruleBuilder::new(&format!("{}:application", app.display()))
        .netns(host.netns_path())
        .args(["--workers", "2", "--graceful-timeout", "20"])
        .arg("--allow-from")
        .arg(format!("{}/32", host.gateway));
    let builder = match pki {
        None => builder.socket(&address.to_string()),
        Some(pki) => builder
            .socket(&format!("tls://{address}"))
            .arg("--tls-cert")
            .arg(&pki.server_cert)
            .arg("--tls-key")
            .arg(&pki.server_key)
            .arg("--tls-client-ca")
            .arg(&pki.ca),
    };
    let ferrule = builder.spawn();
    ferrule.wait_master_ready(2);
    ferrule
}

fn upstream_addr(host: &Host) -> String {
    SocketAddr::from((host.addr, PORT)).to_string()
}

/// SIGTERM, and the wait for the exit; returns the time it took and the host's log. Panics unless it exited 0.
fn stop_gracefully(host: &mut Ferrule) -> (Duration, String) {
    let sent = Instant::now();
    host.signal(libc::SIGTERM);
    let status = host.wait_exit(STOP);
    let drain = sent.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after SIGTERM: {status:?}\n{}",
        host.log()
    );
    (drain, host.log())
}

/// SIGKILLs a ferrule master and its workers at once, as when its machine dies; returns when the signal was
/// sent and when every process was gone.
fn sigkill(host: &mut Ferrule) -> (Instant, Instant) {
    let workers = live_children(host.pid());
    assert!(!workers.is_empty(), "no workers under {}", host.pid());
    let killed_at = Instant::now();
    for pid in std::iter::once(host.pid()).chain(workers.iter().copied()) {
        let pid = libc::pid_t::try_from(pid).expect("pid fits in pid_t");
        // SAFETY: kill(2) on the master (our unreaped child) and its workers, whose parent was alive a moment
        // ago and reaps them, so none of these pids can have been reused yet.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(host.wait_exit(STOP).is_some(), "the master outlived SIGKILL");
    let gone = poll_until(STOP, || workers.iter().all(|&pid| !alive(pid)));
    assert!(gone, "workers {workers:?} outlived SIGKILL");
    (killed_at, Instant::now())
}

/// The clients: GETs and POSTs through nginx, one request at a time each, until stopped.
struct Load {
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    stop: Arc<AtomicBool>,
    clients: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..GET_CLIENTS + POST_CLIENTS)
            .map(|n| {
                let (outcomes, stop) = (Arc::clone(&outcomes), Arc::clone(&stop));
                let post = n >= GET_CLIENTS;
                thread::spawn(move || {
                    let mut client = Client::new(port);
                    let body = pseudo_random_bytes(POST_BODY, n as u64);
                    while !stop.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        let (r, ok) = if post {
                            let r = client.request("POST", POST_PATH, &[], ReqBody::Fixed(&body));
                            let ok = r.status == 200 && r.is_complete() && r.body == body;
                            (r, ok)
                        } else {
                            let r = client.get(GET_PATH);
                            let ok = r.status == 200 && r.is_complete() && r.body == b"slept";
                            (r, ok)
                        };
                        let outcome = Outcome {
                            post,
                            upstream: r.header("X-Upstream").unwrap_or("").to_owned(),
                            ok,
                            summary: format!("{} {}", if post { "POST" } else { "GET" }, r.summary()),
                            started,
                            ended: Instant::now(),
                        };
                        outcomes.lock().unwrap().push(outcome);
                    }
                })
            })
            .collect();
        Load {
            outcomes,
            stop,
            clients,
        }
    }

    /// Waits until every address answered `each` requests by itself.
    fn wait_served_by_all(&self, addrs: &[String], each: usize, nginx: &Nginx) {
        let all = poll_until(PHASE, || {
            let outcomes = self.outcomes.lock().unwrap();
            addrs
                .iter()
                .all(|a| outcomes.iter().filter(|o| o.ok && &o.upstream == a).count() >= each)
        });
        assert!(all, "not every host served {each} requests\n{}", error_log_tail(nginx));
    }

    /// The requests sent after `t` (the newest only are looked at: they are kept in the order they ended).
    fn after(outcomes: &[Outcome], t: Instant) -> impl Iterator<Item = &Outcome> {
        outcomes
            .iter()
            .rev()
            .take_while(move |o| o.ended > t)
            .filter(move |o| o.started > t)
    }

    fn count_started_after(&self, t: Instant) -> usize {
        Load::after(&self.outcomes.lock().unwrap(), t).count()
    }

    /// Requests `addr` answered by itself that were sent after `t`.
    fn served_by_since(&self, addr: &str, t: Instant) -> usize {
        let outcomes = self.outcomes.lock().unwrap();
        Load::after(&outcomes, t).filter(|o| o.ok && o.upstream == addr).count()
    }

    fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.clients {
            c.join().expect("a client thread panicked (see its message above)");
        }
        std::mem::take(&mut *self.outcomes.lock().unwrap())
    }
}

fn tally(outcomes: &[Outcome]) -> Tally {
    let count = |f: &dyn Fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    Tally {
        requests: outcomes.len(),
        gets: count(&|o| !o.post),
        posts: count(&|o| o.post),
        failed_gets: count(&|o| !o.post && !o.ok),
        failed_posts: count(&|o| o.post && !o.ok),
        retried: count(&|o| o.upstream.contains(", ")),
    }
}

fn summaries(outcomes: &[&Outcome]) -> String {
    let lines: Vec<String> = outcomes
        .iter()
        .take(10)
        .map(|o| format!("{} (upstream {:?})", o.summary, o.upstream))
        .collect();
    lines.join("\n")
}

/// nginx's upstream errors and retries, the last of them.
fn error_log_tail(nginx: &Nginx) -> String {
    let log = std::fs::read_to_string(nginx.dir().join("error.log")).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("upstream") || l.contains("emerg"))
        .collect();
    let tail = &lines[lines.len().saturating_sub(12)..];
    format!(
        "--- nginx error.log (upstream lines, last {}) ---\n{}",
        tail.len(),
        tail.join("\n")
    )
}

/// What nginx/upstream.conf says, as the test applies it: the upstream group's directives other than its
/// servers, the parameters of a `server` line, and the directives of `location /`.
struct Recipe {
    group_conf: String,
    server_params: String,
    location: Vec<String>,
}

impl Recipe {
    fn read() -> Recipe {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("nginx/upstream.conf");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let upstream = block(&text, "upstream ");
        let location = block(&text, "location / ");
        let server = upstream
            .iter()
            .find_map(|l| l.strip_prefix("server "))
            .unwrap_or_else(|| panic!("no `server` line in the upstream block of {}", path.display()));
        let (_, params) = server.split_once(' ').unwrap_or((server, ""));
        Recipe {
            group_conf: upstream
                .iter()
                .filter(|l| !l.starts_with("server "))
                .cloned()
                .collect::<Vec<_>>()
                .join(" "),
            server_params: params.trim_end_matches(';').to_owned(),
            location,
        }
    }

    /// nginx over `addrs` with the recipe's settings: over TLS with `pki`'s files in place of the recipe's
    /// paths (and the name ferrule's test certificate has), else with its TLS lines left out. What the test
    /// leaves out besides: the `include` (the harness has its own) and `uwsgi_pass` (the harness's group).
    fn nginx(&self, addrs: &[String], pki: Option<&Pki>) -> Nginx {
        let mut location = String::new();
        for line in &self.location {
            let name = line.split_whitespace().next().unwrap_or("");
            if name == "include" || name == "uwsgi_pass" || line.contains("$ferrule_host") {
                continue;
            }
            let line = match pki {
                None if name.starts_with("uwsgi_ssl_") => continue,
                None => line.clone(),
                Some(pki) => line
                    .replace(
                        "/etc/nginx/ferrule-tls/nginx-client.crt",
                        &pki.client_cert.display().to_string(),
                    )
                    .replace(
                        "/etc/nginx/ferrule-tls/nginx-client.key",
                        &pki.client_key.display().to_string(),
                    )
                    .replace("/etc/nginx/ferrule-tls/ca.crt", &pki.ca.display().to_string())
                    .replace("uwsgi_ssl_name ferrule;", "uwsgi_ssl_name localhost;"),
            };
            location.push_str(&format!("            {line}\n"));
        }
        location.push_str("            add_header X-Upstream $upstream_addr always;\n");
        let servers: Vec<&str> = addrs.iter().map(String::as_str).collect();
        Nginx::start_upstream(
            Group {
                servers: &servers,
                server_params: &self.server_params,
                group_conf: &self.group_conf,
                tls: pki.is_some(),
            },
            &location,
        )
    }
}

/// The directives (comments and blank lines left out) of the first block whose line starts with `opening`.
fn block(text: &str, opening: &str) -> Vec<String> {
    let mut lines = text.lines().map(str::trim).skip_while(|l| !l.starts_with(opening));
    assert!(lines.next().is_some(), "no `{opening}{{` block in nginx/upstream.conf");
    lines
        .take_while(|l| *l != "}")
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}
