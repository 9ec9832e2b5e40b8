//! One stdio MCP server process and the relay around its pipes.
//!
//! The process is a host process with piped stdin/stdout/stderr, or a container the bridge is
//! attached to ([`super::container`]); the relay is the same for both, over any byte streams.
//! The child reads newline-delimited JSON-RPC on stdin and writes it on stdout. Its stderr is
//! relayed line by line to the bridge's (the deployment log), and the last lines are kept: a
//! server that dies says why there ("Cannot access directory /srv/shared"), and the bridge's
//! own error, the one line the supervisor quotes in `last_exit`, must carry those words. One writer task owns stdin, so concurrent senders
//! never interleave lines and a burst is written with one flush. One reader task owns stdout
//! and routes every line it reads by what it is, never by order (servers write notifications
//! before the reply they precede, and answer concurrent requests out of order):
//!
//! - a response goes to the pending request with its id (ids rewritten by the modern pool are
//!   mapped back), which ends that request's stream;
//! - a notification with a `progressToken` goes to the stream of the request that carried the
//!   token, and one with a `_meta` subscription id (2026-07-28) to the stream of the
//!   `subscriptions/listen` request it names;
//! - anything else the server starts (requests such as sampling, elicitation, roots, ping, and
//!   unrelated notifications) goes to the session's standalone GET stream, or else the newest
//!   open request stream, or else waits in a bounded backlog for the next stream to open.
//!
//! When the child ends, every request still pending gets a JSON-RPC error naming how the
//! process ended, and its stream closes.

use std::{
    collections::{HashMap, VecDeque},
    pin::Pin,
    process::Stdio,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::{
    io::{
        AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _,
        BufReader,
    },
    process::Command,
    sync::{mpsc, watch},
};

use super::container::{Containers, Running};
use crate::runtime::ExitInfo;

/// Where messages for one HTTP stream go: raw JSON-RPC messages, one per item. Bounded (see
/// [`STREAM_BOUND`]): a client that stops reading costs at most that much.
pub type Sink = mpsc::Sender<Bytes>;

/// Messages a stream may fall behind its client (and lines queued for a server's stdin).
/// Past it, a standalone GET stream is closed (what comes next waits in the backlog for the
/// client to reconnect) and a request stream loses the message, rather than the bridge
/// buffering without limit for a client that does not read.
pub const STREAM_BOUND: usize = 1000;

/// A sink and the receiving end of its stream.
pub fn stream() -> (Sink, mpsc::Receiver<Bytes>) {
    mpsc::channel(STREAM_BOUND)
}

/// The longest line a server may write (rmcp's codec uses the same bound). A longer one is a
/// broken server: the child is killed rather than buffering without limit.
const MAX_LINE: usize = 16 * 1024 * 1024;
/// Server-initiated messages kept while no stream of the session is open.
const MAX_BACKLOG: usize = STREAM_BOUND;
/// stderr lines kept for error messages, and the length each is cut to.
const LAST_WORDS: usize = 3;
const LAST_WORD_CHARS: usize = 300;

/// How ids are treated on this child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdMode {
    /// One client owns the child (a legacy session): ids pass through untouched.
    Owned,
    /// Many clients share the child (the modern pool): each request gets a fresh id (and
    /// progress token) from this child's counter, mapped back in replies.
    Shared,
}

struct Pending {
    sink: Sink,
    /// The client's own id, when it was rewritten.
    client_id: Option<Value>,
    /// The request's key in `Routes::progress`, when it asked for progress.
    progress_key: Option<String>,
    /// The client's own progress token, when it was rewritten.
    client_token: Option<Value>,
    /// Whether the client reads a stream (SSE): only such a request's stream can carry what
    /// the server starts itself (a JSON answer has room for the reply alone).
    streams: bool,
    seq: u64,
}

#[derive(Default)]
struct Routes {
    pending: HashMap<String, Pending>,
    /// Progress token (canonical JSON text) → pending request key.
    progress: HashMap<String, String>,
    /// The session's standalone GET stream.
    listener: Option<Sink>,
    backlog: VecDeque<Bytes>,
    /// Set once the child has ended; no new request is accepted after it.
    ended: Option<String>,
}

/// What runs the server.
enum Kind {
    /// A host process, signalled through its process group.
    Process,
    /// A container (its id once created), signalled through the engine.
    Container(Arc<Containers>, OnceLock<String>),
}

