//! A process deployment's resource limits: one cgroup per deployment in each controller that
//! enforces one (memory, pids, cpu), with the limits written before the server runs.
//!
//! Each controller comes from cgroup v2 where our v2 cgroup is offered it (the deployment's
//! tree-tracking cgroup then carries `memory.max`, `pids.max`, `cpu.max`), else from the v1
//! hierarchy that has it: hybrid hosts, whose v2 tree has no controllers, keep v2 for
//! membership and put limits in `<v1 mount>/<own v1 cgroup>/switchboard/<node id>/<deployment
//! id>` (`memory.limit_in_bytes` and `memory.memsw.limit_in_bytes`, `pids.max`,
//! `cpu.cfs_quota_us`). A controller found in neither makes a limited deployment fail, naming
//! it: limits are never silently ignored.
//!
//! The launch shim joins the v1 groups (like the v2 one) before it execs the server, so no
//! instant of the server runs unlimited and every descendant inherits them. Killed by the
//! kernel for its memory shows as the memory group's `oom_kill` counter going up.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use uuid::Uuid;

use super::{
    ExitInfo,
    cgroup::{self},
    limits::{Bytes, Limits},
};

/// The controllers a tool's limits need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Whether `limits` sets what this controller enforces.
    fn needed_by(self, limits: &Limits) -> bool {
        match self {
            Controller::Memory => limits.memory.is_some(),
            Controller::Pids => limits.pids.is_some(),
            Controller::Cpu => limits.cpus.is_some(),
        }
    }
}

/// Why a tool's limits cannot be set up for a deployment.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error(
        "the tool's {controller} limit cannot be enforced on this host ({why}); limits are \
         never ignored, so the deployment is not started: remove the limit or run Switchboard \
         where the {controller} cgroup controller is available"
    )]
    Missing {
        controller: &'static str,
        why: String,
    },
    #[error("cannot set up the deployment's cgroup {path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("cpus: {0} is less CPU time than the kernel can enforce (at least 0.001)")]
    TooFewCpus(f64),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LimitError + '_ {
    move |error| LimitError::Io {
        path: path.to_owned(),
        error,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// Where one controller's deployment groups are: `base/<deployment id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    version: Version,
    /// `.../switchboard/<node id>`; for v2, the tree-tracking root itself.
    base: PathBuf,
}

/// Where this node limits process deployments, per controller (or why it cannot).
#[derive(Debug, Clone)]
pub struct LimitGroups {
    places: [Result<Place, String>; 3],
}

/// The v1 hierarchy that has `controller`, from /proc/self/mountinfo and /proc/self/cgroup:
/// the directory of our own cgroup in it.
fn v1_own_dir(mountinfo: &str, self_cgroup: &str, controller: &str) -> Option<PathBuf> {
    let has = |list: &str| list.split(',').any(|c| c == controller);
    let (root, mount) = mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> <source> <opts>"
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split_whitespace();
        let (fstype, _source, opts) = (r.next()?, r.next()?, r.next()?);
        if fstype != "cgroup" || !has(opts) {
            return None;
        }
        let mut l = left.split_whitespace();
        Some((l.nth(3)?, l.next()?))
    })?;
    // "<n>:<controllers>:<path>", the path as seen from the mount's root.
    let own = self_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
        has(names).then_some(path)
    })?;
    let rel = own
        .strip_prefix(root)
        .unwrap_or(own)
        .trim_start_matches('/');
    Some(Path::new(mount).join(rel))
}

/// Makes `controller` available to the deployments under the v2 node directory `node`: it must
/// be offered to our own cgroup and enabled from there down (`+memory` in each
/// `cgroup.subtree_control`). The kernel refuses that where our cgroup holds processes and is
/// not the root (the "no internal processes" rule), which is then the reason given.
fn enable_v2(node: &Path, controller: &str) -> Result<(), String> {
    let switchboard = node.parent().ok_or("no parent")?;
    let own = switchboard.parent().ok_or("no parent")?;
    let offered = std::fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default();
    if !offered.split_whitespace().any(|c| c == controller) {
        return Err(format!(
            "cgroup v2 does not offer it to {} (cgroup.controllers: \"{}\")",
            own.display(),
            offered.trim()
        ));
    }
    for dir in [own, switchboard, node] {
        let control = dir.join("cgroup.subtree_control");
        let on = std::fs::read_to_string(&control).unwrap_or_default();
        if on.split_whitespace().any(|c| c == controller) {
            continue;
        }
        std::fs::write(&control, format!("+{controller}"))
            .map_err(|e| format!("cannot enable it in {}: {e}", control.display()))?;
    }
    Ok(())
}

