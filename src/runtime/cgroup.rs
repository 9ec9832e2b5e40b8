//! One cgroup (v2) per deployment: the only reliable handle on a whole process tree.
//!
//! A process group misses descendants that call `setsid()`, and re-parenting loses the tree
//! shape once an intermediate process exits. A cgroup keeps every descendant, whatever it does,
//! and `cgroup.kill` ends them all atomically. Tracking needs no controllers, only
//! membership, which is why this works on hosts whose v2 hierarchy exposes no controllers
//! (limits, which do need them, are [`super::cgroup_limits`]'s).
//!
//! Layout: `<our cgroup>/switchboard/<node id>/<deployment id>`. The node id keeps two
//! Switchboard instances on one host (tests run many) out of each other's deployments.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct CgroupRoot {
    base: PathBuf,
}

/// The mount point of the cgroup2 hierarchy, from `/proc/self/mountinfo`.
fn cgroup2_mount() -> io::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> <source> <opts>"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mount) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mount));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no cgroup2 hierarchy is mounted",
    ))
}

/// This process's cgroup in the v2 hierarchy, from `/proc/self/cgroup` ("0::/path").
fn own_cgroup() -> io::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim_start_matches('/')))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not in a cgroup2 hierarchy"))
}

impl CgroupRoot {
    /// Where this node's cgroup directory is (or would be), without creating it.
    pub fn locate(node_id: &str) -> io::Result<PathBuf> {
        Ok(cgroup2_mount()?
            .join(own_cgroup()?)
            .join("switchboard")
            .join(node_id))
    }

    /// Finds (creating) this node's cgroup directory, or says why there can be none.
    pub fn detect(node_id: &str) -> io::Result<CgroupRoot> {
        let base = Self::locate(node_id)?;
        std::fs::create_dir_all(&base)?;
        if !base.join("cgroup.procs").exists() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{} is not a cgroup directory", base.display()),
            ));
        }
        Ok(CgroupRoot { base })
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    pub fn path(&self, id: Uuid) -> PathBuf {
        self.base.join(id.to_string())
    }

    /// Creates the deployment's cgroup; one left from an earlier life is emptied first.
    pub fn create(&self, id: Uuid) -> io::Result<PathBuf> {
        let dir = self.path(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                kill_all(&dir)?;
                Ok(dir)
            }
            Err(e) => Err(e),
        }
    }

    /// Removes this node's directory, and the `switchboard` one above it, where they are empty:
    /// at exit, so a host does not collect one empty directory per Switchboard that ever ran.
    /// A directory that still holds deployments (exit policy `keep`) or other nodes stays; the
    /// kernel refuses to remove a cgroup with children, so there is no check-then-act race.
    pub fn release(&self) {
        for dir in [Some(self.base.as_path()), self.base.parent()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = remove(dir) {
                // EBUSY / ENOTEMPTY: still in use, which is the expected case under `keep`.
                tracing::debug!(dir = %dir.display(), error = %e, "cgroup directory kept");
                return;
            }
        }
    }

    /// Deployment cgroups that exist under this node.
    pub fn children(&self) -> io::Result<Vec<(Uuid, PathBuf)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.base)? {
            let entry = entry?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| Uuid::parse_str(n).ok())
            {
                out.push((id, entry.path()));
            }
        }
        Ok(out)
    }
}

/// Live members of the cgroup (exited processes are no longer listed, reaped or not).
pub fn procs(dir: &Path) -> io::Result<Vec<u32>> {
    let text = match std::fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

pub fn signal_all(dir: &Path, sig: Signal) -> io::Result<()> {
    for pid in procs(dir)? {
        let Ok(pid) = i32::try_from(pid) else {
            continue;
        };
        // ESRCH: it exited between the read and the signal, which is what we want anyway.
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
    }
    Ok(())
}

/// SIGKILL to every member, atomically where the kernel has `cgroup.kill` (5.14+).
pub fn kill_all(dir: &Path) -> io::Result<()> {
    let kill_file = dir.join("cgroup.kill");
    if kill_file.exists() {
        return std::fs::write(kill_file, "1");
    }
    // Older kernels: repeat until empty, since members may fork while we iterate.
    for _ in 0..100 {
        if procs(dir)?.is_empty() {
            return Ok(());
        }
        signal_all(dir, Signal::SIGKILL)?;
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// SIGKILLs what is left in a cgroup, waits (a second at most) for it to empty, removes it.
pub async fn kill_and_remove(dir: &Path) -> io::Result<()> {
    kill_all(dir)?;
    for _ in 0..200 {
        if procs(dir)?.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    remove(dir)
}

/// [`kill_and_remove`] for a caller outside any runtime (a test harness cleaning up).
pub fn kill_and_remove_blocking(dir: &Path) -> io::Result<()> {
    kill_all(dir)?;
    for _ in 0..500 {
        if procs(dir)?.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    remove(dir)
}

/// Removes an empty cgroup; a missing one is fine.
pub fn remove(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