/// The server's streams, whatever runs it.
pub(super) struct Io {
    pub stdin: Pin<Box<dyn AsyncWrite + Send>>,
    pub stdout: Pin<Box<dyn AsyncRead + Send>>,
    pub stderr: Pin<Box<dyn AsyncRead + Send>>,
}

/// How the server's end is learnt once its stdout has closed.
enum Exit {
    Process(tokio::process::Child),
    Container(Running),
}

impl Exit {
    async fn status(self) -> String {
        match self {
            Exit::Process(mut proc) => {
                match tokio::time::timeout(Duration::from_secs(2), proc.wait()).await {
                    Ok(Ok(s)) => describe(s.into()),
                    Ok(Err(e)) => format!("could not be waited for: {e}"),
                    Err(_) => {
                        let _ = proc.start_kill();
                        match proc.wait().await {
                            Ok(s) => {
                                format!("closed its stdout and was killed ({})", describe(s.into()))
                            }
                            Err(e) => format!("could not be waited for: {e}"),
                        }
                    }
                }
            }
            Exit::Container(running) => describe(running.ended().await),
        }
    }
}

pub struct Child {
    /// The server's pid on this host (a container's main process); 0 until a container
    /// started.
    pid: AtomicU32,
    kind: Kind,
    mode: IdMode,
    writer: Mutex<Option<mpsc::Sender<Bytes>>>,
    routes: Mutex<Routes>,
    next_id: AtomicU64,
    in_flight: AtomicU32,
    /// `Some(description)` once the process has exited.
    exited: watch::Receiver<Option<String>>,
    /// Milliseconds after `born` of the last request, reply or stream opened or closed (for
    /// idle reaping).
    born: std::time::Instant,
    last_active: AtomicU64,
    /// The last lines the process wrote on stderr (see [`LAST_WORDS`]).
    last_words: Mutex<VecDeque<String>>,
}

/// A request registered on a child; dropping it before the reply arrives forgets the request
/// (and, on a shared child, tells the server it is cancelled).
pub struct Registration {
    child: Arc<Child>,
    key: String,
    seq: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let removed = {
            let mut routes = self.child.routes();
            match routes.pending.get(&self.key) {
                Some(p) if p.seq == self.seq => {
                    let p = routes.pending.remove(&self.key);
                    if let Some(k) = p.as_ref().and_then(|p| p.progress_key.as_ref()) {
                        routes.progress.remove(k);
                    }
                    p.is_some()
                }
                _ => false,
            }
        };
        self.child.touch();
        if removed {
            self.child.in_flight.fetch_sub(1, Ordering::Relaxed);
            // Closing a modern request's stream is its cancellation (2026-07-28); a legacy
            // client that disconnects has not cancelled anything.
            if self.child.mode == IdMode::Shared && self.child.alive() {
                let note = serde_json::json!({
                    "jsonrpc": "2.0",
                    "method": "notifications/cancelled",
                    "params": {"requestId": internal_id_value(&self.key), "reason": "client disconnected"},
                });
                let _ = self.child.send_value(&note);
            }
        }
    }
}

/// Internal ids are numbers; their key is the number's text.
fn internal_id_value(key: &str) -> Value {
    key.parse::<u64>()
        .map_or_else(|_| Value::String(key.to_owned()), Value::from)
}

/// The canonical text of a JSON value, so `1` and `1` match whatever the spacing, and `1` and
/// `"1"` (distinct ids in JSON-RPC) do not.
pub fn key_of(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the MCP server process has ended: {0}")]
    Ended(String),
    #[error("a request with id {0} is already in flight on this session")]
    DuplicateId(String),
    #[error("the MCP server is not reading its input ({0} messages are waiting for it)")]
    Busy(usize),
}