impl LimitGroups {
    /// Finds each controller: v2 under `v2_node` (the tree-tracking root, where there is one),
    /// else v1. Creates nothing in v1 until a limited deployment starts.
    pub fn detect(node_id: &str, v2_node: Option<&Path>) -> LimitGroups {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let self_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Self::detect_from(&mountinfo, &self_cgroup, node_id, v2_node)
    }

    fn detect_from(
        mountinfo: &str,
        self_cgroup: &str,
        node_id: &str,
        v2_node: Option<&Path>,
    ) -> LimitGroups {
        let place = |c: Controller| {
            let v2 = match v2_node {
                Some(node) => match enable_v2(node, c.name()) {
                    Ok(()) => {
                        return Ok(Place {
                            version: Version::V2,
                            base: node.to_owned(),
                        });
                    }
                    Err(why) => why,
                },
                None => "no cgroup v2 tree is used here".to_owned(),
            };
            match v1_own_dir(mountinfo, self_cgroup, c.name()) {
                Some(own) => Ok(Place {
                    version: Version::V1,
                    base: own.join("switchboard").join(node_id),
                }),
                None => Err(format!("{v2}, and no cgroup v1 hierarchy has it mounted")),
            }
        };
        LimitGroups {
            places: Controller::ALL.map(place),
        }
    }

    /// No controller at all, for a runtime that must refuse every limit.
    pub fn unavailable(why: &str) -> LimitGroups {
        LimitGroups {
            places: Controller::ALL.map(|_| Err(why.to_owned())),
        }
    }

    fn place(&self, c: Controller) -> Result<&Place, &String> {
        self.places[c.index()].as_ref()
    }

    /// The v1 directories deployment groups live under (one per hierarchy).
    fn v1_bases(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = Vec::new();
        for p in self.places.iter().flatten() {
            if p.version == Version::V1 && !out.contains(&p.base.as_path()) {
                out.push(&p.base);
            }
        }
        out
    }

