//! The supervisor: one small process per `local` instance that starts the work, waits for each
//! process it started and records how it ended. The only `unsafe` code of the crate lives here.
//!
//! # Design
//!
//! The first time an instance needs it, it forks the supervisor (through an intermediate child
//! that calls `setsid` and exits at once, so the supervisor is in its own session and is nobody's
//! child but init's or a subreaper's: a Ctrl-C or a SIGKILL aimed at the orchestrator's process
//! group does not reach it, and its end leaves no zombie in the orchestrator). The two talk over
//! a Unix socket pair, one line per message:
//!
//! | from | line | meaning |
//! |---|---|---|
//! | supervisor | `ready <pid>` | it is up (first line) |
//! | orchestrator | `start <seq> <token>` | start the execution whose `spec.json` is in `<state_dir>/<token>` when a slot is free |
//! | supervisor | `ok <seq> <pid>` | the work runs as `<pid>`, its own process group; its `pid` record is written |
//! | supervisor | `skip <seq> cancelled\|owned\|adopt` | not started: cancelled first, claimed by a live starter, or already running under a dead one |
//! | supervisor | `err <seq> <errno> <message>` | it could not start (`errno` 0: not an OS error); nothing runs |
//! | supervisor | `exit <token> <record>` | the work's main process ended and its `exit` record (`exited N`, `signaled N`…; left out if it could not be written) is written |
//!
//! The supervisor runs at most `max_parallel` children and keeps further requests in order until
//! a child ends: the orchestrator hands it a few executions ahead, so that the next one starts
//! the moment a slot frees, without a round trip. Before starting one it takes the execution's
//! `claim` in its orchestrator's name (`start <orchestrator pid>`; first writer wins against
//! `cancel` and other instances).
//! When the orchestrator goes away it drops the requests it has not started (they have no claim:
//! a restarted orchestrator queues them again).
//!
//! The supervisor is single-threaded: it resets inherited signal handlers, points its own stdio
//! at `/dev/null`, closes every other inherited descriptor (the orchestrator's sockets, database
//! and pipes), blocks SIGCHLD and `poll`s the socket and a `signalfd`. To start work it builds the
//! command from `spec.json` and spawns it with the standard library, which uses `posix_spawn`
//! (no copy of any address space; exec errors such as `ENOENT` come back from the call), in its
//! own process group, with stdout/stderr appended to the execution's log files. It then writes
//! `<work pid> <supervisor pid>` to `pid` and answers. When SIGCHLD arrives it `waitpid`s every
//! child that ended, writes `exited N` or `signaled N` to `exit`, and reports it. Every record is
//! written to a temporary file and renamed into place: readers never see a partial record.
//!
//! The records are not `fsync`ed: a `rename` makes them atomic and durable across the death of
//! any process (the orchestrator, the supervisor, the work), which is what re-attachment needs;
//! after a power loss or kernel crash the processes are gone anyway and a record may be missing
//! (the execution then ends `Crashed` or `Missing`, never with a wrong exit status).
//!
//! If the orchestrator dies (even by SIGKILL), the supervisor sees the socket close, goes on
//! reaping and recording until its last child has ended, then exits: the work keeps running and
//! its exit status lands in the state directory, where a restarted orchestrator finds it. A new
//! orchestrator starts its own supervisor and follows the earlier one's work through the files.
//! `waitpid` gives the exact status, so an exit code of 137 and a death by SIGKILL are told apart
//! (a shell wrapper could not). If the supervisor itself is killed, the work it started keeps
//! running but nobody can collect its exit status: once its process group is gone the execution
//! ends `Crashed` ("ended without recording an exit status"); the instance starts a new
//! supervisor for the next work.
//!
//! The supervisor is a fork of a multi-threaded process that goes on running Rust code: it
//! allocates (glibc makes `malloc` safe in a forked child) and spawns with the standard library,
//! which takes the environment's read lock. An orchestrator MUST NOT change its environment
//! (`std::env::set_var`) from another thread while an instance starts its first execution.
//!
//! Cost: one `fork` of the orchestrator per instance (the supervisor keeps a copy-on-write
//! snapshot of the orchestrator's memory as it was then, touching almost none of it), and per
//! execution one `posix_spawn` from a small process, two atomic records, and two socket lines.
//! The earlier design, a supervisor forked from the orchestrator per execution, cost three times
//! the CPU of `xargs` per execution (BENCHMARKS.md).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use crate::core::{start_work, write_exit};

