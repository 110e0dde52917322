//! The line between the master and a worker, both ends: how a worker is started (its environment and the
//! descriptors it inherits), the settings line the master writes first on the control socket, and the text
//! lines a worker sends up (`ready`, `stats ...`, `retire REASON`); EOF means the other side is gone.
//!
//! Below both the master and the worker in the flow, so neither imports the other.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::config::Config;
use crate::lifecycle::RetireReason;
use crate::listener::{BoundSocket, ListenError};
use crate::metrics::Snapshot;

/// Exit status of a worker that could not load the app: the master stops instead of respawning it.
pub(crate) const EXIT_APP_LOAD: i32 = 3;

/// Environment the master sets for a worker: its number, and how many listening sockets it inherits.
pub(crate) const ENV_WORKER_ID: &str = "FERRULE_WORKER_ID";
pub(crate) const ENV_WORKER_FDS: &str = "FERRULE_WORKER_FDS";

/// How long a new worker waits for its settings; the master writes them right after starting it.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);

/// What a worker tells the master.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Message {
    /// The app is imported and the worker serves.
    Ready,
    /// The worker's counters, once a second.
    Stats(Snapshot),
    /// The worker wants a replacement.
    Retire(RetireReason),
}

impl Message {
    pub(crate) fn encode(&self) -> String {
        match self {
            Message::Ready => "ready".to_owned(),
            Message::Stats(snapshot) => snapshot.encode(),
            Message::Retire(reason) => format!("retire {}", reason.as_str()),
        }
    }

    /// A line from a worker; `None` for a line this master does not know (ignored).
    pub(crate) fn parse(line: &str) -> Option<Message> {
        match line.split_once(' ') {
            None if line == "ready" => Some(Message::Ready),
            Some(("stats", numbers)) => Snapshot::parse(numbers).map(Message::Stats),
            Some(("retire", reason)) => RetireReason::parse(reason).map(Message::Retire),
            _ => None,
        }
    }
}

/// The master's side: writes a new worker's settings, the first line on its control socket (a few KiB,
/// which the socket buffer takes whole).
pub(crate) fn send_settings(stream: &UnixStream, config: &Config) -> std::io::Result<()> {
    let mut stream = stream;
    writeln!(stream, "config {}", config.encode())
}

/// This process's worker number, when a master started it as a worker.
pub(crate) fn worker_id() -> Option<u32> {
    std::env::var(ENV_WORKER_ID).ok()?.parse().ok()
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

/// What a worker gets from its master: the validated settings, the listening sockets and the control line.
pub(crate) struct Handoff {
    pub(crate) config: Config,
    pub(crate) sockets: Vec<BoundSocket>,
    pub(crate) control: ToMaster,
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
        unsafe {
            std::env::remove_var(ENV_WORKER_ID);
            std::env::remove_var(ENV_WORKER_FDS);
        }
        let sockets = (3..3 + count)
            .map(BoundSocket::inherit)
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: the master places the control socket right after the listening sockets and nothing else in
        // this process uses that descriptor; `inherit` above has already checked the ones before it.
        let control = unsafe { OwnedFd::from_raw_fd(3 + count) };
        let mut stream = UnixStream::from(control);
        let line = read_line(&mut stream).map_err(|e| HandoffError::Settings(e.to_string()))?;
        let config = line
            .strip_prefix("config ")
            .ok_or_else(|| HandoffError::Settings("the first message is not the settings".into()))
            .and_then(|json| Config::decode(json).map_err(|e| HandoffError::Settings(e.to_string())))?;
        Ok(Handoff {
            config,
            sockets,
            control: ToMaster { stream },
        })
    }
}

/// Reads the settings line. The master writes nothing after it on this socket (the channel carries the
/// worker's messages up from then on), so reading in chunks cannot consume anything else.
fn read_line(stream: &mut UnixStream) -> std::io::Result<String> {
    stream.set_read_timeout(Some(HANDOFF_TIMEOUT))?;
    let mut line = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        line.extend_from_slice(&chunk[..n]);
        if line.last() == Some(&b'\n') {
            break;
        }
    }
    stream.set_read_timeout(None)?;
    line.pop();
    String::from_utf8(line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The worker's side of the control line: messages go up as text lines.
pub(crate) struct ToMaster {
    stream: UnixStream,
}

impl ToMaster {
    pub(crate) fn send(&mut self, message: &Message) {
        // Tiny messages on a local socket: a blocking write cannot stall for long.
        if let Err(error) = writeln!(self.stream, "{}", message.encode()) {
            tracing::warn!(%error, "cannot reach the master");
        }
    }

    /// A future that resolves when the master closes its end (it exited or was killed).
    pub(crate) fn master_gone(&self) -> std::io::Result<impl Future<Output = ()> + use<>> {
        let stream = tokio::net::UnixStream::from_std(self.stream.try_clone()?)?;
        Ok(async move {
            let mut buf = [0u8; 64];
            loop {
                let _ = stream.readable().await;
                match stream.try_read(&mut buf) {
                    Ok(0) => return,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return,
                    Ok(_) => continue,
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
        let stats = Message::Stats(Snapshot::default());
        for message in [Message::Ready, Message::Retire(RetireReason::Memory), stats] {
            assert_eq!(Message::parse(&message.encode()), Some(message));
        }
        assert_eq!(Message::parse("retire bored"), None);
        assert_eq!(Message::parse("hello"), None);
    }
}
