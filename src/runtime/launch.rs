//! The launch shim: `switchboard __launch [--join CGROUP_PROCS]... [--log PATH MAX_BYTES KEEP]
//! -- <program> <args...>`, and the log writer it starts, `switchboard __log PATH MAX_BYTES KEEP`.
//!
//! A child must be in its deployment's cgroups (the v2 one that tracks its tree, and the v1
//! ones that hold its limits) *before* it can fork or allocate, or a fast-forking server
//! could leave a grandchild outside. Moving it from the parent after spawn races; a `pre_exec`
//! hook would force std off its posix_spawn fast path (fork+exec copies Switchboard's page
//! tables, which gets slow as its memory grows). So the parent posix_spawns this shim, the shim
//! writes its own pid into the cgroup and execs the server in place: same pid, no race, and the
//! parent keeps the fast path. The shim runs before any runtime or thread starts.
//!
//! With `--log`, the server's stdout and stderr go through a pipe to a log writer that stamps
//! each line with the time and rotates the file at MAX_BYTES, keeping KEEP old files. The
//! writer is started before the shim joins the cgroup and in its own process group, so no
//! stop or kill of the deployment reaches it: it ends when the last process holding the pipe
//! (all of them in the cgroup) is gone, after writing everything they wrote. It ignores
//! SIGTERM/SIGINT for the same reason, and outlives Switchboard like the server does.

use std::{
    ffi::OsString,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The hidden first argument that selects the shim.
pub const SHIM_ARG: &str = "__launch";

/// Whether this process was started as the shim.
pub fn is_shim_invocation() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == SHIM_ARG)
}

/// The hidden first argument that selects the log writer.
pub const LOG_ARG: &str = "__log";

/// Whether this process was started as the log writer.
pub fn is_log_invocation() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == LOG_ARG)
}

fn usage() -> ! {
    eprintln!(
        "switchboard: usage: switchboard {SHIM_ARG} [--join CGROUP_PROCS]... \
         [--log PATH MAX_BYTES KEEP] -- PROGRAM [ARGS...]"
    );
    std::process::exit(127);
}

/// Joins the cgroups and execs the server. Never returns: on failure it explains on stderr
/// (which is the deployment log) and exits 127, which the supervisor reports as a failed start.
pub fn run_shim() -> ! {
    let args: Vec<OsString> = std::env::args_os().skip(2).collect();
    let mut rest = args.as_slice();
    let mut joins = Vec::new();
    let mut log = None;
    loop {
        match rest {
            [flag, procs, tail @ ..] if flag == "--join" => {
                joins.push(procs);
                rest = tail;
            }
            [flag, path, max, keep, tail @ ..] if flag == "--log" => {
                log = Some((path, max, keep));
                rest = tail;
            }
            // The program at least must follow.
            [dashes, _, ..] if dashes == "--" => {
                rest = &rest[1..];
                break;
            }
            _ => usage(),
        }
    }
    let mut server = Command::new(&rest[0]);
    server.args(&rest[1..]);
    if let Some((path, max, keep)) = log {
        // Started first, so it stays out of the cgroups the shim is about to join.
        match start_log_writer(path, max, keep) {
            Ok(pipe) => match pipe.try_clone() {
                Ok(dup) => {
                    server.stdout(dup).stderr(pipe);
                }
                Err(e) => eprintln!("switchboard: logging without timestamps: {e}"),
            },
            Err(e) => eprintln!("switchboard: logging without timestamps: {e}"),
        }
    }
    for procs in joins {
        if let Err(e) = std::fs::write(procs, std::process::id().to_string()) {
            eprintln!(
                "switchboard: cannot join the deployment's cgroup ({}): {e}",
                procs.to_string_lossy()
            );
            std::process::exit(127);
        }
    }
    let err = server.exec();
    eprintln!(
        "switchboard: cannot run '{}': {err}",
        rest[0].to_string_lossy()
    );
    std::process::exit(127);
}

