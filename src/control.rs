//! The line between the master and a worker, both ends: how a worker is started (its environment and the
//! descriptors it inherits), the settings line the master writes first on the control socket, the text lines
//! a worker sends up (`ready`, `stats ...`, `retire REASON`; under `--reload` the files its app imported,
//! `files [...]` lines ending with `files-done`, and `unavailable` when the app did not import), and the one line the master sends down later:
//! the session-ticket keys for tls:// sockets (`tickets PERIOD:HEX ...`), written before the worker starts and
//! again whenever the keys rotate. EOF means the other side is gone.
//!
//! Under `--preload` the master starts a zygote the same way (with [`ENV_ZYGOTE`] and one more descriptor,
//! the fork channel), which says `ready` once the app is imported. The master then asks it for each worker on
//! the fork channel: `fork ID WORKERS` with the new worker's control socket attached (SCM_RIGHTS), answered
//! with `forked PID` or `failed REASON`.
//!
//! Below both the master and the worker in the flow, so neither imports the other.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use crate::config::Config;
use crate::lifecycle::RetireReason;
use crate::listener::{BoundSocket, ListenError};
use crate::metrics::Snapshot;
use crate::tls::{SharedTickets, TicketKey};

/// Exit status of a worker that could not load the app: the master stops instead of respawning it.
pub(crate) const EXIT_APP_LOAD: i32 = 3;

/// Environment the master sets for a worker: its number, and how many listening sockets it inherits.
pub(crate) const ENV_WORKER_ID: &str = "FERRULE_WORKER_ID";
pub(crate) const ENV_WORKER_FDS: &str = "FERRULE_WORKER_FDS";
/// Set (to `1`) for the zygote that `--preload` starts instead of a worker.
pub(crate) const ENV_ZYGOTE: &str = "FERRULE_ZYGOTE";
/// The master's pid, for the zygote: its parent pid stops being this one when the master dies.
pub(crate) const ENV_MASTER_PID: &str = "FERRULE_MASTER_PID";

/// How long a new worker waits for its settings; the master writes them right after starting it.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);

/// About how long a `files` line may grow before the next line starts (one path longer than this goes alone).
const FILES_LINE: usize = 16 * 1024;

/// What a worker tells the master.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Message {
    /// The app is imported and the worker serves.
    Ready,
    /// The worker's counters, once a second.
    Stats(Box<Snapshot>),
    /// The worker wants a replacement.
    Retire(RetireReason),
    /// Under `--reload`: some of the files the app imported (a JSON list, a bounded number of bytes a line).
    Files(Vec<PathBuf>),
    /// The files sent before this line are all of them.
    FilesDone,
    /// Under `--reload`: the app did not import; the worker answers 503 until it is replaced.
    Unavailable,
}

impl Message {
    pub(crate) fn encode(&self) -> String {
        match self {
            Message::Ready => "ready".to_owned(),
            Message::Stats(snapshot) => snapshot.encode(),
            Message::Retire(reason) => format!("retire {}", reason.as_str()),
            // A path is UTF-8 here: the worker sends only those (see `ToMaster::send_files`).
            Message::Files(files) => format!("files {}", serde_json::to_string(files).unwrap_or_default()),
            Message::FilesDone => "files-done".to_owned(),
            Message::Unavailable => "unavailable".to_owned(),
        }
    }

    /// A line from a worker; `None` for a line this master does not know (ignored).
    pub(crate) fn parse(line: &str) -> Option<Message> {
        match line.split_once(' ') {
            None if line == "ready" => Some(Message::Ready),
            None if line == "files-done" => Some(Message::FilesDone),
            None if line == "unavailable" => Some(Message::Unavailable),
            Some(("files", list)) => serde_json::from_str(list).ok().map(Message::Files),
            Some(("stats", numbers)) => Snapshot::parse(numbers).map(|s| Message::Stats(Box::new(s))),
            Some(("retire", reason)) => RetireReason::parse(reason).map(Message::Retire),
            _ => None,
        }
    }
}

