//! The CPUs and memory this process may use, for `--workers auto` and the memory check at start-up: the
//! affinity mask, and from its cgroups (v1 controllers or the v2 hierarchy) the cpuset, the CPU quota and the
//! memory limit, each quota or limit taken from the cgroup or whichever ancestor sets the smallest. Part of the
//! foundation: it reads files, from a root path the tests replace with a fake tree, and parses them with pure
//! functions.

use std::path::{Path, PathBuf};

/// Above this a v1 `memory.limit_in_bytes` means "no limit" (the kernel writes `PAGE_COUNTER_MAX` pages,
/// 9223372036854771712 on 4 KiB pages, and the exact value depends on the page size).
const V1_NO_MEMORY_LIMIT: u64 = 1 << 60;

/// How many CPUs this process may use, and what set that number.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Cpus {
    pub(crate) count: usize,
    /// What gave `count`, as the start-up line says it: `cpu quota 200000/100000`, `cpuset 0-1`,
    /// `affinity 0-3`.
    pub(crate) source: String,
}

/// The CPUs this process may use: the smallest of its affinity mask, its cpuset and its CPU quota (rounded
/// up), at least 1.
pub(crate) fn usable_cpus() -> Cpus {
    let affinity = affinity().unwrap_or_else(|| {
        let n = std::thread::available_parallelism().map_or(1, usize::from);
        (n, format!("{n} CPUs"))
    });
    usable_cpus_at(Path::new("/"), affinity)
}

/// `usable_cpus` with the filesystem at `root` and the affinity mask given (its CPU count and how to say it).
pub(crate) fn usable_cpus_at(root: &Path, affinity: (usize, String)) -> Cpus {
    let groups = Cgroups::read(root);
    // In order of preference among equals: a quota says most about the limit, then a cpuset, then affinity.
    let mut candidates: Vec<Cpus> = Vec::new();
    if let Some(dir) = groups.v1_dir("cpu") {
        let quotas = dir.up().filter_map(|d| {
            let quota = read(&d.join("cpu.cfs_quota_us"))?;
            let period = read(&d.join("cpu.cfs_period_us"))?;
            parse_cfs(&quota, &period)
        });
        candidates.extend(quotas.map(Quota::candidate));
    }
    if let Some(dir) = groups.v2_dir() {
        let quotas = dir.up().filter_map(|d| parse_cpu_max(&read(&d.join("cpu.max"))?));
        candidates.extend(quotas.map(Quota::candidate));
    }
    if let Some(dir) = groups.v1_dir("cpuset") {
        let text = read(&dir.join("cpuset.effective_cpus")).or_else(|| read(&dir.join("cpuset.cpus")));
        candidates.extend(text.and_then(|t| cpuset_candidate(&t)));
    }
    if let Some(dir) = groups.v2_dir() {
        candidates.extend(read(&dir.join("cpuset.cpus.effective")).and_then(|t| cpuset_candidate(&t)));
    }
    candidates.push(Cpus {
        count: affinity.0.max(1),
        source: format!("affinity {}", affinity.1),
    });
    // The first of the smallest.
    candidates
        .into_iter()
        .reduce(|best, next| if next.count < best.count { next } else { best })
        .expect("the affinity mask is always a candidate")
}

/// The smallest memory limit of this process's cgroup and its ancestors, in bytes; `None` without one.
pub(crate) fn memory_limit() -> Option<u64> {
    memory_limit_at(Path::new("/"))
}

pub(crate) fn memory_limit_at(root: &Path) -> Option<u64> {
    let groups = Cgroups::read(root);
    let v1 = groups.v1_dir("memory").map_or_else(Vec::new, |dir| {
        dir.up()
            .filter_map(|d| parse_v1_memory_limit(&read(&d.join("memory.limit_in_bytes"))?))
            .collect()
    });
    let v2 = groups.v2_dir().map_or_else(Vec::new, |dir| {
        dir.up()
            .filter_map(|d| parse_memory_max(&read(&d.join("memory.max"))?))
            .collect()
    });
    v1.into_iter().chain(v2).min()
}

/// A CFS quota: `quota` microseconds of CPU time per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Quota {
    pub(crate) quota: u64,
    pub(crate) period: u64,
}

impl Quota {
    /// The CPUs it allows, rounded up, at least 1.
    pub(crate) fn cpus(self) -> usize {
        usize::try_from(self.quota.div_ceil(self.period))
            .unwrap_or(usize::MAX)
            .max(1)
    }

