//! Where ferrule listens: the `--socket` and `--metrics` forms, the networks of `--allow-from`, and the
//! sockets systemd passes.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use super::error::ConfigError;

/// Where ferrule listens when no socket is given anywhere (uWSGI's customary port).
pub(crate) const DEFAULT_SOCKET: &str = "127.0.0.1:3031";

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum SocketSpec {
    Unix(PathBuf),
    Tcp(SocketAddr),
    /// uwsgi over TLS (nginx's `suwsgi://`) on a TCP address.
    Tls(SocketAddr),
    /// An already listening socket inherited from whoever started ferrule (`fd://N`, systemd).
    Fd(i32),
}

impl std::fmt::Display for SocketSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            SocketSpec::Tcp(a) => write!(f, "{a}"),
            SocketSpec::Tls(a) => write!(f, "tls://{a}"),
            SocketSpec::Fd(n) => write!(f, "fd://{n}"),
        }
    }
}

/// A network in CIDR notation, for `--allow-from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub(crate) fn parse(s: &str) -> Result<Cidr, ConfigError> {
        let bad = || ConfigError::BadCidr(s.to_owned());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside this network; an IPv4-mapped IPv6 peer matches IPv4 networks.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Parses one `--socket` value.
pub(crate) fn parse_socket(s: &str) -> Result<SocketSpec, ConfigError> {
    if let Some(addr) = s.strip_prefix("tls://") {
        return match parse_socket(addr)? {
            SocketSpec::Tcp(addr) => Ok(SocketSpec::Tls(addr)),
            _ => Err(ConfigError::BadSocket(s.to_owned())),
        };
    }
    if let Some(fd) = s.strip_prefix("fd://") {
        return match fd.parse::<i32>() {
            Ok(n) if n >= 0 => Ok(SocketSpec::Fd(n)),
            _ => Err(ConfigError::BadSocket(s.to_owned())),
        };
    }
    if let Some(path) = s.strip_prefix("unix:") {
        return if path.starts_with('/') {
            Ok(SocketSpec::Unix(PathBuf::from(path)))
        } else {
            Err(ConfigError::RelativeUnixPath(s.to_owned()))
        };
    }
    if s.starts_with('/') {
        return Ok(SocketSpec::Unix(PathBuf::from(s)));
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(SocketSpec::Tcp(addr));
    }
    // A host name such as localhost:3031: resolve once, at start-up.
    match s.to_socket_addrs().ok().and_then(|mut a| a.next()) {
        Some(addr) if s.contains(':') => Ok(SocketSpec::Tcp(addr)),
        _ => Err(ConfigError::BadSocket(s.to_owned())),
    }
}

/// The `--metrics` socket: like `--socket`, but it speaks plain uwsgi only.
pub(super) fn parse_metrics_socket(s: &str) -> Result<SocketSpec, ConfigError> {
    match parse_socket(s)? {
        SocketSpec::Tls(_) => Err(ConfigError::MetricsOverTls(s.to_owned())),
        spec => Ok(spec),
    }
}

/// Sockets passed by systemd socket activation: fds 3.. when LISTEN_PID names this process.
pub(crate) fn systemd_fds() -> Vec<SocketSpec> {
    let for_us = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    if !for_us || count <= 0 {
        return Vec::new();
    }
    (3..3 + count.min(64)).map(SocketSpec::Fd).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_forms() {
        assert_eq!(
            parse_socket("unix:/run/a.sock").unwrap(),
            SocketSpec::Unix("/run/a.sock".into())
        );
        assert_eq!(
            parse_socket("/run/a.sock").unwrap(),
            SocketSpec::Unix("/run/a.sock".into())
        );
        assert_eq!(
            parse_socket("127.0.0.1:3031").unwrap(),
            SocketSpec::Tcp("127.0.0.1:3031".parse().unwrap())
        );
        assert_eq!(
            parse_socket("[::1]:3031").unwrap(),
            SocketSpec::Tcp("[::1]:3031".parse().unwrap())
        );
        assert!(parse_socket("unix:relative.sock").is_err());
        assert!(parse_socket("nonsense").is_err());
        assert!(parse_socket("127.0.0.1").is_err());
        assert_eq!(parse_socket("fd://3").unwrap(), SocketSpec::Fd(3));
        assert!(parse_socket("fd://x").is_err());
    }

    #[test]
    fn cidrs() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.9.9".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
        assert!(!Cidr::parse("fd00::/8").unwrap().contains("10.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "::1/129", "1.2.3.4/x"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }
}
