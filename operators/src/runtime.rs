//! Running workers: the one place the engine reaches timely's execution model through.
//!
//! [`execute`] starts `workers` timely worker threads in this process and runs `logic` on each
//! with a [`WorkerContext`], from which it builds its [`ExpenseDataflow`] and steps the worker.
//!
//! [`Placement`] says where the workers run: all in this process, or this process's share of
//! a cluster. For a cluster, [`connect`] joins the processes first: it binds this process's
//! address, connects to the lower-indexed processes and accepts the higher-indexed ones (the
//! layout timely expects), within a bounded wait (timely's own start-up retries forever and
//! prints to stdout), and exchanges a *hello* with each peer on the way, so the processes can
//! agree on how they start (the engine puts its start state there) before a single record
//! flows. The connected sockets are then handed to timely unchanged, wrapped only to count the
//! bytes that cross between processes ([`cluster_bytes`]).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use timely::worker::Worker;

use crate::aggregate::ReplayTouch;
use crate::dataflow::ExpenseDataflow;

/// One worker thread's view of the computation.
pub struct WorkerContext<'w> {
    worker: &'w mut Worker,
}

impl WorkerContext<'_> {
    /// This worker's index, in `0..peers()`.
    pub fn index(&self) -> usize {
        self.worker.index()
    }

    /// The number of workers in the computation.
    pub fn peers(&self) -> usize {
        self.worker.peers()
    }

    /// Builds the expense dataflow on this worker. Every worker must call it once.
    pub fn build_dataflow(&mut self) -> ExpenseDataflow {
        ExpenseDataflow::new(self.worker)
    }

    /// Builds the expense dataflow on this worker, reporting the cells touched in `replay`'s
    /// epochs (see [`crate::aggregate::ReplayTouch`]). Every worker must call it once, with
    /// clones of the same `replay`.
    pub fn build_dataflow_with_replay(&mut self, replay: ReplayTouch) -> ExpenseDataflow {
        ExpenseDataflow::with_replay(self.worker, replay)
    }

    /// Like [`WorkerContext::build_dataflow_with_replay`], with `options` (the reporting
    /// currency). Every worker must call it once, with the same arguments.
    pub fn build_dataflow_with_options(
        &mut self,
        replay: ReplayTouch,
        options: crate::reference::DataflowOptions,
    ) -> ExpenseDataflow {
        ExpenseDataflow::with_options(self.worker, replay, options)
    }

    /// The timely worker itself, for a dataflow of the caller's own (tests, tools).
    pub fn with_worker<R>(&mut self, f: impl FnOnce(&mut Worker) -> R) -> R {
        f(self.worker)
    }

    /// Does one round of dataflow work without blocking. Returns false when no dataflow is
    /// left to run.
    pub fn step(&mut self) -> bool {
        self.worker.step()
    }

    /// Does one round of work, or waits up to `timeout` for other workers' messages if there
    /// is none. Use it when no input is at hand, so an idle worker does not spin.
    pub fn step_or_park(&mut self, timeout: Duration) -> bool {
        self.worker.step_or_park(Some(timeout))
    }
}

