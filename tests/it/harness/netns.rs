//! Several machines on one box, for the tests that need them: each `Host` is a network namespace the test
//! makes (`ip netns`), joined to the test's own namespace by a veth pair, with an address of its own on each
//! end and no route anywhere else, so its only traffic is with the test (and the nginx the test runs). The
//! `Hosts` guard deletes the links and namespaces when it is dropped, a failed test included.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::harness::procs::require_root;

/// Numbers the sets of hosts one test process makes, so their names differ too.
static NEXT_SET: AtomicU32 = AtomicU32::new(0);
/// The range the test networks come from: 10.213.N.0/24, one N per set of hosts, each host a /30 in it.
const PREFIX: [u8; 2] = [10, 213];

/// One machine: a network namespace with one veth end at `addr`; the test's end is `gateway`.
pub struct Host {
    /// The namespace's name, for `ip netns exec` and /run/netns.
    pub name: String,
    /// The veth end in the test's namespace (deleting it deletes the pair).
    link: String,
    /// The host's address: what ferrule binds in there, and nginx connects to.
    pub addr: Ipv4Addr,
    /// The test's end of the link: where the host's connections come from.
    pub gateway: Ipv4Addr,
}

impl Host {
    /// The file a process joins the namespace through (`setns`).
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

/// The hosts of one test; dropping it removes every link and namespace it made.
pub struct Hosts {
    pub hosts: Vec<Host>,
}

impl Hosts {
    /// Makes `count` hosts (at most 60). Needs root: CI runs the tests as root, and without it this fails.
    pub fn new(count: usize) -> Hosts {
        require_root("a network namespace per host");
        assert!(count <= 60, "at most 60 hosts fit in one /24");
        let set = NEXT_SET.fetch_add(1, Ordering::SeqCst);
        // Unique among concurrent runs: the pid and the set number (interface names take 15 bytes at most).
        let tag = format!("fr{}s{set}", std::process::id() % 100_000);
        let subnet = free_subnet(std::process::id() + set);
        let mut made = Hosts { hosts: Vec::new() };
        for i in 0..count {
            let base = u8::try_from(4 * i).expect("at most 60 hosts");
            let host = Host {
                name: format!("{tag}h{i}"),
                link: format!("{tag}v{i}"),
                addr: Ipv4Addr::new(PREFIX[0], PREFIX[1], subnet, base + 2),
                gateway: Ipv4Addr::new(PREFIX[0], PREFIX[1], subnet, base + 1),
            };
            ip(&["netns", "add", &host.name]);
            // Pushed as soon as it exists, so the guard removes what a later failure leaves behind.
            made.hosts.push(host);
            let host = made.hosts.last().expect("just pushed");
            let inside = format!("{tag}p{i}");
            ip(&[
                "link", "add", &host.link, "type", "veth", "peer", "name", &inside, "netns", &host.name,
            ]);
            ip(&["addr", "add", &format!("{}/30", host.gateway), "dev", &host.link]);
            ip(&["link", "set", &host.link, "up"]);
            ip(&[
                "-n",
                &host.name,
                "addr",
                "add",
                &format!("{}/30", host.addr),
                "dev",
                &inside,
            ]);
            ip(&["-n", &host.name, "link", "set", &inside, "up"]);
            ip(&["-n", &host.name, "link", "set", "lo", "up"]);
        }
        made
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for host in &self.hosts {
            // Not checked: this also runs while a failed test unwinds, where a second panic would abort. The
            // link goes first: a namespace's own clean-up happens later in the kernel, its veth with it.
            let _ = Command::new("ip").args(["link", "del", &host.link]).output();
            let _ = Command::new("ip").args(["netns", "del", &host.name]).output();
        }
    }
}

/// A third octet for 10.213.N.0/24 that no interface here uses yet, starting from `seed`.
fn free_subnet(seed: u32) -> u8 {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .expect("run ip addr");
    let used = String::from_utf8_lossy(&out.stdout).into_owned();
    (0..250)
        .map(|k| u8::try_from((seed + k) % 250).expect("below 250"))
        .find(|n| !used.contains(&format!(" {}.{}.{n}.", PREFIX[0], PREFIX[1])))
        .expect("a free 10.213.N.0/24")
}

/// Runs `ip ARGS`; panics with its error output when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ip {args:?}: {e} (apt-get install iproute2)"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