    /// What the startup log says: where each controller comes from.
    pub fn describe(&self) -> String {
        Controller::ALL
            .iter()
            .map(|c| match self.place(*c) {
                Ok(p) => format!(
                    "{} (cgroup {})",
                    c.name(),
                    if p.version == Version::V1 { "v1" } else { "v2" }
                ),
                Err(_) => format!("no {}", c.name()),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether every limit `limits` sets can be enforced here; the error names the first
    /// controller missing and why.
    pub fn check(&self, limits: &Limits) -> Result<(), LimitError> {
        for c in Controller::ALL {
            if c.needed_by(limits)
                && let Err(why) = self.place(c)
            {
                return Err(LimitError::Missing {
                    controller: c.name(),
                    why: why.clone(),
                });
            }
        }
        Ok(())
    }

    /// Creates deployment `id`'s groups with `limits` written in them, before anything joins
    /// them. `v2_dir` is its tree-tracking cgroup (already created), which v2 limits go into.
    /// A v1 group left from an earlier life is emptied and made again, so no old limit or
    /// counter carries over.
    pub fn create(
        &self,
        id: Uuid,
        limits: &Limits,
        v2_dir: Option<&Path>,
    ) -> Result<Groups, LimitError> {
        self.check(limits)?;
        let mut groups = Groups::default();
        let made = (|| {
            for c in Controller::ALL.into_iter().filter(|c| c.needed_by(limits)) {
                let Ok(place) = self.place(c) else {
                    continue;
                };
                let dir = match place.version {
                    Version::V2 => v2_dir
                        .ok_or_else(|| LimitError::Missing {
                            controller: c.name(),
                            why: "cgroup v2 limits need the deployment's v2 cgroup".into(),
                        })?
                        .to_owned(),
                    Version::V1 => {
                        let dir = place.base.join(id.to_string());
                        if !groups.joined.contains(&dir) {
                            fresh_dir(&dir)?;
                            groups.joined.push(dir.clone());
                        }
                        dir
                    }
                };
                write_limit(c, place.version, &dir, limits)?;
                if let (Controller::Memory, Some(limit)) = (c, limits.memory) {
                    let memory = MemoryGroup {
                        version: place.version,
                        dir,
                        limit,
                        baseline: 0,
                    };
                    groups.memory = Some(MemoryGroup {
                        baseline: memory.oom_kills().unwrap_or(0),
                        ..memory
                    });
                }
            }
            Ok(())
        })();
        if let Err(e) = made {
            groups.remove();
            return Err(e);
        }
        Ok(groups)
    }

    /// The groups deployment `id` already has (an adopted process is still in them, with
    /// their limits), found by name.
    pub fn existing(&self, id: Uuid, v2_dir: Option<&Path>) -> Groups {
        let mut groups = Groups::default();
        for c in Controller::ALL {
            let Ok(place) = self.place(c) else {
                continue;
            };
            let dir = match place.version {
                Version::V1 => place.base.join(id.to_string()),
                Version::V2 => match v2_dir {
                    Some(d) => d.to_owned(),
                    None => continue,
                },
            };
            if !dir.is_dir() {
                continue;
            }
            if place.version == Version::V1 && !groups.joined.contains(&dir) {
                groups.joined.push(dir.clone());
            }
            if c == Controller::Memory {
                let file = match place.version {
                    Version::V1 => "memory.limit_in_bytes",
                    Version::V2 => "memory.max",
                };
                let limit = std::fs::read_to_string(dir.join(file))
                    .ok()
                    .and_then(|t| t.trim().parse::<u64>().ok());
                // An unlimited group reads as "max" (v2) or a number near 2^63 (v1).
                if let Some(limit) = limit.filter(|l| *l < (1 << 62)) {
                    let memory = MemoryGroup {
                        version: place.version,
                        dir,
                        limit: Bytes(limit),
                        baseline: 0,
                    };
                    groups.memory = Some(MemoryGroup {
                        baseline: memory.oom_kills().unwrap_or(0),
                        ..memory
                    });
                }
            }
        }
        groups
    }

    /// Kills and removes every v1 deployment group under this node whose deployment `held`
    /// does not name (what an earlier Switchboard left), and returns the ids of those that
    /// still had processes.
    pub async fn sweep(&self, held: impl Fn(Uuid) -> bool) -> Vec<Uuid> {
        let mut swept = Vec::new();
        for base in self.v1_bases() {
            for (id, dir) in children(base) {
                if held(id) {
                    continue;
                }
                if !cgroup::procs(&dir).unwrap_or_default().is_empty() && !swept.contains(&id) {
                    swept.push(id);
                }
                if let Err(e) = cgroup::kill_and_remove(&dir).await {
                    tracing::warn!(deployment = %id, dir = %dir.display(), error = %e,
                        "Could not remove an orphaned limit cgroup");
                }
            }
        }
        swept
    }

    /// Removes the node's v1 directories, and `switchboard/` above them, where empty (at exit).
    pub fn release(&self) {
        for base in self.v1_bases() {
            for dir in [Some(base), base.parent()].into_iter().flatten() {
                if cgroup::remove(dir).is_err() {
                    break;
                }
            }
        }
    }

    /// Kills every process in this node's v1 groups and removes them with the node's
    /// directories (for a harness cleaning up after a Switchboard that did not exit cleanly).
    pub fn remove_all_blocking(&self) {
        for base in self.v1_bases() {
            for (_, dir) in children(base) {
                let _ = cgroup::kill_and_remove_blocking(&dir);
            }
        }
        self.release();
    }
}

/// Deployment groups under a node directory.
fn children(base: &Path) -> Vec<(Uuid, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let id = Uuid::parse_str(e.file_name().to_str()?).ok()?;
            Some((id, e.path()))
        })
        .collect()
}

/// A new, empty group at `dir` (its parents made as needed); one left over is emptied and
/// removed first.
fn fresh_dir(dir: &Path) -> Result<(), LimitError> {
    if dir.is_dir() {
        let _ = cgroup::kill_all(dir);
        cgroup::remove(dir).map_err(io_err(dir))?;
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))
}