/// Runs `logic` on `workers` worker threads and returns each worker's result, in index order.
///
/// # Errors
///
/// A message if the threads could not be started, or if a worker panicked.
pub fn execute<T, F>(workers: usize, logic: F) -> Result<Vec<T>, WorkersFailed>
where
    T: Send + 'static,
    F: Fn(&mut WorkerContext<'_>) -> T + Send + Sync + 'static,
{
    execute_on(Placement::Local(workers), logic)
}

/// Where the workers of a computation run.
#[derive(Debug)]
pub enum Placement {
    /// This many worker threads, all in this process.
    Local(usize),
    /// This process's workers of a cluster whose processes [`connect`] joined.
    Cluster(Connected),
}

/// Runs `logic` on this process's worker threads of `placement` and returns each one's
/// result, in index order. In a cluster, worker indices are global: process `p` with `w`
/// workers runs `p*w .. (p+1)*w`.
///
/// # Errors
///
/// A message if the threads could not be started, or if a worker panicked.
pub fn execute_on<T, F>(placement: Placement, logic: F) -> Result<Vec<T>, WorkersFailed>
where
    T: Send + 'static,
    F: Fn(&mut WorkerContext<'_>) -> T + Send + Sync + 'static,
{
    let guards = match placement {
        Placement::Local(workers) => {
            let config = timely::Config::process(workers.max(1));
            timely::execute(config, move |worker| logic(&mut WorkerContext { worker }))
        }
        Placement::Cluster(connected) => {
            use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
            use timely::communication::allocator::{AllocatorBuilder, ProcessBuilder};
            let hooks = timely::communication::Hooks::default();
            let local = ProcessBuilder::new_typed_vector(
                connected.threads,
                hooks.refill.clone(),
                hooks.spill.clone(),
            );
            let (builders, guard) = initialize_networking_from_sockets(
                local,
                connected.sockets,
                connected.process,
                connected.threads,
                hooks,
            )
            .map_err(|e| WorkersFailed(format!("starting the network threads: {e}")))?;
            timely::execute::execute_from(
                builders.into_iter().map(AllocatorBuilder::Tcp).collect(),
                Box::new(guard),
                timely::WorkerConfig::default(),
                move |worker| logic(&mut WorkerContext { worker }),
            )
        }
    }
    .map_err(WorkersFailed)?;
    guards
        .join()
        .into_iter()
        .collect::<Result<_, String>>()
        .map_err(WorkersFailed)
}

/// The processes of a cluster, connected (see [`connect`]); hand it to [`execute_on`].
#[derive(Debug)]
pub struct Connected {
    process: usize,
    threads: usize,
    /// One per process, in process order, `None` at this process's own index.
    sockets: Vec<Option<Counted>>,
    hellos: Vec<Vec<u8>>,
}

impl Connected {
    /// This process's index.
    pub fn process(&self) -> usize {
        self.process
    }

    /// How many processes.
    pub fn processes(&self) -> usize {
        self.sockets.len()
    }

    /// Every process's hello, in process order (this process's own at its index).
    pub fn hellos(&self) -> &[Vec<u8>] {
        &self.hellos
    }
}

/// The processes could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// This process's own address cannot be listened on.
    #[error("cannot listen on {addr} (this process's line in the cluster file): {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Some peers did not connect in time.
    #[error(
        "{} did not join within {}s ({}): start every process of the cluster file with its own --process index, and check that these addresses are reachable from here (firewalls, host names)",
        missing.iter().map(|(p, a)| format!("process {p} ({a})")).collect::<Vec<_>>().join(", "),
        waited.as_secs(),
        last_error
    )]
    Timeout {
        /// `(process, timely address)` of every peer still missing.
        missing: Vec<(usize, String)>,
        /// How long this process waited.
        waited: Duration,
        /// The last error seen connecting or accepting.
        last_error: String,
    },
    /// A peer answered, but not as a process of this cluster.
    #[error("process {process} ({addr}): {message}")]
    Handshake {
        /// The peer's index (as far as known).
        process: usize,
        /// Its address.
        addr: String,
        /// What was wrong.
        message: String,
    },
}

/// The first bytes each side sends: not timely's own handshake, which [`connect`] replaces.
const MAGIC: &[u8; 8] = b"SPFCLU01";

/// The largest hello accepted from a peer.
const MAX_HELLO: u64 = 1 << 20;