/// The master's side: writes a new worker's settings, the first line on its control socket (a few KiB,
/// which the socket buffer takes whole).
pub(crate) fn send_settings(stream: &UnixStream, config: &Config) -> std::io::Result<()> {
    let mut stream = stream;
    let line = config.encode().map_err(std::io::Error::other)?;
    writeln!(stream, "config {line}")
}

/// The master's side: writes the session-ticket keys every worker seals and opens tickets with. The socket has
/// room for hundreds of such lines; once the worker serves, the socket is non-blocking (its reader made it
/// so), and on a socket the worker left full an error may follow part of the line: the caller then stops
/// sending to that worker.
pub(crate) fn send_ticket_keys(stream: &UnixStream, keys: &[TicketKey]) -> std::io::Result<()> {
    let mut line = String::from("tickets");
    for key in keys {
        line.push(' ');
        line.push_str(&key.encode());
    }
    line.push('\n');
    let mut stream = stream;
    stream.write_all(line.as_bytes())
}

/// The keys of a `tickets` line; `None` for any other line.
fn parse_ticket_keys(line: &str) -> Option<Vec<TicketKey>> {
    let keys = line.strip_prefix("tickets")?;
    keys.split_whitespace().map(TicketKey::parse).collect()
}

/// This process's worker number, when a master started it as a worker.
pub(crate) fn worker_id() -> Option<u32> {
    std::env::var(ENV_WORKER_ID).ok()?.parse().ok()
}

/// Whether a master started this process as the `--preload` zygote.
pub(crate) fn is_zygote() -> bool {
    std::env::var_os(ENV_ZYGOTE).is_some_and(|v| v == "1")
}

/// Why a worker could not take over from its master.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandoffError {
    #[error("{ENV_WORKER_FDS} is missing or invalid: this process was not started by a ferrule master")]
    NoSockets,
    #[error("cannot read the settings from the master: {0}")]
    Settings(String),
    #[error(transparent)]
    Listen(#[from] ListenError),
}

/// What a worker (or the zygote) gets from its master: the validated settings, the listening sockets and the
/// control line; the zygote also gets the fork channel.
pub(crate) struct Handoff {
    pub(crate) config: Config,
    pub(crate) sockets: Vec<BoundSocket>,
    pub(crate) control: ToMaster,
    pub(crate) fork_channel: Option<UnixStream>,
    /// For the zygote: the pid of the master that started it.
    pub(crate) master_pid: Option<nix::unistd::Pid>,
}

impl Handoff {
    /// Takes the inherited descriptors (sockets at 3.., the control socket after them) and reads the settings
    /// line the master wrote first on the control socket.
    pub(crate) fn receive() -> Result<Handoff, HandoffError> {
        let count: i32 = std::env::var(ENV_WORKER_FDS)
            .ok()
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=64).contains(n))
            .ok_or(HandoffError::NoSockets)?;
        // The app and whatever it starts must not think they are ferrule workers (a `ferrule --check-config`
        // run from the app would otherwise wait for a master).
        // SAFETY: this runs first thing in main, before any other thread exists, so no thread reads the
        // environment concurrently.
        let zygote = is_zygote();
        let master_pid = std::env::var(ENV_MASTER_PID)
            .ok()
            .and_then(|pid| pid.parse().ok())
            .map(nix::unistd::Pid::from_raw);
        unsafe {
            std::env::remove_var(ENV_WORKER_ID);
            std::env::remove_var(ENV_WORKER_FDS);
            std::env::remove_var(ENV_ZYGOTE);
            std::env::remove_var(ENV_MASTER_PID);
        }
        let sockets = (3..3 + count)
            .map(BoundSocket::inherit)
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: the master places the control socket right after the listening sockets and nothing else in
        // this process uses that descriptor; `inherit` above has already checked the ones before it.
        let control = unsafe { OwnedFd::from_raw_fd(3 + count) };
        close_on_exec(&control)?;
        let mut stream = UnixStream::from(control);
        let mut pending = Vec::new();
        let line = read_line(&mut stream, &mut pending).map_err(|e| HandoffError::Settings(e.to_string()))?;
        let config = line
            .strip_prefix("config ")
            .ok_or_else(|| HandoffError::Settings("the first message is not the settings".into()))
            .and_then(|json| Config::decode(json).map_err(|e| HandoffError::Settings(e.to_string())))?;
        // SAFETY: as above: the fork channel comes right after the control socket, for the zygote only.
        let fork_channel = if zygote {
            let channel = unsafe { OwnedFd::from_raw_fd(4 + count) };
            close_on_exec(&channel)?;
            Some(UnixStream::from(channel))
        } else {
            None
        };
        Ok(Handoff {
            config,
            sockets,
            control: ToMaster { stream, pending },
            fork_channel,
            master_pid,
        })
    }
}

