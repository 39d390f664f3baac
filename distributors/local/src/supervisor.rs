//! Starting work under a supervisor, and signalling process groups. The only `unsafe` code of
//! the crate lives here.
//!
//! # Design
//!
//! The orchestrator spawns one process (with [`tokio::process::Command`]) whose `pre_exec` hook
//! never execs: that forked child becomes the **supervisor**. It
//!
//! 1. calls `setsid()` (its own session and process group: a Ctrl-C or a SIGKILL aimed at the
//!    orchestrator's group does not reach it) and resets inherited signal handlers;
//! 2. forks the **work**, which calls `setpgid(0, 0)` (its own process group, so that cancel can
//!    signal the whole group without touching the supervisor), writes `<its pid> <supervisor
//!    pid>` to `pid` (one record for both), and returns into the standard library, which sets
//!    the environment and `execvp`s the program;
//! 3. closes every inherited descriptor above stderr, `waitpid`s the work and writes `exited N` or
//!    `signaled N` to `exit` (write to a temporary file, then `rename`: readers never see a
//!    partial record), and `_exit`s.
//!
//! The records are not `fsync`ed: a `rename` makes them atomic and durable across the death of
//! any process (the orchestrator, the supervisor, the work), which is what re-attachment needs;
//! after a power loss or kernel crash the processes are gone anyway and a record may be missing
//! (the execution then ends `Crashed` or `Missing`, never with a wrong exit status).
//!
//! The orchestrator is only the supervisor's parent: if it dies (even by SIGKILL) the supervisor
//! is re-parented to init, the work keeps running, and the exit status still lands in the state
//! directory, where a restarted orchestrator finds it. `waitpid` gives the exact status, so an
//! exit code of 137 and a death by SIGKILL are told apart (a shell wrapper could not).
//!
//! Exec errors come back through the standard library's close-on-exec pipe: the work inherits it
//! and the supervisor closes its copy, so `spawn` returns once the program is running, or fails
//! with the exec error (`ENOENT`, `EACCES`…).
//!
//! Everything between `fork` and `exec`/`_exit` is async-signal-safe: paths are prepared as
//! `CString`s beforehand, numbers are formatted into stack buffers, nothing allocates or locks.
//! The price of a fork-based supervisor is that it shares (copy-on-write) the orchestrator's
//! memory map until the work exits; it touches almost none of it.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The files the supervisor and the work write, as C strings prepared before forking.
#[derive(Debug)]
struct Files {
    pid_tmp: CString,
    pid: CString,
    exit_tmp: CString,
    exit: CString,
}