/// Starts `switchboard __log` reading a new pipe; returns the pipe's write end.
fn start_log_writer(
    path: &OsString,
    max: &OsString,
    keep: &OsString,
) -> std::io::Result<std::io::PipeWriter> {
    let (reader, writer) = std::io::pipe()?;
    Command::new(std::env::current_exe()?)
        .arg(LOG_ARG)
        .args([path, max, keep])
        .stdin(reader)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own group, and no inherited environment (the server's secrets stay with it).
        .process_group(0)
        .env_clear()
        .spawn()?;
    Ok(writer)
}

/// The log writer: copies stdin to the log file line by line, each line prefixed with the
/// UTC time it was read, rotating at the size limit. Never returns.
pub fn run_log_writer() -> ! {
    let args: Vec<OsString> = std::env::args_os().skip(2).collect();
    let [path, max, keep] = args.as_slice() else {
        std::process::exit(2);
    };
    let path = PathBuf::from(path);
    let max: u64 = max
        .to_str()
        .and_then(|m| m.parse().ok())
        .unwrap_or(10 << 20);
    let keep: u32 = keep.to_str().and_then(|k| k.parse().ok()).unwrap_or(3);
    // A stop's SIGTERM is for the server; this process ends at end of input. tokio's signal
    // handling is the safe way to stop the default action.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build();
    let _guards = rt.as_ref().ok().map(|rt| {
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            (
                signal(SignalKind::terminate()).ok(),
                signal(SignalKind::interrupt()).ok(),
                signal(SignalKind::hangup()).ok(),
            )
        })
    });
    let code = match copy_lines(std::io::stdin().lock(), &path, max, keep) {
        Ok(()) => 0,
        Err(_) => 1,
    };
    std::process::exit(code);
}

/// The copy loop, apart for testing: `input` to `path` with timestamps and rotation.
pub fn copy_lines(
    mut input: impl std::io::BufRead,
    path: &Path,
    max: u64,
    keep: u32,
) -> std::io::Result<()> {
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
    };
    let mut file = open(path)?;
    let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        let stamp = chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%S%.3fZ ")
            .to_string();
        if size > 0 && size + (stamp.len() + line.len()) as u64 > max {
            rotate(path, keep)?;
            file = open(path)?;
            size = 0;
        }
        // One write per line, so a reader never sees half a stamp.
        let mut out = Vec::with_capacity(stamp.len() + line.len());
        out.extend_from_slice(stamp.as_bytes());
        out.extend_from_slice(&line);
        file.write_all(&out)?;
        size += out.len() as u64;
    }
}

/// `log` → `log.1` → ... → `log.KEEP` (the oldest dropped).
fn rotate(path: &Path, keep: u32) -> std::io::Result<()> {
    let numbered = |n: u32| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    };
    if keep == 0 {
        return std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(numbered(keep));
    for n in (1..keep).rev() {
        let _ = std::fs::rename(numbered(n), numbered(n + 1));
    }
    std::fs::rename(path, numbered(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_get_timestamps_and_files_rotate_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("d.log");
        let input: Vec<u8> = (0..100)
            .flat_map(|i| format!("line {i:03}\n").into_bytes())
            .chain(b"no newline at the end".to_vec())
            .collect();
        copy_lines(&input[..], &log, 1000, 2).unwrap();
        let current = std::fs::read_to_string(&log).unwrap();
        let last = current.lines().last().unwrap();
        assert!(last.ends_with(" no newline at the end"), "{last}");
        // 2026-11-24T10:47:16.123Z line 099
        let (stamp, rest) = current.lines().next().unwrap().split_once(' ').unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(stamp).is_ok(),
            "{stamp}"
        );
        assert!(rest.starts_with("line "), "{rest}");
        for f in [
            log.clone(),
            dir.path().join("d.log.1"),
            dir.path().join("d.log.2"),
        ] {
            let len = std::fs::metadata(&f).unwrap().len();
            assert!(len <= 1000, "{} is {len} bytes", f.display());
        }
        assert!(
            !dir.path().join("d.log.3").exists(),
            "only 2 old files are kept"
        );
        // Nothing lost within what is kept: the newest lines are all there, in order.
        let kept = [dir.path().join("d.log.1"), log.clone()]
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect::<String>();
        assert!(kept.contains("line 098\n") && kept.contains("line 099\n"));
    }
}