/// Inherited without close-on-exec (that is how they got here): a program the app runs must not inherit the
/// control line or the fork channel, or the master would not see this side close.
fn close_on_exec(fd: &OwnedFd) -> Result<(), HandoffError> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(drop)
        .map_err(|e| HandoffError::Settings(format!("cannot set close-on-exec on the control socket: {e}")))
}

/// Reads one line the master wrote before the worker started (the settings, the ticket keys), within
/// `HANDOFF_TIMEOUT`. It reads in chunks: what it read past the line stays in `pending` for the next one.
fn read_line(stream: &mut UnixStream, pending: &mut Vec<u8>) -> std::io::Result<String> {
    stream.set_read_timeout(Some(HANDOFF_TIMEOUT))?;
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = pending.iter().position(|&b| b == b'\n') {
            break end;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        pending.extend_from_slice(&chunk[..n]);
    };
    stream.set_read_timeout(None)?;
    let mut line: Vec<u8> = pending.drain(..=end).collect();
    line.pop();
    String::from_utf8(line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// How long the master waits for the zygote to answer a fork request: a fork takes milliseconds.
const FORK_TIMEOUT: Duration = Duration::from_secs(10);

/// The master's side of the fork channel: asks the zygote for a worker numbered `id`, one of `workers`, whose
/// control socket is `control`; returns the new worker's pid.
pub(crate) fn request_fork(
    channel: &UnixStream,
    id: u32,
    workers: usize,
    control: BorrowedFd<'_>,
) -> Result<u32, ForkError> {
    let line = format!("fork {id} {workers}\n");
    let fds = [control.as_raw_fd()];
    let cmsgs = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(line.as_bytes())];
    // A signal (SIGCHLD, whenever a process exits) interrupts these calls: a socket call with a timeout is
    // never restarted by the kernel, so it is retried here.
    loop {
        match sendmsg::<()>(channel.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None) {
            Err(nix::errno::Errno::EINTR) => continue,
            sent => break sent.map(drop).map_err(std::io::Error::from)?,
        };
    }
    let mut channel = channel;
    channel.set_read_timeout(Some(FORK_TIMEOUT))?;
    let answer = read_answer(&mut channel).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock => ForkError::Silent(FORK_TIMEOUT),
        _ => ForkError::Channel(e),
    })?;
    match answer.split_once(' ') {
        Some(("forked", pid)) => pid.parse().map_err(|_| ForkError::Garbled(answer.clone())),
        Some(("failed", reason)) => Err(ForkError::Refused(reason.to_owned())),
        _ => Err(ForkError::Garbled(answer)),
    }
}

/// Why the zygote gave no worker.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForkError {
    /// The zygote tried and says why it could not; it is fine otherwise.
    #[error("the zygote could not fork a worker: {0}")]
    Refused(String),
    #[error("the zygote did not answer a fork request within {0:?}")]
    Silent(Duration),
    #[error("the zygote answered a fork request with {0:?}")]
    Garbled(String),
    #[error("the fork channel to the zygote failed: {0}")]
    Channel(#[from] std::io::Error),
}