impl Child {
    /// Spawns `program` with piped stdin/stdout in a process group of its own (so a stop can
    /// signal its whole tree, and a terminal's Ctrl-C aimed at the bridge does not reach it).
    pub fn spawn(program: &str, args: &[String], mode: IdMode) -> std::io::Result<Arc<Child>> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        let mut proc = cmd.spawn()?;
        let pid = proc
            .id()
            .ok_or_else(|| std::io::Error::other("the process exited before it could be used"))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (proc.stdin.take(), proc.stdout.take(), proc.stderr.take())
        else {
            return Err(std::io::Error::other("stdio pipes missing"));
        };
        let (child, wrx, exit_tx) = Child::new(mode, Kind::Process);
        child.pid.store(pid, Ordering::Relaxed);
        let io = Io {
            stdin: Box::pin(stdin),
            stdout: Box::pin(stdout),
            stderr: Box::pin(stderr),
        };
        Arc::clone(&child).relay(io, wrx, exit_tx, Exit::Process(proc));
        Ok(child)
    }

    /// Starts a server container in the background: the child is usable at once (what is
    /// sent waits for the container's stdin), and one that cannot be started ends with why.
    pub fn spawn_container(containers: &Arc<Containers>, mode: IdMode) -> Arc<Child> {
        let (child, wrx, exit_tx) = Child::new(
            mode,
            Kind::Container(Arc::clone(containers), OnceLock::new()),
        );
        let containers = Arc::clone(containers);
        let starting = Arc::clone(&child);
        tokio::spawn(async move {
            match containers.start().await {
                Ok((running, io)) => {
                    starting.pid.store(running.pid, Ordering::Relaxed);
                    if let Kind::Container(_, id) = &starting.kind {
                        let _ = id.set(running.id.clone());
                    }
                    starting.relay(io, wrx, exit_tx, Exit::Container(running));
                }
                Err(e) => {
                    let why = format!(
                        "could not be started as a container of image '{}': {e}",
                        containers.image()
                    );
                    tracing::error!("{why}");
                    let _ = exit_tx.send(Some(why.clone()));
                    starting.fail_all(&why);
                }
            }
        });
        child
    }

    fn new(
        mode: IdMode,
        kind: Kind,
    ) -> (
        Arc<Child>,
        mpsc::Receiver<Bytes>,
        watch::Sender<Option<String>>,
    ) {
        let (wtx, wrx) = mpsc::channel(STREAM_BOUND);
        let (exit_tx, exit_rx) = watch::channel(None);
        let child = Arc::new(Child {
            pid: AtomicU32::new(0),
            kind,
            mode,
            writer: Mutex::new(Some(wtx)),
            routes: Mutex::new(Routes::default()),
            next_id: AtomicU64::new(1),
            in_flight: AtomicU32::new(0),
            exited: exit_rx,
            born: std::time::Instant::now(),
            last_active: AtomicU64::new(0),
            last_words: Mutex::new(VecDeque::new()),
        });
        (child, wrx, exit_tx)
    }

    /// Runs the relay over the server's streams: one writer task for stdin, one reader task
    /// for stdout (which learns the end once stdout closes), one for stderr.
    fn relay(
        self: Arc<Self>,
        io: Io,
        wrx: mpsc::Receiver<Bytes>,
        exit_tx: watch::Sender<Option<String>>,
        exit: Exit,
    ) {
        tokio::spawn(write_loop(io.stdin, wrx));
        let relay = tokio::spawn({
            let child = Arc::clone(&self);
            async move { child.relay_stderr(io.stderr).await }
        });
        tokio::spawn(async move {
            self.read_loop(io.stdout).await;
            // stdout closed: the server is ending (or closed it, which makes it useless).
            let status = exit.status().await;
            // Its last words are read before the exit is told (a descendant holding stderr
            // open must not hold that up for long).
            let _ = tokio::time::timeout(Duration::from_secs(1), relay).await;
            // Told before pending requests are failed, so whoever reads such a failure can
            // already ask how the process ended.
            let _ = exit_tx.send(Some(status.clone()));
            self.fail_all(&status);
        });
    }

    /// The server's pid on this host (0 while a container is being started).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes activity now (see `idle_for`).
    pub fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active.store(ms, Ordering::Relaxed);
    }

    /// How long since the last request, reply, or stream opened or closed.
    pub fn idle_for(&self) -> Duration {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(ms.saturating_sub(self.last_active.load(Ordering::Relaxed)))
    }

    /// Forgets a pending request the client cancelled (`notifications/cancelled`): servers do
    /// not answer a cancelled request, so its stream is ended here.
    pub fn forget(&self, request_id: &Value) {
        if self.mode != IdMode::Owned {
            return;
        }
        let key = key_of(request_id);
        let removed = {
            let mut routes = self.routes();
            let p = routes.pending.remove(&key);
            if let Some(k) = p.as_ref().and_then(|p| p.progress_key.as_ref()) {
                routes.progress.remove(k);
            }
            p
        };
        if removed.is_some() {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        // Dropping `removed` drops its sink: the request's stream ends.
    }

    pub fn alive(&self) -> bool {
        self.exited.borrow().is_none()
    }

    /// How the process ended, once it has.
    pub fn exit_description(&self) -> Option<String> {
        self.exited.borrow().clone()
    }

    /// The last lines the process wrote on stderr, joined on one line (`None` when it wrote
    /// nothing there).
    pub fn last_words(&self) -> Option<String> {
        let words = self.last_words.lock().unwrap_or_else(|e| e.into_inner());
        (!words.is_empty()).then(|| {
            words
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(" | ")
        })
    }

    /// How the process ended, with its last words on stderr when it left some: what the
    /// bridge's own errors say (never what MCP clients are told: stderr is the log's).
    pub fn ending_in_its_words(&self) -> Option<String> {
        let why = self.exit_description()?;
        Some(match self.last_words() {
            Some(words) => format!("{why} (its stderr: {words})"),
            None => why,
        })
    }

    /// Copies stderr to the bridge's, a line at a time (one write each, so lines of different
    /// children do not interleave), keeping the last few.
    async fn relay_stderr(&self, stderr: impl AsyncRead + Unpin) {
        use std::io::Write as _;
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::with_capacity(1024);
        loop {
            line.clear();
            // Bounded, so a line without end cannot grow without limit (it is cut in pieces).
            match (&mut reader)
                .take(64 * 1024)
                .read_until(b'\n', &mut line)
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if !line.ends_with(b"\n") {
                line.push(b'\n');
            }
            let _ = std::io::stderr().lock().write_all(&line);
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let mut words = self.last_words.lock().unwrap_or_else(|e| e.into_inner());
            if words.len() == LAST_WORDS {
                words.pop_front();
            }
            words.push_back(text.chars().take(LAST_WORD_CHARS).collect());
        }
    }

    /// Resolves when the process has exited (and its pending requests have been failed).
    pub async fn wait(&self) -> String {
        let mut rx = self.exited.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => "ended".to_owned(),
        }
    }

    /// Requests awaiting a reply.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Queues a line for stdin. `Busy` when the server has stopped reading its input (its
    /// queue is full), `Ended` when the input is closed.
    fn send_line(&self, line: Bytes) -> Result<(), SendError> {
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = writer.as_ref() else {
            return Err(SendError::Ended("its input is closed".to_owned()));
        };
        w.try_send(line).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Busy(STREAM_BOUND),
            mpsc::error::TrySendError::Closed(_) => {
                SendError::Ended("its input is closed".to_owned())
            }
        })
    }

    fn send_value(&self, v: &Value) -> Result<(), SendError> {
        self.send_line(encode(v))
    }

    /// Delivers a message to a request's stream; a client that is [`STREAM_BOUND`] messages
    /// behind loses it (it is not reading; the bridge does not buffer for it).
    fn deliver(&self, sink: &Sink, msg: Bytes) {
        if let Err(mpsc::error::TrySendError::Full(_)) = sink.try_send(msg) {
            tracing::warn!(
                pid = self.pid(),
                "A client is {STREAM_BOUND} messages behind on a request's stream; dropped one"
            );
        }
    }

    /// Writes a message that expects no reply (a notification, or the client's response to a
    /// server request). The body is forwarded as received, re-encoded on one line.
    pub fn notify(&self, msg: &Value) -> Result<(), SendError> {
        if let Some(why) = self.exit_description() {
            return Err(SendError::Ended(why));
        }
        self.send_value(msg)
    }

    /// Sends a request whose messages (progress, then the reply) go to `sink`. On a shared
    /// child the id and progress token are replaced by this child's own and mapped back.
    pub fn request(
        self: &Arc<Self>,
        mut msg: Value,
        sink: Sink,
        streams: bool,
    ) -> Result<Registration, SendError> {
        let client_id = msg.get("id").cloned().unwrap_or(Value::Null);
        let seq = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (key, rewritten_id, progress_key, client_token) = match self.mode {
            IdMode::Owned => (
                key_of(&client_id),
                None,
                msg.pointer("/params/_meta/progressToken").map(key_of),
                None,
            ),
            IdMode::Shared => {
                msg["id"] = Value::from(seq);
                let theirs = msg
                    .pointer_mut("/params/_meta/progressToken")
                    .map(|t| std::mem::replace(t, Value::from(seq)));
                let progress_key = theirs.as_ref().map(|_| seq.to_string());
                (seq.to_string(), Some(client_id), progress_key, theirs)
            }
        };
        {
            let mut routes = self.routes();
            if let Some(why) = &routes.ended {
                return Err(SendError::Ended(why.clone()));
            }
            if routes.pending.contains_key(&key) {
                return Err(SendError::DuplicateId(key));
            }
            if let Some(t) = &progress_key {
                routes.progress.insert(t.clone(), key.clone());
            }
            routes.pending.insert(
                key.clone(),
                Pending {
                    sink,
                    client_id: rewritten_id,
                    progress_key,
                    client_token,
                    streams,
                    seq,
                },
            );
        }
        self.touch();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let registration = Registration {
            child: Arc::clone(self),
            key,
            seq,
        };
        // On failure the registration is dropped: the request is forgotten again.
        self.send_value(&msg).map_err(|e| match e {
            SendError::Ended(why) => SendError::Ended(self.exit_description().unwrap_or(why)),
            other => other,
        })?;
        Ok(registration)
    }

    /// Opens the session's standalone stream; what waited in the backlog is delivered first.
    /// Returns false when one is already open.
    pub fn listen(&self, sink: Sink) -> bool {
        let mut routes = self.routes();
        if routes.listener.as_ref().is_some_and(|l| !l.is_closed()) {
            return false;
        }
        // The backlog is no longer than the stream's bound, so it all fits.
        while let Some(m) = routes.backlog.pop_front() {
            let _ = sink.try_send(m);
        }
        routes.listener = Some(sink);
        drop(routes);
        self.touch();
        true
    }

    /// Delivers server messages that arrived before the session existed for its client (what
    /// a server writes before its `initialize` reply): to the open stream, or the backlog.
    pub fn hold(&self, messages: Vec<Bytes>) {
        let mut routes = self.routes();
        for m in messages {
            self.to_listener(&mut routes, m);
        }
    }

    pub fn has_listener(&self) -> bool {
        self.routes()
            .listener
            .as_ref()
            .is_some_and(|l| !l.is_closed())
    }

    /// Closes stdin (the polite end for a stdio server), waits up to `polite` for the exit,
    /// then SIGTERM to its process group, then SIGKILL after `grace`. Returns how it ended.
    pub async fn shutdown(&self, polite: Duration, grace: Duration) -> String {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Ok(why) = tokio::time::timeout(polite, self.wait()).await {
            return why;
        }
        self.signal(Signal::SIGTERM);
        if let Ok(why) = tokio::time::timeout(grace, self.wait()).await {
            return why;
        }
        self.signal(Signal::SIGKILL);
        // SIGKILL cannot be refused, but a descendant that left the group can hold stdout
        // open; the runtime's cgroup kill takes it, so this wait is bounded.
        tokio::time::timeout(Duration::from_secs(10), self.wait())
            .await
            .unwrap_or_else(|_| "killed (its output is still held open by a descendant)".to_owned())
    }

    fn signal(&self, sig: Signal) {
        match &self.kind {
            Kind::Process => {
                if let Ok(pid) = i32::try_from(self.pid()) {
                    let pid = nix::unistd::Pid::from_raw(pid);
                    let _ = nix::sys::signal::killpg(pid, sig);
                    let _ = nix::sys::signal::kill(pid, sig);
                }
            }
            // One still being created gets no signal: its stdin is closed already (signals
            // come after that), so it ends as soon as it starts.
            Kind::Container(containers, id) => {
                if let Some(id) = id.get() {
                    containers.signal(id, sig);
                }
            }
        }
    }

    async fn read_loop(&self, stdout: impl AsyncRead + Unpin) {
        let mut reader = BufReader::with_capacity(64 * 1024, stdout);
        let mut line = Vec::with_capacity(4096);
        loop {
            line.clear();
            let n = match (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(pid = self.pid(), error = %e, "Cannot read the MCP server's stdout");
                    break;
                }
            };
            if n == 0 {
                break;
            }
            if line.len() > MAX_LINE {
                tracing::error!(
                    pid = self.pid(),
                    "The MCP server wrote a line over 16 MiB; killing it"
                );
                self.signal(Signal::SIGKILL);
                break;
            }
            let text = line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Value>(text) {
                Ok(msg) => self.route(msg, text),
                Err(e) => {
                    tracing::warn!(pid = self.pid(), error = %e, line = %String::from_utf8_lossy(&text[..text.len().min(200)]), "The MCP server wrote a line that is not JSON; ignored");
                }
            }
        }
    }

    /// Delivers one message the server wrote.
    fn route(&self, mut msg: Value, raw: &[u8]) {
        let has_method = msg.get("method").is_some();
        let id = msg.get("id").filter(|v| !v.is_null()).cloned();
        let mut routes = self.routes();
        match (has_method, id) {
            // A response.
            (false, Some(id)) => {
                let key = key_of(&id);
                let Some(p) = routes.pending.remove(&key) else {
                    tracing::debug!(pid = self.pid(), id = %key, "A reply to no pending request; dropped");
                    return;
                };
                if let Some(k) = &p.progress_key {
                    routes.progress.remove(k);
                }
                drop(routes);
                self.in_flight.fetch_sub(1, Ordering::Relaxed);
                self.touch();
                let out = match p.client_id {
                    Some(client_id) => {
                        // A subscription's final result names its listen request too.
                        if let Some(sub) = subscription_id_mut(&mut msg, "result") {
                            *sub = client_id.clone();
                        }
                        msg["id"] = client_id;
                        encode(&msg)
                    }
                    None => Bytes::copy_from_slice(raw),
                };
                self.deliver(&p.sink, out);
            }
            // A notification of a 2026-07-28 subscription: it names its `subscriptions/listen`
            // request, whose stream it belongs on (on a shared child, under our id for it).
            (true, None)
                if subscription_id(&msg)
                    .is_some_and(|s| routes.pending.contains_key(&key_of(s))) =>
            {
                let key = subscription_id(&msg).map(key_of).unwrap_or_default();
                let Some(p) = routes.pending.get(&key) else {
                    return;
                };
                let out = match &p.client_id {
                    Some(theirs) => {
                        if let Some(sub) = subscription_id_mut(&mut msg, "params") {
                            *sub = theirs.clone();
                        }
                        encode(&msg)
                    }
                    None => Bytes::copy_from_slice(raw),
                };
                self.deliver(&p.sink, out);
            }
            // A notification tied to a request by its progress token.
            (true, None)
                if msg
                    .pointer("/params/progressToken")
                    .is_some_and(|t| routes.progress.contains_key(&key_of(t))) =>
            {
                let token = msg
                    .pointer("/params/progressToken")
                    .map(key_of)
                    .unwrap_or_default();
                let Some(p) = routes
                    .progress
                    .get(&token)
                    .and_then(|k| routes.pending.get(k))
                else {
                    return;
                };
                let out = match &p.client_token {
                    Some(theirs) => {
                        msg["params"]["progressToken"] = theirs.clone();
                        encode(&msg)
                    }
                    None => Bytes::copy_from_slice(raw),
                };
                self.deliver(&p.sink, out);
            }
            (true, id) => {
                if self.mode == IdMode::Shared {
                    // Modern servers must not send requests (2026-07-28); there is no client
                    // to ask on a shared child, so a request is refused at once.
                    if let Some(id) = id {
                        drop(routes);
                        let _ = self.send_value(&serde_json::json!({
                            "jsonrpc": "2.0", "id": id,
                            "error": {"code": crate::mcp::jsonrpc::code::METHOD_NOT_FOUND, "message": "this server is shared by many clients (Switchboard's stateless pool): server-to-client requests are not available; use a legacy session"},
                        }));
                    } else {
                        tracing::debug!(
                            pid = self.pid(),
                            "A notification on a shared child; dropped"
                        );
                    }
                    return;
                }
                let out = Bytes::copy_from_slice(raw);
                if routes.listener.as_ref().is_some_and(|l| !l.is_closed()) {
                    self.to_listener(&mut routes, out);
                    return;
                }
                let newest = routes
                    .pending
                    .values()
                    .filter(|p| p.streams && !p.sink.is_closed())
                    .max_by_key(|p| p.seq);
                match newest {
                    Some(p) => self.deliver(&p.sink, out),
                    None => self.to_listener(&mut routes, out),
                }
            }
            (false, None) => {
                tracing::warn!(
                    pid = self.pid(),
                    "The MCP server wrote a message that is neither a request, a notification nor a response; ignored"
                );
            }
        }
    }

    /// Delivers a server-initiated message to the standalone stream, or holds it in the
    /// backlog (the oldest goes when it is full) while none is open. A stream whose client has
    /// stopped reading ([`STREAM_BOUND`] behind) is closed: the message waits in the backlog
    /// for the client to reconnect, instead of the bridge buffering without limit.
    fn to_listener(&self, routes: &mut Routes, msg: Bytes) {
        let msg = match routes.listener.as_ref().filter(|l| !l.is_closed()) {
            None => msg,
            Some(l) => match l.try_send(msg) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(m)) => {
                    tracing::warn!(
                        pid = self.pid(),
                        "A client stopped reading its session's stream ({STREAM_BOUND} messages behind); closed the stream"
                    );
                    routes.listener = None;
                    m
                }
                Err(mpsc::error::TrySendError::Closed(m)) => m,
            },
        };
        if routes.backlog.len() == MAX_BACKLOG {
            routes.backlog.pop_front();
            tracing::warn!(
                pid = self.pid(),
                "No client stream is open; dropping the oldest held server message"
            );
        }
        routes.backlog.push_back(msg);
    }

    /// Ends every pending request with a JSON-RPC error saying how the process ended.
    fn fail_all(&self, status: &str) {
        let pending: Vec<(String, Pending)> = {
            let mut routes = self.routes();
            routes.ended = Some(status.to_owned());
            routes.progress.clear();
            routes.listener = None;
            routes.backlog.clear();
            routes.pending.drain().collect()
        };
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        for (key, p) in pending {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            let id = match p.client_id {
                Some(id) => id,
                None => serde_json::from_str(&key).unwrap_or(Value::Null),
            };
            self.deliver(&p.sink, encode(&server_ended_error(id, status)));
        }
    }
}