/// The CFS quota and period (microseconds) that give `cpus` CPUs: a 100 ms period, or 1 s
/// where the quota would be below the kernel's 1 ms minimum.
pub fn cpu_quota(cpus: f64) -> Result<(u64, u64), LimitError> {
    for period in [100_000u64, 1_000_000] {
        let quota = (cpus * period as f64).round();
        if quota >= 1000.0 {
            return Ok((quota as u64, period));
        }
    }
    Err(LimitError::TooFewCpus(cpus))
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), LimitError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(io_err(&path))
}

/// Writes controller `c`'s part of `limits` into `dir`.
fn write_limit(c: Controller, v: Version, dir: &Path, limits: &Limits) -> Result<(), LimitError> {
    match (c, v) {
        (Controller::Memory, _) => {
            let Some(m) = limits.memory else {
                return Ok(());
            };
            let bytes = m.0.to_string();
            let (limit, swap, swap_value) = match v {
                Version::V1 => (
                    "memory.limit_in_bytes",
                    "memory.memsw.limit_in_bytes",
                    bytes.as_str(),
                ),
                Version::V2 => ("memory.max", "memory.swap.max", "0"),
            };
            write(dir, limit, &bytes)?;
            // Memory and swap together, so swap cannot dodge the limit; a kernel without swap
            // accounting has no such file, and then there is nothing to dodge through.
            if dir.join(swap).exists() {
                write(dir, swap, swap_value)?;
            }
            Ok(())
        }
        (Controller::Pids, _) => match limits.pids {
            Some(p) => write(dir, "pids.max", &p.to_string()),
            None => Ok(()),
        },
        (Controller::Cpu, _) => {
            let Some(cpus) = limits.cpus else {
                return Ok(());
            };
            let (quota, period) = cpu_quota(cpus)?;
            match v {
                Version::V1 => {
                    write(dir, "cpu.cfs_period_us", &period.to_string())?;
                    write(dir, "cpu.cfs_quota_us", &quota.to_string())
                }
                Version::V2 => write(dir, "cpu.max", &format!("{quota} {period}")),
            }
        }
    }
}

/// Where a deployment's kills for memory are counted.
#[derive(Debug, Clone)]
struct MemoryGroup {
    version: Version,
    dir: PathBuf,
    limit: Bytes,
    /// The counter when the deployment started (or was adopted).
    baseline: u64,
}

impl MemoryGroup {
    /// The group's `oom_kill` counter (`memory.oom_control` in v1, `memory.events` in v2), or
    /// on a v1 kernel without it (before 4.13) the times the limit was hit (`memory.failcnt`).
    fn oom_kills(&self) -> Option<u64> {
        let file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        let text = std::fs::read_to_string(self.dir.join(file)).ok()?;
        let counter = text.lines().find_map(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|n| n.trim().parse().ok())
        });
        counter.or_else(|| {
            (self.version == Version::V1)
                .then(|| std::fs::read_to_string(self.dir.join("memory.failcnt")).ok())
                .flatten()
                .and_then(|t| t.trim().parse().ok())
        })
    }
}

/// One deployment's limit groups.
#[derive(Debug, Clone, Default)]
pub struct Groups {
    /// The v1 groups the launch joins (one per hierarchy); v2 limits are in the tree-tracking
    /// cgroup, which the launch joins anyway.
    joined: Vec<PathBuf>,
    memory: Option<MemoryGroup>,
}