/// One short answer line, read a byte at a time so nothing after it is consumed.
fn read_answer(channel: &mut &UnixStream) -> std::io::Result<String> {
    let mut line = Vec::with_capacity(32);
    let mut byte = [0u8; 1];
    loop {
        match channel.read(&mut byte) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > 512 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
    String::from_utf8(line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A worker the master asked the zygote for.
pub(crate) struct ForkRequest {
    pub(crate) id: u32,
    /// How many workers there are to be, for `wsgi.multiprocess`.
    pub(crate) workers: usize,
    /// The new worker's end of its control line.
    pub(crate) control: ToMaster,
}

/// The zygote's side of the fork channel: the next request, or `None` when the master closed the channel.
pub(crate) fn receive_fork_request(channel: &UnixStream) -> std::io::Result<Option<ForkRequest>> {
    let mut buf = [0u8; 128];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let (len, fd) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            channel.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fd = None;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for raw in fds {
                    // SAFETY: the kernel just installed this descriptor in this process for us; nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    fd.get_or_insert(owned);
                }
            }
        }
        (msg.bytes, fd)
    };
    if len == 0 {
        return Ok(None);
    }
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let text = std::str::from_utf8(&buf[..len]).map_err(|_| invalid("fork request is not text"))?;
    let mut words = text.trim_end().split(' ');
    let (Some("fork"), Some(id), Some(workers), None) = (words.next(), words.next(), words.next(), words.next()) else {
        return Err(invalid("malformed fork request"));
    };
    let id = id.parse().map_err(|_| invalid("bad worker number"))?;
    let workers = workers.parse().map_err(|_| invalid("bad worker count"))?;
    let control = fd.ok_or_else(|| invalid("fork request without a control socket"))?;
    Ok(Some(ForkRequest {
        id,
        workers,
        control: ToMaster::new(UnixStream::from(control)),
    }))
}

/// The zygote's answer to a fork request.
pub(crate) fn answer_fork(channel: &UnixStream, result: Result<u32, String>) -> std::io::Result<()> {
    let mut channel = channel;
    match result {
        Ok(pid) => writeln!(channel, "forked {pid}"),
        Err(reason) => writeln!(channel, "failed {}", reason.replace('\n', " ")),
    }
}

/// The worker's side of the control line: messages go up as text lines.
pub(crate) struct ToMaster {
    stream: UnixStream,
    /// What was read past the last line taken before the worker started serving.
    pending: Vec<u8>,
}

impl ToMaster {
    /// The other end of a control line the master made (a worker forked by the zygote gets it attached to its
    /// fork request).
    pub(crate) fn new(stream: UnixStream) -> ToMaster {
        ToMaster {
            stream,
            pending: Vec::new(),
        }
    }