/// The listen request a subscription notification names (`params._meta`).
fn subscription_id(msg: &Value) -> Option<&Value> {
    msg.get("params")?
        .get("_meta")?
        .get(crate::mcp::meta::SUBSCRIPTION_ID)
}

/// The subscription id under `at` (`params` of a notification, `result` of the final reply).
fn subscription_id_mut<'a>(msg: &'a mut Value, at: &str) -> Option<&'a mut Value> {
    msg.get_mut(at)?
        .get_mut("_meta")?
        .get_mut(crate::mcp::meta::SUBSCRIPTION_ID)
}

/// The error a request gets when its server process ends before replying.
pub fn server_ended_error(id: Value, status: &str) -> Value {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": crate::mcp::jsonrpc::code::INTERNAL_ERROR,
            "message": format!("the MCP server process ended before replying ({status})"),
        },
    })
}

pub fn encode(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// How a server ended, in the words the bridge's messages use.
fn describe(e: ExitInfo) -> String {
    if e.oom_limit.is_some() {
        return format!("killed by the kernel, {e}");
    }
    match (e.code, e.signal) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(name) => format!("killed by signal {sig} ({name})"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => "ended".to_owned(),
    }
}

/// Writes lines to the child's stdin, batching what is queued into one flush.
async fn write_loop(stdin: impl AsyncWrite + Unpin, mut rx: mpsc::Receiver<Bytes>) {
    let mut out = tokio::io::BufWriter::with_capacity(64 * 1024, stdin);
    while let Some(line) = rx.recv().await {
        let mut ok = out.write_all(&line).await.is_ok() && out.write_all(b"\n").await.is_ok();
        while ok && let Ok(more) = rx.try_recv() {
            ok = out.write_all(&more).await.is_ok() && out.write_all(b"\n").await.is_ok();
        }
        if !ok || out.flush().await.is_err() {
            // EPIPE: the process is gone; the reader notices and fails what is pending.
            break;
        }
    }
    // The server sees the end of its input: a pipe closes when dropped, but a container's
    // attach connection is also read from, so only shutting its write half down ends it.
    let _ = out.shutdown().await;
}