fn cpath(dir: &Path, name: &str) -> io::Result<CString> {
    CString::new(dir.join(name).as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Spawns `cmd` as supervised work whose state files go to `dir` (`pid`, `exit`).
///
/// Returns the supervisor as a tokio child: waiting on it tells when the exit record is written.
/// `cmd` MUST NOT have `pre_exec` hooks or a process group set: both are done here.
pub(crate) fn spawn(
    mut cmd: tokio::process::Command,
    dir: &Path,
) -> io::Result<tokio::process::Child> {
    let files = Files {
        pid_tmp: cpath(dir, ".pid.tmp")?,
        pid: cpath(dir, "pid")?,
        exit_tmp: cpath(dir, ".exit.tmp")?,
        exit: cpath(dir, "exit")?,
    };
    let max_fd = max_fd();
    cmd.kill_on_drop(false);
    // SAFETY: the hook runs in the child between fork and exec. `supervise` only makes
    // async-signal-safe calls (setsid, sigaction, getpid, open, write, close, rename, fork,
    // setpgid, close_range/close, waitpid, _exit), does not allocate (all paths were allocated
    // above, numbers are formatted on the stack) and takes no locks.
    unsafe {
        cmd.pre_exec(move || supervise(&files, max_fd));
    }
    cmd.spawn()
}

/// The highest descriptor number the supervisor closes when `close_range` is unavailable.
fn max_fd() -> i32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if ok {
        i32::try_from(lim.rlim_cur.min(65_536)).unwrap_or(65_536)
    } else {
        4_096
    }
}

/// The pre-exec hook. Returns `Ok(())` only in the work process (which then execs); the
/// supervisor never returns. An `Err` makes `spawn` fail with that error.
fn supervise(f: &Files, max_fd: i32) -> io::Result<()> {
    // SAFETY (whole function): called only from the pre_exec hook, in a single-threaded forked
    // child; every call is async-signal-safe and arguments point to memory we own.
    unsafe {
        if libc::setsid() == -1 {
            return Err(io::Error::last_os_error());
        }
        reset_signal_handlers();
        let supervisor = libc::getpid();
        let work = libc::fork();
        if work == -1 {
            return Err(io::Error::last_os_error());
        }
        if work == 0 {
            // The work: own process group, record the pid, then let std exec the program.
            if libc::setpgid(0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            write_numbers_file(&f.pid_tmp, &f.pid, b"", &[libc::getpid(), supervisor])?;
            return Ok(());
        }
        // The supervisor: drop every inherited descriptor (the orchestrator's sockets, database,
        // and std's exec-error pipe, so that `spawn` returns as soon as the work has exec'd).
        close_from(3, max_fd);
        let mut status: libc::c_int = 0;
        let reaped = loop {
            let r = libc::waitpid(work, &mut status, 0);
            if r == work {
                break true;
            }
            if r == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break false;
        };
        let written = if !reaped {
            write_file(&f.exit_tmp, &f.exit, b"unknown\n")
        } else if libc::WIFEXITED(status) {
            write_numbers_file(
                &f.exit_tmp,
                &f.exit,
                b"exited ",
                &[libc::WEXITSTATUS(status)],
            )
        } else if libc::WIFSIGNALED(status) {
            write_numbers_file(
                &f.exit_tmp,
                &f.exit,
                b"signaled ",
                &[libc::WTERMSIG(status)],
            )
        } else {
            write_file(&f.exit_tmp, &f.exit, b"unknown\n")
        };
        libc::_exit(if written.is_ok() { 0 } else { 1 })
    }
}

/// Resets every caught signal to its default action (the orchestrator's handlers, e.g. tokio's,
/// must not run in the supervisor). Ignored signals stay ignored.
///
/// # Safety
/// Async-signal-safe; call only in a forked child.
unsafe fn reset_signal_handlers() {
    // 1..65 covers every Linux signal number (NSIG is 65); invalid numbers just fail.
    for sig in 1..65 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: zeroed sigaction is a valid out-parameter; sigaction is async-signal-safe.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction != libc::SIG_IGN
                && old.sa_sigaction != libc::SIG_DFL
            {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// Closes every descriptor from `first` up.
///
/// # Safety
/// Async-signal-safe; call only in a forked child that owns no descriptor above `first`.
unsafe fn close_from(first: i32, max_fd: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: close_range only closes descriptors.
        let r = unsafe { libc::syscall(libc::SYS_close_range, first as u32, u32::MAX, 0u32) };
        if r == 0 {
            return;
        }
    }
    for fd in first..max_fd {
        // SAFETY: closing a descriptor we no longer need (EBADF for unused ones is fine).
        unsafe {
            libc::close(fd);
        }
    }
}

/// Writes `prefix` + the decimal `numbers` separated by spaces + `\n` to `tmp`, then renames it
/// to `path`. At most two numbers.
///
/// # Safety
/// Async-signal-safe.
unsafe fn write_numbers_file(
    tmp: &CString,
    path: &CString,
    prefix: &[u8],
    numbers: &[libc::c_int],
) -> io::Result<()> {
    let mut buf = [0u8; 64];
    let mut len = 0;
    for &b in prefix.iter().take(24) {
        buf[len] = b;
        len += 1;
    }
    for (i, &n) in numbers.iter().take(2).enumerate() {
        if i > 0 {
            buf[len] = b' ';
            len += 1;
        }
        let mut digits = [0u8; 12];
        let mut d = 0;
        let mut v = i64::from(n);
        if v < 0 {
            buf[len] = b'-';
            len += 1;
            v = -v;
        }
        loop {
            digits[d] = b'0' + (v % 10) as u8;
            d += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while d > 0 {
            d -= 1;
            buf[len] = digits[d];
            len += 1;
        }
    }
    buf[len] = b'\n';
    len += 1;
    // SAFETY: forwarded contract.
    unsafe { write_file(tmp, path, &buf[..len]) }
}

/// Writes `data` to `tmp` and renames it to `path` (atomic replace).
///
/// # Safety
/// Async-signal-safe.
unsafe fn write_file(tmp: &CString, path: &CString, data: &[u8]) -> io::Result<()> {
    // SAFETY: valid C strings and a buffer we own; all calls are async-signal-safe.
    unsafe {
        let fd = libc::open(
            tmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        );
        if fd == -1 {
            return Err(io::Error::last_os_error());
        }
        let mut off = 0;
        while off < data.len() {
            let n = libc::write(fd, data[off..].as_ptr().cast(), data.len() - off);
            if n < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                let e = io::Error::last_os_error();
                libc::close(fd);
                return Err(e);
            }
            off += n as usize;
        }
        libc::close(fd);
        if libc::rename(tmp.as_ptr(), path.as_ptr()) == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether any process of group `pgid` still exists (`EPERM` counts as existing).
pub(crate) fn group_alive(pgid: i32) -> bool {
    if !safe_target(pgid) {
        return false;
    }
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::killpg(pgid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether process `pid` still exists (a zombie counts).
pub(crate) fn process_alive(pid: i32) -> bool {
    if !safe_target(pid) {
        return false;
    }
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Sends `sig` to process group `pgid`. A group that no longer exists is not an error.
pub(crate) fn signal_group(pgid: i32, sig: libc::c_int) -> io::Result<()> {
    if !safe_target(pgid) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal process group {pgid}"),
        ));
    }
    // SAFETY: killpg with a validated group id.
    let r = unsafe { libc::killpg(pgid, sig) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ESRCH) => Ok(()),
        _ => Err(e),
    }
}

/// Only real, foreign process (group) ids may be signalled: never 0, 1, negative ids, or the
/// orchestrator's own process group (a corrupt pid file must not make us kill ourselves).
fn safe_target(id: i32) -> bool {
    // SAFETY: getpgrp and getpid cannot fail.
    let (own_group, own_pid) = unsafe { (libc::getpgrp(), libc::getpid()) };
    id > 1 && id != own_group && id != own_pid
}

/// The conventional name of signal `sig` (`SIGTERM`), or `signal N`.
pub(crate) fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGCONT => "SIGCONT",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGTTIN => "SIGTTIN",
        libc::SIGTTOU => "SIGTTOU",
        libc::SIGURG => "SIGURG",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGVTALRM => "SIGVTALRM",
        libc::SIGPROF => "SIGPROF",
        libc::SIGWINCH => "SIGWINCH",
        libc::SIGSYS => "SIGSYS",
        _ => return format!("signal {sig}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_signals_init_or_itself() {
        assert!(!safe_target(0));
        assert!(!safe_target(1));
        assert!(!safe_target(-5));
        // SAFETY: getpgrp cannot fail.
        assert!(!safe_target(unsafe { libc::getpgrp() }));
        assert!(signal_group(0, libc::SIGTERM).is_err());
        assert!(!group_alive(1));
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(libc::SIGKILL), "SIGKILL");
        assert_eq!(signal_name(99), "signal 99");
    }
}