/// The descriptor of the control socket in the supervisor.
const CONTROL: RawFd = 3;
/// The longest request line the supervisor keeps (requests are a few dozen bytes).
const MAX_LINE: usize = 64 * 1024;
/// How long the orchestrator waits for a new supervisor's `ready` line.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How the work's main process ended, as `waitpid` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitRecord {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
    /// `waitpid` said something else (cannot happen without `WUNTRACED`).
    Unknown,
}

impl ExitRecord {
    /// The record's text (`exited 0\n`).
    pub(crate) fn encode(self) -> String {
        match self {
            Self::Exited(n) => format!("exited {n}\n"),
            Self::Signaled(n) => format!("signaled {n}\n"),
            Self::Unknown => "unknown\n".into(),
        }
    }

    /// Parses a record; `None` for anything else.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if s == "unknown" {
            return Some(Self::Unknown);
        }
        let (word, n) = s.split_once(' ')?;
        let n: i32 = n.parse().ok()?;
        match word {
            "exited" => Some(Self::Exited(n)),
            "signaled" => Some(Self::Signaled(n)),
            _ => None,
        }
    }

    fn of_wait_status(status: libc::c_int) -> Self {
        if libc::WIFEXITED(status) {
            Self::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            Self::Signaled(libc::WTERMSIG(status))
        } else {
            Self::Unknown
        }
    }
}

/// What the supervisor did with a start request (see the protocol table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// It runs as this pid (= process group id).
    Running(i32),
    /// It was not started.
    Skipped(Skip),
}

/// Why a request was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skip {
    /// Cancelled before it started.
    Cancelled,
    /// A live starter (another instance or process) holds its claim.
    Owned,
    /// Its starter died after starting it: it runs, follow it through its files.
    Adopt,
}