    /// For a worker with tls:// sockets: the session-ticket keys the master wrote before the worker started.
    pub(crate) fn receive_ticket_keys(&mut self) -> std::io::Result<Vec<TicketKey>> {
        let line = read_line(&mut self.stream, &mut self.pending)?;
        parse_ticket_keys(&line).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the master sent no session-ticket keys",
            )
        })
    }

    pub(crate) fn send(&mut self, message: &Message) {
        // Tiny messages on a local socket the master reads all the time. It is non-blocking once the worker
        // serves (shared with `listen_to_master`'s reader), so a master that stopped reading for minutes costs a
        // line, reported, never a stalled worker.
        if let Err(error) = writeln!(self.stream, "{}", message.encode()) {
            tracing::warn!(%error, "cannot reach the master");
        }
    }

    /// Sends the files the app imported, in lines of at most about `FILES_LINE` bytes, then `files-done`. A
    /// path that is not UTF-8 cannot travel as JSON text and is left out.
    pub(crate) fn send_files(&mut self, files: &[PathBuf]) {
        let mut chunk: Vec<PathBuf> = Vec::new();
        let mut bytes = 0;
        for file in files.iter().filter(|f| f.to_str().is_some()) {
            let len = file.as_os_str().len() + 3;
            if bytes + len > FILES_LINE && !chunk.is_empty() {
                self.send(&Message::Files(std::mem::take(&mut chunk)));
                bytes = 0;
            }
            chunk.push(file.clone());
            bytes += len;
        }
        if !chunk.is_empty() {
            self.send(&Message::Files(chunk));
        }
        self.send(&Message::FilesDone);
    }

    /// A future that reads what the master sends (new session-ticket keys, installed into `tickets`) and
    /// resolves when the master closes its end (it exited or was killed).
    pub(crate) fn listen_to_master(
        &mut self,
        tickets: Option<Arc<SharedTickets>>,
    ) -> std::io::Result<impl Future<Output = ()> + use<>> {
        let stream = self.stream.try_clone()?;
        stream.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(stream)?;
        let mut pending = std::mem::take(&mut self.pending);
        Ok(async move {
            let mut buf = [0u8; 1024];
            loop {
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let keys = std::str::from_utf8(&line)
                        .ok()
                        .and_then(|l| parse_ticket_keys(l.trim_end()));
                    match (keys, &tickets) {
                        (Some(keys), Some(tickets)) => {
                            tracing::debug!(keys = keys.len(), "new session-ticket keys from the master");
                            tickets.set_keys(keys);
                        }
                        (Some(_), None) => {}
                        (None, _) => tracing::warn!("an unknown line from the master; ignored"),
                    }
                }
                // Lines are short; a line this long is not one of the master's.
                if pending.len() > 64 * 1024 {
                    pending.clear();
                }
                let _ = stream.readable().await;
                match stream.try_read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let stats = Message::Stats(Box::default());
        for message in [Message::Ready, Message::Retire(RetireReason::Memory), stats] {
            assert_eq!(Message::parse(&message.encode()), Some(message));
        }
        let files = Message::Files(vec!["/srv/app/a b.py".into(), "/srv/app/\"q\".py".into()]);
        for message in [files, Message::FilesDone, Message::Unavailable] {
            assert_eq!(Message::parse(&message.encode()), Some(message));
        }
        assert_eq!(Message::parse("files [1, 2]"), None);
        assert_eq!(Message::parse("retire bored"), None);
        assert_eq!(Message::parse("hello"), None);
    }

    #[test]
    fn many_files_go_up_in_bounded_lines_and_end_with_done() {
        let (master, worker) = UnixStream::pair().unwrap();
        let files: Vec<PathBuf> = (0..2000).map(|n| format!("/srv/app/module_{n:04}.py").into()).collect();
        std::thread::scope(|s| {
            let sender = s.spawn(|| ToMaster::new(worker).send_files(&files));
            let mut got = Vec::new();
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(&master));
            loop {
                let line = lines.next().unwrap().unwrap();
                assert!(line.len() <= FILES_LINE + 64, "a line of {} bytes", line.len());
                match Message::parse(&line) {
                    Some(Message::Files(chunk)) => got.extend(chunk),
                    Some(Message::FilesDone) => break,
                    other => panic!("{other:?}"),
                }
            }
            sender.join().unwrap();
            assert_eq!(got, files);
        });
    }

    #[test]
    fn ticket_keys_go_down_the_line_after_the_settings() {
        let (master, worker) = UnixStream::pair().unwrap();
        let keys: Vec<_> = (7..10).map(|p| TicketKey::generate(p).unwrap()).collect();
        // Both lines are written before the worker reads either, as when the master starts a worker.
        (&master).write_all(b"config {}\n").unwrap();
        send_ticket_keys(&master, &keys).unwrap();
        let mut control = ToMaster::new(worker);
        assert_eq!(
            read_line(&mut control.stream, &mut control.pending).unwrap(),
            "config {}"
        );
        assert_eq!(control.receive_ticket_keys().unwrap(), keys);
        assert_eq!(parse_ticket_keys("tickets 1:zz"), None);
        assert_eq!(parse_ticket_keys("stats 1 2"), None);
    }
}
