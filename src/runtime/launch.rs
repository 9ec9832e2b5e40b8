//! The launch shim: `switchboard __launch <cgroup.procs> -- <program> <args...>`.
//!
//! A child must be in its deployment's cgroup *before* it can fork, or a fast-forking server
//! could leave a grandchild outside. Moving it from the parent after spawn races; a `pre_exec`
//! hook would force std off its posix_spawn fast path (fork+exec copies Switchboard's page
//! tables, which gets slow as its memory grows). So the parent posix_spawns this shim, the shim
//! writes its own pid into the cgroup and execs the server in place: same pid, no race, and the
//! parent keeps the fast path. The shim runs before any runtime or thread starts.

use std::{ffi::OsString, os::unix::process::CommandExt as _, process::Command};

/// The hidden first argument that selects the shim.
pub const SHIM_ARG: &str = "__launch";

/// Whether this process was started as the shim.
pub fn is_shim_invocation() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == SHIM_ARG)
}

/// Joins the cgroup and execs the server. Never returns: on failure it explains on stderr
/// (which is the deployment log) and exits 127, which the supervisor reports as a failed start.
pub fn run_shim() -> ! {
    let args: Vec<OsString> = std::env::args_os().skip(2).collect();
    let (procs, rest) = match args.split_first() {
        Some((procs, rest)) if rest.first().is_some_and(|a| a == "--") && rest.len() >= 2 => {
            (procs, &rest[1..])
        }
        _ => {
            eprintln!(
                "switchboard: usage: switchboard {SHIM_ARG} CGROUP_PROCS -- PROGRAM [ARGS...]"
            );
            std::process::exit(127);
        }
    };
    if let Err(e) = std::fs::write(procs, std::process::id().to_string()) {
        eprintln!(
            "switchboard: cannot join the deployment's cgroup ({}): {e}",
            procs.to_string_lossy()
        );
        std::process::exit(127);
    }
    let err = Command::new(&rest[0]).args(&rest[1..]).exec();
    eprintln!(
        "switchboard: cannot run '{}': {err}",
        rest[0].to_string_lossy()
    );
    std::process::exit(127);
}