/// Joins this process (`process` of `addresses.len()`, `threads` workers each) to its peers,
/// waiting at most `wait` for all of them, and exchanges `hello` with each: every process
/// gets every process's hello, in process order ([`Connected::hellos`]).
///
/// # Errors
///
/// [`ConnectError`]: this address cannot be listened on, a peer did not join in time, or a
/// peer runs another number of workers or answered something else.
pub fn connect(
    addresses: &[String],
    process: usize,
    threads: usize,
    hello: &[u8],
    wait: Duration,
) -> Result<Connected, ConnectError> {
    let deadline = Instant::now() + wait;
    let processes = addresses.len();
    let me = &addresses[process];
    let listener = TcpListener::bind(me).map_err(|source| ConnectError::Bind {
        addr: me.clone(),
        source,
    })?;
    let mut sockets: Vec<Option<Counted>> = (0..processes).map(|_| None).collect();
    let mut hellos: Vec<Vec<u8>> = vec![Vec::new(); processes];
    hellos[process] = hello.to_vec();
    let mut last_error = String::from("no error seen");
    // Lower-indexed peers: connect to them, in a thread of their own, while this thread
    // accepts the higher-indexed ones (a lower peer may be waiting for this one's accept too).
    let lower: Vec<(usize, String)> = addresses[..process].iter().cloned().enumerate().collect();
    let ours = hello.to_vec();
    let dialer = std::thread::Builder::new()
        .name("spendflow-cluster-dial".into())
        .spawn(move || dial(lower, process, threads, &ours, deadline))
        .map_err(|source| ConnectError::Bind {
            addr: me.clone(),
            source,
        })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ConnectError::Bind {
            addr: me.clone(),
            source,
        })?;
    let mut waiting: usize = processes - process - 1;
    while waiting > 0 && Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, from)) => {
                match accept_one(stream, process, processes, threads, hello, deadline) {
                    Ok((peer, stream, their_hello)) => {
                        if sockets[peer].is_none() {
                            waiting -= 1;
                        }
                        sockets[peer] = Some(Counted(stream));
                        hellos[peer] = their_hello;
                    }
                    Err(HandshakeFailure::Fatal(e)) => return Err(e),
                    Err(HandshakeFailure::Retry(e)) => last_error = format!("from {from}: {e}"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => last_error = format!("accepting: {e}"),
        }
    }
    let dialed = dialer.join().map_err(|_| ConnectError::Handshake {
        process,
        addr: me.clone(),
        message: "the thread connecting to peers panicked".into(),
    })?;
    let (dialed, dial_error) = dialed?;
    for (peer, stream, their_hello) in dialed {
        sockets[peer] = Some(Counted(stream));
        hellos[peer] = their_hello;
    }
    if let Some(e) = dial_error {
        last_error = e;
    }
    let missing: Vec<(usize, String)> = (0..processes)
        .filter(|&p| p != process && sockets[p].is_none())
        .map(|p| (p, addresses[p].clone()))
        .collect();
    if !missing.is_empty() {
        return Err(ConnectError::Timeout {
            missing,
            waited: wait,
            last_error,
        });
    }
    Ok(Connected {
        process,
        threads,
        sockets,
        hellos,
    })
}

type Joined = (usize, TcpStream, Vec<u8>);

/// Connects to every lower-indexed peer until `deadline`; returns the ones joined and the
/// last error seen. A handshake a peer refused is fatal.
fn dial(
    lower: Vec<(usize, String)>,
    process: usize,
    threads: usize,
    hello: &[u8],
    deadline: Instant,
) -> Result<(Vec<Joined>, Option<String>), ConnectError> {
    let mut joined = Vec::new();
    let mut last_error = None;
    for (peer, addr) in lower {
        loop {
            let attempt = addr
                .to_socket_addrs()
                .map_err(|e| format!("resolving {addr}: {e}"))
                .and_then(|mut addrs| {
                    addrs
                        .next()
                        .ok_or_else(|| format!("{addr} resolves to nothing"))
                })
                .and_then(|target| {
                    let left = deadline.saturating_duration_since(Instant::now());
                    TcpStream::connect_timeout(
                        &target,
                        left.clamp(Duration::from_millis(10), Duration::from_secs(2)),
                    )
                    .map_err(|e| format!("connecting to process {peer} at {addr}: {e}"))
                });
            match attempt {
                Ok(mut stream) => {
                    let exchanged = set_up(&stream, deadline)
                        .and_then(|()| write_hello(&mut stream, process, threads, hello))
                        .and_then(|()| read_hello(&mut stream));
                    match exchanged {
                        Ok((index, their_threads, their_hello)) => {
                            if index != peer as u64 {
                                return Err(ConnectError::Handshake {
                                    process: peer,
                                    addr,
                                    message: format!(
                                        "answered as process {index}: is the cluster file the same in every process?"
                                    ),
                                });
                            }
                            check_threads(peer, &addr, threads, their_threads)?;
                            let _ = stream.set_read_timeout(None);
                            let _ = stream.set_write_timeout(None);
                            joined.push((peer, stream, their_hello));
                            break;
                        }
                        Err(e) => last_error = Some(format!("process {peer} at {addr}: {e}")),
                    }
                }
                Err(e) => last_error = Some(e),
            }
            if Instant::now() >= deadline {
                return Ok((joined, last_error));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok((joined, last_error))
}

enum HandshakeFailure {
    /// Not a peer, or it went away: keep waiting.
    Retry(String),
    /// A peer of another shape: stop.
    Fatal(ConnectError),
}

fn accept_one(
    mut stream: TcpStream,
    process: usize,
    processes: usize,
    threads: usize,
    hello: &[u8],
    deadline: Instant,
) -> Result<Joined, HandshakeFailure> {
    let retry = |e: std::io::Error| HandshakeFailure::Retry(e.to_string());
    stream.set_nonblocking(false).map_err(retry)?;
    set_up(
        &stream,
        deadline.max(Instant::now() + Duration::from_secs(5)),
    )
    .map_err(retry)?;
    let (index, their_threads, their_hello) = read_hello(&mut stream).map_err(retry)?;
    let peer = usize::try_from(index).unwrap_or(usize::MAX);
    let addr = stream
        .peer_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    if peer <= process || peer >= processes {
        return Err(HandshakeFailure::Fatal(ConnectError::Handshake {
            process: peer,
            addr,
            message: format!(
                "connected as process {index}, which process {process} of {processes} does not accept: is the cluster file the same in every process?"
            ),
        }));
    }
    check_threads(peer, &addr, threads, their_threads).map_err(HandshakeFailure::Fatal)?;
    write_hello(&mut stream, process, threads, hello).map_err(retry)?;
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(None);
    Ok((peer, stream, their_hello))
}

fn check_threads(peer: usize, addr: &str, ours: usize, theirs: u64) -> Result<(), ConnectError> {
    if theirs == ours as u64 {
        return Ok(());
    }
    Err(ConnectError::Handshake {
        process: peer,
        addr: addr.to_string(),
        message: format!(
            "runs {theirs} workers, this process {ours}: every process of a cluster runs the same -w"
        ),
    })
}

fn set_up(stream: &TcpStream, deadline: Instant) -> std::io::Result<()> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))
}