impl Groups {
    /// The `cgroup.procs` files the launch shim writes its pid into before the exec.
    pub fn procs_files(&self) -> impl Iterator<Item = PathBuf> + '_ {
        self.joined.iter().map(|d| d.join("cgroup.procs"))
    }

    /// The memory limit, if the kernel killed the instance for exceeding it: its main process
    /// ended by SIGKILL (or how is unknown, for an adopted one) while the group's kill counter
    /// went up. Read before the groups are removed; the counter is raised as the kernel sends
    /// the kill, so a short wait covers the last instants of a race with the exit.
    pub async fn oom_limit(&self, exit: &ExitInfo) -> Option<Bytes> {
        let memory = self.memory.as_ref()?;
        let killed = match (exit.code, exit.signal) {
            (_, Some(s)) => s == nix::sys::signal::Signal::SIGKILL as i32,
            (None, None) => true,
            (Some(_), None) => false,
        };
        if !killed {
            return None;
        }
        for _ in 0..10 {
            if memory.oom_kills().is_some_and(|n| n > memory.baseline) {
                return Some(memory.limit);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }

    /// Removes the v1 groups, once the deployment's tree is gone (what is left is killed).
    pub fn remove(&self) {
        for dir in &self.joined {
            if !cgroup::procs(dir).unwrap_or_default().is_empty() {
                let _ = cgroup::kill_all(dir);
            }
            if let Err(e) = cgroup::remove(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "Could not remove a limit cgroup");
            }
        }
    }

    /// The v1 groups, for tests and diagnostics.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 /outer /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";

    const SELF: &str = "\
8:pids:/
4:memory:/outer/box
2:cpu,cpuacct:/svc
0::/";

    #[test]
    fn v1_controllers_are_found_in_their_hierarchies_under_our_own_cgroup() {
        let g = LimitGroups::detect_from(HYBRID_MOUNTS, SELF, "n1", None);
        let base = |c| g.place(c).unwrap().base.clone();
        // The mount's root is cut from our path (a container sees its own cgroup as the root).
        assert_eq!(
            base(Controller::Memory),
            Path::new("/sys/fs/cgroup/memory/box/switchboard/n1")
        );
        assert_eq!(
            base(Controller::Pids),
            Path::new("/sys/fs/cgroup/pids/switchboard/n1")
        );
        assert_eq!(
            base(Controller::Cpu),
            Path::new("/sys/fs/cgroup/cpu,cpuacct/svc/switchboard/n1")
        );
        assert_eq!(
            g.describe(),
            "memory (cgroup v1), pids (cgroup v1), cpu (cgroup v1)"
        );
    }

    #[test]
    fn a_limit_no_controller_enforces_is_refused_naming_the_controller() {
        let no_pids = HYBRID_MOUNTS
            .lines()
            .filter(|l| !l.contains("pids"))
            .collect::<Vec<_>>()
            .join("\n");
        let g = LimitGroups::detect_from(&no_pids, SELF, "n1", None);
        let memory_only = Limits {
            memory: Some(Bytes(64 << 20)),
            ..Limits::default()
        };
        assert!(g.check(&memory_only).is_ok());
        let err = g
            .check(&Limits {
                pids: Some(16),
                ..memory_only
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pids limit cannot be enforced") && err.contains("no cgroup v1"),
            "{err}"
        );
        // Creating is refused the same way, before anything is made.
        let err = g
            .create(
                Uuid::new_v4(),
                &Limits {
                    pids: Some(16),
                    ..memory_only
                },
                None,
            )
            .unwrap_err();
        assert!(matches!(
            err,
            LimitError::Missing {
                controller: "pids",
                ..
            }
        ));
    }

    #[test]
    fn v2_is_used_where_our_cgroup_is_offered_the_controller() {
        // A v2 tree in a directory: the files the kernel would have, as plain files.
        let own = tempfile::tempdir().unwrap();
        let node = own.path().join("switchboard").join("n1");
        std::fs::create_dir_all(&node).unwrap();
        std::fs::write(own.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let g = LimitGroups::detect_from("", "0::/", "n1", Some(&node));
        for c in Controller::ALL {
            assert_eq!(g.place(c).unwrap().version, Version::V2, "{c:?}");
        }
        assert_eq!(
            std::fs::read_to_string(node.join("cgroup.subtree_control")).unwrap(),
            "+cpu",
            "the last controller enabled (a plain file keeps only the last write)"
        );
        let dep = node.join("d");
        std::fs::create_dir(&dep).unwrap();
        std::fs::write(dep.join("memory.swap.max"), "max").unwrap();
        let limits = Limits {
            memory: Some(Bytes(32 << 20)),
            cpus: Some(0.5),
            pids: Some(64),
        };
        let groups = g.create(Uuid::new_v4(), &limits, Some(&dep)).unwrap();
        let read = |f: &str| std::fs::read_to_string(dep.join(f)).unwrap();
        assert_eq!(read("memory.max"), (32u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("pids.max"), "64");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert!(groups.dirs().is_empty(), "v2 limits need no extra group");
    }

    #[test]
    fn cpus_become_a_cfs_quota() {
        assert_eq!(cpu_quota(0.5).unwrap(), (50_000, 100_000));
        assert_eq!(cpu_quota(2.0).unwrap(), (200_000, 100_000));
        assert_eq!(cpu_quota(0.005).unwrap(), (5_000, 1_000_000));
        assert!(cpu_quota(0.0001).is_err());
    }
}