    fn candidate(self) -> Cpus {
        Cpus {
            count: self.cpus(),
            source: format!("cpu quota {}/{}", self.quota, self.period),
        }
    }
}

/// A cgroup v2 `cpu.max`: `QUOTA PERIOD`, or `max PERIOD` for no quota.
pub(crate) fn parse_cpu_max(text: &str) -> Option<Quota> {
    let mut fields = text.split_whitespace();
    let quota = fields.next()?;
    let period = fields.next().map_or(Some(100_000), |p| p.parse().ok())?;
    if quota == "max" || period == 0 {
        return None;
    }
    Some(Quota {
        quota: quota.parse().ok().filter(|&q| q > 0)?,
        period,
    })
}

/// cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us`; a quota of -1 means none.
pub(crate) fn parse_cfs(quota: &str, period: &str) -> Option<Quota> {
    let quota: i64 = quota.trim().parse().ok()?;
    let period: u64 = period.trim().parse().ok()?;
    if quota <= 0 || period == 0 {
        return None;
    }
    Some(Quota {
        quota: quota as u64,
        period,
    })
}

/// A cgroup v2 `memory.max`: bytes, or `max` for none.
pub(crate) fn parse_memory_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// A cgroup v1 `memory.limit_in_bytes`; the kernel's "unlimited" is a huge number.
pub(crate) fn parse_v1_memory_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok().filter(|&n| n < V1_NO_MEMORY_LIMIT)
}

/// How many CPUs a list like `0-3,8,10-11` names; `None` when it is not one (or is empty).
pub(crate) fn count_cpu_list(text: &str) -> Option<usize> {
    let mut count = 0usize;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => {
                let n = part.parse::<usize>().ok()?;
                (n, n)
            }
        };
        count += last.checked_sub(first)? + 1;
    }
    (count > 0).then_some(count)
}

fn cpuset_candidate(text: &str) -> Option<Cpus> {
    Some(Cpus {
        count: count_cpu_list(text)?,
        source: format!("cpuset {}", text.trim()),
    })
}

/// The CPUs of this process's affinity mask: how many, and as a list (`0-3`).
fn affinity() -> Option<(usize, String)> {
    // SAFETY: `cpu_set_t` is a plain bit array, valid all zero; sched_getaffinity writes at most its size.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        set
    };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads the bit array `set` in bounds (`cpu` < its size in bits).
    let cpus: Vec<usize> = (0..max).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect();
    (!cpus.is_empty()).then(|| (cpus.len(), cpu_list(&cpus)))
}

/// `[0, 1, 2, 5]` as `0-2,5`.
fn cpu_list(cpus: &[usize]) -> String {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for &cpu in cpus {
        match ranges.last_mut() {
            Some((_, last)) if *last + 1 == cpu => *last = cpu,
            _ => ranges.push((cpu, cpu)),
        }
    }
    let parts: Vec<String> = ranges
        .iter()
        .map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
        .collect();
    parts.join(",")
}

/// This process's cgroups: what `/proc/self/cgroup` says it belongs to, and where `/proc/self/mountinfo`
/// says each hierarchy is mounted, under `root`.
struct Cgroups {
    root: PathBuf,
    memberships: Vec<Membership>,
    mounts: Vec<Mount>,
}

/// One line of `/proc/self/cgroup`: `ID:CONTROLLERS:PATH`; v2 is `0::PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Membership {
    pub(crate) controllers: Vec<String>,
    pub(crate) path: String,
}

/// A cgroup filesystem of `/proc/self/mountinfo`: the hierarchy's directory it shows (`root`), where, and
/// which v1 controllers (none for v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    pub(crate) root: String,
    pub(crate) mount_point: String,
    pub(crate) v2: bool,
    pub(crate) controllers: Vec<String>,
}

impl Cgroups {
    fn read(root: &Path) -> Cgroups {
        let memberships = read(&root.join("proc/self/cgroup")).map_or_else(Vec::new, |t| parse_proc_cgroup(&t));
        let mounts = read(&root.join("proc/self/mountinfo")).map_or_else(Vec::new, |t| parse_mountinfo(&t));
        Cgroups {
            root: root.to_path_buf(),
            memberships,
            mounts,
        }
    }

    fn v1_mount(&self, controller: &str) -> Option<&Mount> {
        self.mounts
            .iter()
            .find(|m| !m.v2 && m.controllers.iter().any(|c| c == controller))
    }

    fn v2_mount(&self) -> Option<&Mount> {
        self.mounts.iter().find(|m| m.v2)
    }