impl Skip {
    fn as_str(self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::Owned => "owned",
            Self::Adopt => "adopt",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Cancelled, Self::Owned, Self::Adopt]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Why a start was not confirmed.
#[derive(Debug)]
pub(crate) enum StartFailure {
    /// The supervisor tried and failed: nothing runs.
    NotStarted(io::Error),
    /// The supervisor went away before answering: the work may have started (its `pid` record
    /// says whether).
    Lost,
}

/// The answer to one start request.
pub(crate) type Started = Result<Start, StartFailure>;

/// Called with a token whose work ended, and its exit record when the report carries it.
pub(crate) type ExitHook = dyn Fn(&str, Option<ExitRecord>) + Send + Sync;

/// What the orchestrator side does with the supervisor's reports. Called on the reader task.
pub(crate) struct Hooks {
    /// The work of this token ended; its `exit` record is written (and is the second argument
    /// when the report carries it).
    pub(crate) exited: Box<ExitHook>,
    /// The supervisor is gone (it exited or was killed).
    pub(crate) lost: Box<dyn Fn() + Send + Sync>,
}

#[derive(Debug, Default)]
struct Pending {
    lost: bool,
    replies: HashMap<u64, oneshot::Sender<Started>>,
}

/// The orchestrator's handle on its supervisor. Dropping it closes the socket: the supervisor
/// then exits once its last child has ended.
#[derive(Debug)]
pub(crate) struct Supervisor {
    pid: i32,
    requests: mpsc::UnboundedSender<String>,
    pending: Arc<Mutex<Pending>>,
    next: AtomicU64,
}

fn lock(p: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Supervisor {
    /// Forks a supervisor for the state directory `state_dir` and starts the tasks that talk to
    /// it. MUST be called within a tokio runtime. Errors: the fork's or the socket's (`EAGAIN`,
    /// `EMFILE`…), or the supervisor not saying `ready` within 10 s.
    pub(crate) fn spawn(
        state_dir: &Path,
        max_parallel: usize,
        hooks: Hooks,
    ) -> io::Result<Arc<Self>> {
        let (ours, theirs) = UnixStream::pair()?;
        let max_fd = max_fd();
        let theirs_fd = theirs.as_raw_fd();
        let orchestrator = std::process::id();
        // SAFETY: the intermediate child only calls async-signal-safe functions (setsid, fork,
        // _exit). The supervisor (grandchild) runs `serve`, which never returns: it allocates
        // (glibc's malloc is consistent in a forked child) but takes no lock another thread of
        // the orchestrator could have held (no stdio, no logging, no environment changes).
        let middle = unsafe { libc::fork() };
        if middle == -1 {
            return Err(io::Error::last_os_error());
        }
        if middle == 0 {
            // SAFETY: see above.
            unsafe {
                if libc::setsid() == -1 {
                    libc::_exit(1);
                }
                match libc::fork() {
                    0 => serve(theirs_fd, state_dir, orchestrator, max_parallel, max_fd),
                    -1 => libc::_exit(1),
                    _ => libc::_exit(0),
                }
            }
        }
        drop(theirs);
        reap(middle);
        let pid = read_ready(&ours)?;
        ours.set_nonblocking(true)?;
        let (read, mut write) = tokio::net::UnixStream::from_std(ours)?.into_split();
        let (requests, mut rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            let mut buf = String::new();
            while let Some(first) = rx.recv().await {
                buf.clear();
                buf.push_str(&first);
                while buf.len() < 64 * 1024 {
                    match rx.try_recv() {
                        Ok(more) => buf.push_str(&more),
                        Err(_) => break,
                    }
                }
                if write.write_all(buf.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        let pending = Arc::new(Mutex::new(Pending::default()));
        let shared = Arc::clone(&pending);
        tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                Self::dispatch(&shared, &hooks, &line);
            }
            let replies = {
                let mut p = lock(&shared);
                p.lost = true;
                std::mem::take(&mut p.replies)
            };
            for (_, tx) in replies {
                let _ = tx.send(Err(StartFailure::Lost));
            }
            (hooks.lost)();
        });
        Ok(Arc::new(Self {
            pid,
            requests,
            pending,
            next: AtomicU64::new(1),
        }))
    }

    fn dispatch(pending: &Mutex<Pending>, hooks: &Hooks, line: &str) {
        let mut words = line.splitn(4, ' ');
        match (words.next(), words.next(), words.next()) {
            (Some("exit"), Some(token), word) => {
                let record = word.map(|w| format!("{w} {}", words.next().unwrap_or("")));
                (hooks.exited)(token, record.as_deref().and_then(ExitRecord::parse));
            }
            (Some("ok"), Some(seq), Some(pid)) => {
                if let (Ok(seq), Ok(pid)) = (seq.parse(), pid.parse())
                    && let Some(tx) = lock(pending).replies.remove(&seq)
                {
                    let _ = tx.send(Ok(Start::Running(pid)));
                }
            }
            (Some("skip"), Some(seq), Some(why)) => {
                if let (Ok(seq), Some(why)) = (seq.parse(), Skip::parse(why))
                    && let Some(tx) = lock(pending).replies.remove(&seq)
                {
                    let _ = tx.send(Ok(Start::Skipped(why)));
                }
            }
            (Some("err"), Some(seq), Some(errno)) => {
                let message = words.next().unwrap_or("");
                let error = match errno.parse::<i32>() {
                    Ok(n) if n > 0 => io::Error::from_raw_os_error(n),
                    _ => io::Error::new(io::ErrorKind::InvalidInput, message.to_owned()),
                };
                if let Ok(seq) = seq.parse()
                    && let Some(tx) = lock(pending).replies.remove(&seq)
                {
                    let _ = tx.send(Err(StartFailure::NotStarted(error)));
                }
            }
            _ => {}
        }
    }

    /// Asks the supervisor to start the execution `token` (its `spec.json` MUST be written).
    /// The answer comes on the returned channel.
    pub(crate) fn request(&self, token: &str) -> oneshot::Receiver<Started> {
        let (tx, rx) = oneshot::channel();
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut p = lock(&self.pending);
            if p.lost {
                let _ = tx.send(Err(StartFailure::Lost));
                return rx;
            }
            p.replies.insert(seq, tx);
        }
        if self
            .requests
            .send(format!("start {seq} {token}\n"))
            .is_err()
            && let Some(tx) = lock(&self.pending).replies.remove(&seq)
        {
            let _ = tx.send(Err(StartFailure::Lost));
        }
        rx
    }

    /// Whether the supervisor is gone (its socket closed).
    pub(crate) fn is_lost(&self) -> bool {
        lock(&self.pending).lost
    }

    /// The supervisor's process id.
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }
}