fn write_hello(
    stream: &mut TcpStream,
    process: usize,
    threads: usize,
    hello: &[u8],
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(32 + hello.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(process as u64).to_le_bytes());
    out.extend_from_slice(&(threads as u64).to_le_bytes());
    out.extend_from_slice(&(hello.len() as u64).to_le_bytes());
    out.extend_from_slice(hello);
    stream.write_all(&out)?;
    stream.flush()
}

/// Reads exactly a hello (never more: timely's traffic follows on the same socket).
fn read_hello(stream: &mut TcpStream) -> std::io::Result<(u64, u64, Vec<u8>)> {
    let mut head = [0u8; 32];
    stream.read_exact(&mut head)?;
    if &head[..8] != MAGIC {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a spendflow cluster process (or another version)",
        ));
    }
    let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    let (index, threads, len) = (word(8), word(16), word(24));
    if len > MAX_HELLO {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("hello of {len} bytes"),
        ));
    }
    let mut hello = vec![0u8; usize::try_from(len).unwrap_or(0)];
    stream.read_exact(&mut hello)?;
    Ok((index, threads, hello))
}

static SENT: AtomicU64 = AtomicU64::new(0);
static RECEIVED: AtomicU64 = AtomicU64::new(0);

/// Bytes this process sent to and received from other processes of its cluster so far
/// (timely's traffic, headers included): `(sent, received)`.
pub fn cluster_bytes() -> (u64, u64) {
    (
        SENT.load(Ordering::Relaxed),
        RECEIVED.load(Ordering::Relaxed),
    )
}

/// A socket to a peer that counts the bytes through it.
#[derive(Debug)]
struct Counted(TcpStream);

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        RECEIVED.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        SENT.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl timely::communication::allocator::zero_copy::stream::Stream for Counted {
    fn try_clone(&self) -> std::io::Result<Self> {
        self.0.try_clone().map(Counted)
    }

    fn set_nonblocking(&self, nonblocking: bool) -> std::io::Result<()> {
        self.0.set_nonblocking(nonblocking)
    }

    fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()> {
        self.0.shutdown(how)
    }
}

/// The worker threads could not be started, or one of them panicked (timely's message).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("dataflow workers: {0}")]
pub struct WorkersFailed(pub String);