    /// The directory of this process's cgroup in the v1 hierarchy of `controller`.
    fn v1_dir(&self, controller: &str) -> Option<Dir> {
        let member = self
            .memberships
            .iter()
            .find(|m| m.controllers.iter().any(|c| c == controller))?;
        Some(self.dir(self.v1_mount(controller)?, &member.path))
    }

    /// The directory of this process's cgroup in the v2 hierarchy.
    fn v2_dir(&self) -> Option<Dir> {
        let member = self.memberships.iter().find(|m| m.controllers.is_empty())?;
        Some(self.dir(self.v2_mount()?, &member.path))
    }

    /// Where `path` (relative to the hierarchy's root) is under `mount`. A path outside the mounted part (a
    /// container that sees its host's paths) is the mount point itself: the closest one can read.
    fn dir(&self, mount: &Mount, path: &str) -> Dir {
        let inside = if mount.root == "/" {
            Some(path)
        } else {
            path.strip_prefix(&mount.root)
                .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        let base = self.root.join(mount.mount_point.trim_start_matches('/'));
        let mut leaf = base.clone();
        for part in inside.unwrap_or("").split('/').filter(|p| !p.is_empty() && *p != "..") {
            leaf.push(part);
        }
        Dir { leaf, base }
    }
}

/// A cgroup's directory, and the mount point of its hierarchy above which its ancestors cannot be read.
struct Dir {
    leaf: PathBuf,
    base: PathBuf,
}

impl Dir {
    fn join(&self, file: &str) -> PathBuf {
        self.leaf.join(file)
    }

    /// The cgroup and its ancestors up to the hierarchy's mount point, innermost first.
    fn up(&self) -> impl Iterator<Item = &Path> {
        self.leaf.ancestors().take_while(|d| d.starts_with(&self.base))
    }
}

/// `/proc/self/cgroup`'s lines.
pub(crate) fn parse_proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let _id = fields.next()?;
            let controllers = fields.next()?;
            let path = fields.next()?;
            Some(Membership {
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                path: path.to_owned(),
            })
        })
        .collect()
}

