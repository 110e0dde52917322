//! Tier 3, the listen queue at a graceful stop: a connection ferrule's socket has queued but no worker has
//! accepted yet is served before ferrule exits, and the socket file is gone from the start of the stop, so a
//! new connection fails at once rather than being queued and reset (nginx then tries another server, whatever
//! the method). A socket ferrule did not create keeps its queue for the next instance.
//!
//! What is still queued when `--graceful-timeout` runs out is closed and counted in the line that says the stop
//! cut requests off.
//!
//! One worker with one app thread, busy with a slow request, makes the queue: app threads accept only while
//! they are free.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::Duration;

use crate::harness::READ_WAIT;
use crate::harness::ferrule::{Ferrule, FerruleBuilder, Inherit, temp_dir};
use crate::harness::procs::poll_until;
use crate::harness::uwsgi::{Raw, encode_request, nginx_vars, parse_response, read_to_close};

use super::support::lifecycle_app;

/// How long the request in flight takes: the stop's first steps must be seen well within it.
const SLOW: &str = "/sleep?s=3&tag=slow";
/// Bound for the socket file to go once SIGTERM is sent (it goes at once; the slow request takes 3 s).
const FILE_GONE: Duration = Duration::from_millis(1500);
const EXIT: Duration = Duration::from_secs(20);

fn one_thread() -> FerruleBuilder {
    lifecycle_app(1).arg("--threads").arg("1")
}

/// Connects to `path` and sends a whole GET of `uri` (a connection queued, if no thread is free to accept it).
fn send_get(path: &Path, uri: &str) -> UnixStream {
    let mut stream = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    stream.set_read_timeout(Some(READ_WAIT)).expect("set a read timeout");
    stream
        .write_all(&encode_request(nginx_vars("GET", uri, b"").as_slice(), b""))
        .expect("send the request");
    stream
}

/// The slow request, in flight on the only app thread once this returns; answered by the returned thread.
fn start_slow(ferrule: &Ferrule, path: &Path) -> thread::JoinHandle<Raw> {
    let mut slow = send_get(path, SLOW);
    let answer = thread::spawn(move || read_to_close(&mut slow));
    assert!(
        ferrule.wait_for_log("lifecycle-marker sleep-start tag=slow", READ_WAIT),
        "the slow request never reached the app\n{}",
        ferrule.log()
    );
    answer
}

fn assert_answered(raw: &Raw, what: &str, ferrule: &Ferrule) {
    assert!(
        !raw.reset && !raw.bytes.is_empty(),
        "{what}: no answer (reset: {})\n{}",
        raw.reset,
        ferrule.log()
    );
    let r = parse_response(&raw.bytes);
    assert_eq!(r.status, 200, "{what}: {r:?}\n{}", ferrule.log());
}

#[test]
fn sigterm_removes_the_socket_file_first_and_serves_the_queued_connections() {
    let builder = one_thread();
    let path = builder.tempdir().join("ferrule.sock");
    let mut ferrule = builder.spawn();
    ferrule.wait_master_ready(1);
    let slow = start_slow(&ferrule, &path);
    let mut queued: Vec<UnixStream> = (0..2)
        .map(|i| send_get(&path, &format!("/sleep?s=0&tag=q{i}")))
        .collect();

    ferrule.signal(libc::SIGTERM);
    let gone = poll_until(FILE_GONE, || !path.exists());
    let slow_still_running = !slow.is_finished();
    assert!(
        gone,
        "the socket file is still there {FILE_GONE:?} after SIGTERM\n{}",
        ferrule.log()
    );
    assert!(
        slow_still_running,
        "the socket file went only after the request in flight ended"
    );
    let refused = UnixStream::connect(&path).expect_err("a connection made during the stop");
    assert_eq!(refused.kind(), ErrorKind::NotFound, "{refused}");

    assert_answered(
        &slow.join().expect("the slow request's thread"),
        "the request in flight",
        &ferrule,
    );
    for (i, stream) in queued.iter_mut().enumerate() {
        assert_answered(&read_to_close(stream), &format!("queued connection {i}"), &ferrule);
    }
    let status = ferrule.wait_exit(EXIT);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{status:?}\n{}", ferrule.log());
    assert!(
        ferrule.log().contains("taken_from_queue=2"),
        "the worker does not say it took the 2 queued connections\n{}",
        ferrule.log()
    );
}

#[test]
fn what_is_still_queued_when_the_graceful_timeout_ends_is_counted_as_cut_off() {
    let builder = one_thread().arg("--graceful-timeout").arg("1");
    let path = builder.tempdir().join("ferrule.sock");
    let mut ferrule = builder.spawn();
    ferrule.wait_master_ready(1);
    let slow = start_slow(&ferrule, &path);
    let mut queued: Vec<UnixStream> = (0..2)
        .map(|i| send_get(&path, &format!("/sleep?s=0&tag=q{i}")))
        .collect();

    ferrule.signal(libc::SIGTERM);
    let status = ferrule.wait_exit(EXIT);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{status:?}\n{}", ferrule.log());
    let log = ferrule.log();
    // The request in flight and the two taken from the queue, read whole and waiting for the busy thread.
    assert!(
        log.contains("taken_from_queue=2") && log.contains("stop cut off requests still in flight cut_off=3 queued=2"),
        "the stop does not count what it cut off\n{log}"
    );
    // Closed unanswered, and the slow request with them.
    for stream in &mut queued {
        let raw = read_to_close(stream);
        assert!(raw.bytes.is_empty(), "{raw:?}");
    }
    assert!(slow.join().expect("the slow request's thread").bytes.is_empty());
}

#[test]
fn an_inherited_socket_keeps_its_queue_for_the_next_instance() {
    let dir = temp_dir();
    let path = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&path).expect("bind the test's listener");
    let mut ferrule = one_thread()
        .inherit_socket(listener.as_raw_fd(), Inherit::FdArg(9))
        .spawn();
    ferrule.wait_master_ready(1);
    let slow = start_slow(&ferrule, &path);
    let mut queued = send_get(&path, "/sleep?s=0&tag=next");

    ferrule.signal(libc::SIGTERM);
    assert_answered(
        &slow.join().expect("the slow request's thread"),
        "the request in flight",
        &ferrule,
    );
    let status = ferrule.wait_exit(EXIT);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{status:?}\n{}", ferrule.log());
    assert!(path.exists(), "ferrule removed a socket file it did not create");

    // The connection is still queued, intact: the next instance (here, the test) accepts and answers it.
    listener.set_nonblocking(true).expect("non-blocking accept");
    let (mut next, _) = listener
        .accept()
        .unwrap_or_else(|e| panic!("the queued connection is gone: {e}\n{}", ferrule.log()));
    next.set_nonblocking(false).expect("blocking reads");
    next.set_read_timeout(Some(READ_WAIT)).expect("set a read timeout");
    // All of the request is read before the close: a Unix socket closed with unread data resets its peer.
    let mut head = [0u8; 4];
    next.read_exact(&mut head).expect("the queued request is still there");
    let mut vars = vec![0u8; usize::from(u16::from_le_bytes([head[1], head[2]]))];
    next.read_exact(&mut vars).expect("the queued request's vars");
    next.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
        .expect("answer it");
    drop(next);
    let raw = read_to_close(&mut queued);
    assert!(!raw.reset && raw.text().ends_with("next"), "{raw:?}");
}