/// Waits for the intermediate child (it exits at once).
fn reap(pid: libc::pid_t) {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child, writing into a local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        break;
    }
}

/// Reads the supervisor's `ready <pid>` line (blocking, at most [`READY_TIMEOUT`]).
fn read_ready(mut stream: &UnixStream) -> io::Result<i32> {
    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    let mut line = Vec::with_capacity(32);
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stream.set_read_timeout(None)?;
    std::str::from_utf8(&line)
        .ok()
        .and_then(|l| l.strip_prefix("ready "))
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| io::Error::other("the supervisor did not start"))
}

/// The supervisor's main: never returns.
fn serve(
    control: RawFd,
    state_dir: &Path,
    orchestrator: u32,
    max_parallel: usize,
    max_fd: i32,
) -> ! {
    // SAFETY: single-threaded forked child; descriptors and signal state are ours to change.
    let sfd = unsafe {
        if control != CONTROL && libc::dup3(control, CONTROL, libc::O_CLOEXEC) == -1 {
            libc::_exit(1);
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
        }
        close_from(CONTROL + 1, max_fd);
        // Shown by `ps` and `top` (it inherited the name of the orchestrator's thread).
        libc::prctl(libc::PR_SET_NAME, c"distributor-sup".as_ptr());
        reset_signal_handlers();
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut mask);
        libc::sigaddset(&mut mask, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &mask, std::ptr::null_mut());
        let sfd = libc::signalfd(-1, &mask, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if sfd == -1 {
            libc::_exit(1);
        }
        sfd
    };
    let mut server = Server {
        state_dir,
        // SAFETY: getpid cannot fail.
        me: unsafe { libc::getpid() },
        orchestrator,
        sfd,
        reading: true,
        writing: true,
        children: HashMap::new(),
        max_parallel: max_parallel.max(1),
        queue: VecDeque::new(),
        input: Vec::with_capacity(4096),
    };
    let code = server.run();
    // SAFETY: ends the supervisor without running the orchestrator's exit handlers.
    unsafe { libc::_exit(code) }
}

/// The supervisor's state.
struct Server<'a> {
    state_dir: &'a Path,
    me: libc::pid_t,
    /// The orchestrator process, in whose name claims are taken.
    orchestrator: u32,
    sfd: RawFd,
    /// The orchestrator may still send requests.
    reading: bool,
    /// The orchestrator may still read reports.
    writing: bool,
    /// Running work: pid → token.
    children: HashMap<libc::pid_t, String>,
    max_parallel: usize,
    /// Requests waiting for a slot, in order: (seq, token).
    queue: VecDeque<(String, String)>,
    input: Vec<u8>,
}