/// The cgroup mounts of `/proc/self/mountinfo`: `ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - TYPE
/// SOURCE SUPER_OPTIONS`, paths with spaces and the like written as octal escapes.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let fields: Vec<&str> = mount.split(' ').collect();
            let (root, mount_point) = (*fields.get(3)?, *fields.get(4)?);
            let mut fs = fs.split(' ');
            let fstype = fs.next()?;
            let _source = fs.next();
            let options = fs.next().unwrap_or("");
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            let controllers = if v2 {
                Vec::new()
            } else {
                options.split(',').map(str::to_owned).collect()
            };
            Some(Mount {
                root: unescape(root),
                mount_point: unescape(mount_point),
                v2,
                controllers,
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST_CPUS: (usize, &str) = (64, "0-63");

    /// A fake root: `files` relative to it, each with its content.
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let path = root.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        root
    }

    fn cpus(root: &tempfile::TempDir) -> Cpus {
        usable_cpus_at(root.path(), (HOST_CPUS.0, HOST_CPUS.1.to_owned()))
    }

    const V2_MOUNT: &str = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn cpu_max_reads_a_quota_and_max_means_none() {
        assert_eq!(
            parse_cpu_max("200000 100000\n"),
            Some(Quota {
                quota: 200_000,
                period: 100_000
            })
        );
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000").unwrap().cpus(), 2, "rounded up");
        assert_eq!(parse_cpu_max("5000 100000").unwrap().cpus(), 1, "at least one");
        assert_eq!(
            parse_cpu_max("50000").unwrap().period,
            100_000,
            "the period defaults to 100 ms"
        );
        assert_eq!(parse_cpu_max("nonsense 100000"), None);
        assert_eq!(parse_cpu_max("100 0"), None);
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("100000\n", "100000\n").unwrap().cpus(), 1);
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(parse_memory_max("536870912\n"), Some(512 << 20));
        assert_eq!(parse_v1_memory_limit("9223372036854771712\n"), None);
        assert_eq!(parse_v1_memory_limit("104857600\n"), Some(100 << 20));
    }

    #[test]
    fn cpu_lists_count_ranges_and_singles() {
        assert_eq!(count_cpu_list("0-3,8,10-11\n"), Some(7));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("a-b"), None);
        assert_eq!(cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
    }

    #[test]
    fn mountinfo_names_cgroup_mounts_with_their_controllers_and_escapes() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n\
                    41 31 0:38 / /sys/fs/cgroup/with\\040space rw - cgroup2 cgroup2 rw\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].root, "/docker/abc");
        assert_eq!(mounts[0].controllers, ["rw", "cpu", "cpuacct"]);
        assert!(!mounts[0].v2);
        assert_eq!(mounts[1].mount_point, "/sys/fs/cgroup/with space");
        assert!(mounts[1].v2);
        let groups = parse_proc_cgroup("4:cpu,cpuacct:/docker/abc\n0::/user.slice/a:b\n");
        assert_eq!(groups[0].controllers, ["cpu", "cpuacct"]);
        assert_eq!(groups[1].controllers, Vec::<String>::new());
        assert_eq!(groups[1].path, "/user.slice/a:b", "a colon in the path is kept");
    }

    #[test]
    fn a_v2_quota_on_an_ancestor_limits_the_leaf() {
        let root = tree(&[
            ("proc/self/cgroup", "0::/kubepods.slice/pod1/ctr\n"),
            ("proc/self/mountinfo", V2_MOUNT),
            ("sys/fs/cgroup/kubepods.slice/cpu.max", "max 100000\n"),
            ("sys/fs/cgroup/kubepods.slice/pod1/cpu.max", "250000 100000\n"),
            ("sys/fs/cgroup/kubepods.slice/pod1/ctr/cpu.max", "max 100000\n"),
        ]);
        let found = cpus(&root);
        assert_eq!(found.count, 3);
        assert_eq!(found.source, "cpu quota 250000/100000");
    }

    #[test]
    fn the_smallest_of_quota_cpuset_and_affinity_wins() {
        let root = tree(&[
            ("proc/self/cgroup", "0::/app\n"),
            ("proc/self/mountinfo", V2_MOUNT),
            ("sys/fs/cgroup/cpu.max", "800000 100000\n"),
            ("sys/fs/cgroup/app/cpu.max", "400000 100000\n"),
            ("sys/fs/cgroup/app/cpuset.cpus.effective", "2-3\n"),
        ]);
        assert_eq!(
            cpus(&root),
            Cpus {
                count: 2,
                source: "cpuset 2-3".into()
            }
        );
        let none = tree(&[
            ("proc/self/cgroup", "0::/app\n"),
            ("proc/self/mountinfo", V2_MOUNT),
            ("sys/fs/cgroup/app/cpu.max", "max 100000\n"),
        ]);
        assert_eq!(
            cpus(&none),
            Cpus {
                count: 64,
                source: "affinity 0-63".into()
            }
        );
        let empty = tree(&[]);
        assert_eq!(cpus(&empty).count, 64, "no /proc: the affinity mask");
        assert_eq!(
            usable_cpus_at(empty.path(), (0, String::new())).count,
            1,
            "at least one"
        );
    }

    #[test]
    fn v1_hierarchies_are_read_below_their_mount_root() {
        let root = tree(&[
            (
                "proc/self/cgroup",
                "5:cpuset:/docker/abc\n4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n",
            ),
            (
                "proc/self/mountinfo",
                "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                 33 31 0:30 /docker/abc /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n\
                 34 31 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
            ),
            ("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "150000\n"),
            ("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n"),
            ("sys/fs/cgroup/cpuset/cpuset.effective_cpus", "0-3\n"),
            ("sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"),
            ("sys/fs/cgroup/memory/docker/memory.limit_in_bytes", "1073741824\n"),
            ("sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", "2147483648\n"),
        ]);
        assert_eq!(
            cpus(&root),
            Cpus {
                count: 2,
                source: "cpu quota 150000/100000".into()
            }
        );
        assert_eq!(
            memory_limit_at(root.path()),
            Some(1 << 30),
            "the parent's smaller limit"
        );
    }

    #[test]
    fn v2_memory_max_walks_the_ancestors_and_max_means_none() {
        let root = tree(&[
            ("proc/self/cgroup", "0::/a/b\n"),
            ("proc/self/mountinfo", V2_MOUNT),
            ("sys/fs/cgroup/a/memory.max", "max\n"),
            ("sys/fs/cgroup/a/b/memory.max", "max\n"),
        ]);
        assert_eq!(memory_limit_at(root.path()), None);
        std::fs::write(root.path().join("sys/fs/cgroup/a/memory.max"), "268435456\n").unwrap();
        assert_eq!(memory_limit_at(root.path()), Some(256 << 20));
    }
}