impl Server<'_> {
    fn run(&mut self) -> i32 {
        self.send(&format!("ready {}\n", self.me));
        loop {
            if !self.reading && self.children.is_empty() {
                return 0;
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.sfd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if self.reading { CONTROL } else { -1 },
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll on two pollfds we own.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r == -1 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return 1;
            }
            if fds[1].revents != 0 {
                self.read_requests();
            }
            if fds[0].revents != 0 {
                self.reap_children();
            }
        }
    }

    fn read_requests(&mut self) {
        let mut buf = [0u8; 16 * 1024];
        // SAFETY: read into a buffer we own.
        let n = unsafe { libc::read(CONTROL, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                self.reading = false;
            }
            return;
        }
        if n == 0 {
            // The orchestrator is gone: nothing more starts (unstarted requests have no claim).
            self.reading = false;
            self.queue.clear();
            return;
        }
        self.input
            .extend_from_slice(&buf[..usize::try_from(n).unwrap_or(0)]);
        if self.input.len() > MAX_LINE && !self.input.contains(&b'\n') {
            // Not our protocol (requests are a few dozen bytes): drop it rather than grow.
            self.input.clear();
        }
        while let Some(end) = self.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.input.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]).into_owned();
            let mut words = line.split(' ');
            if let (Some("start"), Some(seq), Some(token), None) =
                (words.next(), words.next(), words.next(), words.next())
            {
                self.queue.push_back((seq.to_owned(), token.to_owned()));
            }
        }
        self.start_queued();
    }

    /// Starts queued requests while fewer than `max_parallel` children run.
    fn start_queued(&mut self) {
        while self.reading && self.children.len() < self.max_parallel {
            let Some((seq, token)) = self.queue.pop_front() else {
                break;
            };
            let reply = match start_work(self.state_dir, &token, self.me, self.orchestrator) {
                Ok(Start::Running(pid)) => {
                    self.children.insert(pid, token);
                    format!("ok {seq} {pid}\n")
                }
                Ok(Start::Skipped(why)) => format!("skip {seq} {}\n", why.as_str()),
                Err(e) => {
                    let message: String = e
                        .to_string()
                        .chars()
                        .map(|c| if c.is_control() { ' ' } else { c })
                        .collect();
                    format!("err {seq} {} {message}\n", e.raw_os_error().unwrap_or(0))
                }
            };
            self.send(&reply);
        }
    }

    fn reap_children(&mut self) {
        let mut info = [0u8; 128];
        // Drain the signalfd (SIGCHLDs coalesce: waitpid below collects every ended child).
        // SAFETY: read into a buffer we own from a non-blocking descriptor.
        while unsafe { libc::read(self.sfd, info.as_mut_ptr().cast(), info.len()) } > 0 {}
        let mut ended = Vec::new();
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid for any child, writing into a local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if let Some(token) = self.children.remove(&pid) {
                ended.push((token, ExitRecord::of_wait_status(status)));
            }
        }
        // The freed slots go to waiting work first: that is the latency that matters.
        self.start_queued();
        for (token, record) in ended {
            // A record that cannot be written (disk full) leaves the execution without one; the
            // report still wakes the orchestrator, which then reads the files.
            let line = match write_exit(self.state_dir, &token, record) {
                Ok(()) => format!("exit {token} {}", record.encode()),
                Err(_) => format!("exit {token}\n"),
            };
            self.send(&line);
        }
    }

    /// Sends a line to the orchestrator; once that fails (it is gone), stops trying.
    fn send(&mut self, line: &str) {
        let mut rest = line.as_bytes();
        while self.writing && !rest.is_empty() {
            // SAFETY: send from a buffer we own; MSG_NOSIGNAL: no SIGPIPE if the peer is gone.
            let n = unsafe {
                libc::send(
                    CONTROL,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    self.writing = false;
                }
                continue;
            }
            rest = &rest[usize::try_from(n).unwrap_or(0)..];
        }
    }
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
