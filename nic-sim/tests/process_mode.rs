//! Process mode (device.md section 19.4): the real `ctoffload-nic-sim` binary, driven by
//! the real driver `Device` over its control socket and shared memory.
//!
//! Every test starts its own simulator process with its socket in a temporary
//! directory, kills and reaps the process when it ends (also on panic), and bounds
//! every wait.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ctoffload_driver::device::{Clock, Device, DeviceConfig, FlowCommand, Outcome, TxFrame};
use ctoffload_driver::sim_io::SimIo;
use ctoffload_driver::sim_process::{SimFault, SimProcess};
use ctoffload_driver::{DeviceIo, DriverError};
use ctoffload_hw_regs::regs;
use ctoffload_hw_regs::{CompletionStatus, FlowAction, FlowKey, L4Proto, RxReason};
use ctoffload_nic_sim::control::{self, ErrorKind, MAX_MESSAGE, Reply};
use ctoffload_nic_sim::mem::SharedRegion;

/// Bound on any single wait in these tests.
const T: Duration = Duration::from_secs(10);

struct SimProc {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl SimProc {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("ctl");
        let child = Command::new(env!("CARGO_BIN_EXE_ctoffload-nic-sim"))
            .arg("--socket")
            .arg(&socket)
            .args(["--buckets-log2", "4", "--port", "0=mem", "--port", "1=mem"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn ctoffload-nic-sim");
        Self {
            child,
            socket,
            _dir: dir,
        }
    }

    fn client(&self) -> SimProcess {
        SimProcess::connect(&self.socket, T).expect("connect")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (bounded) for the process to exit on its own.
    fn wait_exit(&mut self) -> Option<ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < T {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for SimProc {
    fn drop(&mut self) {
        self.kill();
    }
}

// `..Default` keeps this compiling when the engine grows a setting.
#[allow(clippy::needless_update)]
fn dev_cfg(use_flr: bool) -> DeviceConfig {
    DeviceConfig {
        cmd_ring_log2: 6,
        rx_ring_log2: 5,
        tx_ring_log2: 5,
        cmd_timeout_ns: 50_000_000,
        clock: Clock::monotonic(),
        dump_chunk: 64,
        // The model is another process on a loaded machine: allow scheduling delays.
        ready_timeout: Duration::from_secs(2),
        enable_timeout: Duration::from_secs(2),
        use_flr,
        ..DeviceConfig::default()
    }
}

fn bring_up(sim: &SimProc, use_flr: bool) -> (SimProcess, Device<SimIo>) {
    let client = sim.client();
    let io = client.attach().expect("attach");
    let dev = Device::new(io, dev_cfg(use_flr)).expect("bring-up over the control socket");
    (client, dev)
}

fn key(sport: u16) -> FlowKey {
    FlowKey::ipv4(
        0,
        L4Proto::Tcp,
        0,
        [10, 0, 0, 1].into(),
        sport,
        [10, 0, 0, 2].into(),
        80,
    )
}

/// Ethernet + IPv4 (valid header checksum) + TCP, 64 bytes, matching `key(sport)`.
fn tcp_frame(sport: u16, tcp_flags: u8) -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let mut sum = 0u32;
    for c in ip.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    let csum = !u16::try_from(sum).expect("folded");
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = tcp_flags;
    f
}

/// Drains port `port` until `n` frames came out (bounded).
fn drain(client: &SimProcess, port: u8, n: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < n && t0.elapsed() < T {
        got.extend(client.port_drain(port, 16).expect("drain"));
        if got.len() < n {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    got
}

/// `FLOW_COUNT`, once it reads `want` (the model rewrites RO registers at the end of a
/// poll, after the completions: bounded wait).
fn flow_count(dev: &Device<SimIo>, want: u32) -> u32 {
    let t0 = Instant::now();
    loop {
        let n = dev.read_register(regs::FLOW_COUNT).expect("FLOW_COUNT");
        if n == want || t0.elapsed() > T {
            return n;
        }
        std::thread::yield_now();
    }
}

#[test]
fn bring_up_batch_insert_delete_and_counter_dump() {
    let sim = SimProc::start(&[]);
    let (client, mut dev) = bring_up(&sim, false);
    assert_eq!(dev.capabilities().flow_capacity, 128);
    assert_eq!(
        dev.capabilities().impl_id,
        ctoffload_hw_regs::regs::IMPL_ID_SIMULATOR
    );

    let inserts: Vec<_> = (0..20u16)
        .map(|p| FlowCommand::Insert {
            key: key(1000 + p),
            action: FlowAction::forward(1),
        })
        .collect();
    let results = dev.execute(&inserts, T).expect("inserts");
    assert_eq!(results.len(), 20);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(flow_count(&dev, 20), 20);

    // Traffic on flow 0 through memory port 0 comes out of port 1 and is counted.
    let frame = tcp_frame(1000, 0x10);
    client
        .port_inject(0, &[&frame, &frame, &frame])
        .expect("inject");
    let out = drain(&client, 1, 3);
    assert_eq!(out.len(), 3);
    assert_eq!(out[0].len(), frame.len());

    let slot = results[0].flow_id.expect("slot");
    let mut samples = Vec::new();
    dev.dump_all_counters(&mut samples).expect("counter dump");
    assert_eq!(samples.len(), 128);
    assert_eq!(samples.iter().filter(|s| s.valid).count(), 20);
    let s = samples
        .iter()
        .find(|s| s.flow_id == slot)
        .expect("sample of flow 0");
    assert_eq!(s.counters.packets, 3);
    assert_eq!(s.counters.bytes, 3 * 64);

    let deletes: Vec<_> = results
        .iter()
        .zip(&inserts)
        .map(|(r, c)| match c {
            FlowCommand::Insert { key, .. } => FlowCommand::Delete {
                flow_id: r.flow_id.expect("slot"),
                key: *key,
            },
            _ => unreachable!("inserts only"),
        })
        .collect();
    let results = dev.execute(&deletes, T).expect("deletes");
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(flow_count(&dev, 0), 0);

    let stats = client.stats().expect("stats");
    assert!(
        stats.get("commands").copied().unwrap_or(0) >= 40,
        "{stats:?}"
    );
    assert!(stats.get("hits").copied().unwrap_or(0) >= 3, "{stats:?}");
    dev.shutdown().expect("shutdown");
}

#[test]
fn exception_rx_and_host_tx_through_memory_ports() {
    let sim = SimProc::start(&[]);
    let (client, mut dev) = bring_up(&sim, false);
    // No flow: a miss is punted to the exception RX ring.
    let frame = tcp_frame(7, 0x10);
    client.port_inject(0, &[&frame, &frame]).expect("inject");
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < 2 && t0.elapsed() < T {
        dev.rx_poll(16, |m, b| got.push((m.port, m.reason, b.to_vec())))
            .expect("rx");
    }
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|(port, reason, bytes)| *port == 0
        && *reason == Ok(RxReason::Miss)
        && *bytes == frame));

    // Host TX goes out of the named port.
    let tx = tcp_frame(8, 0x10);
    let frames = [TxFrame { port: 1, data: &tx }];
    assert_eq!(dev.tx_send(&frames).expect("tx"), 1);
    let out = drain(&client, 1, 1);
    assert_eq!(out, vec![tx]);
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < 1 && t0.elapsed() < T {
        sent += dev.tx_reap().expect("reap").sent;
    }
    assert_eq!(sent, 1);
    assert!(client.port_drain(0, 16).expect("drain").is_empty());
}

#[test]
fn flr_over_the_socket_resets_the_device() {
    let sim = SimProc::start(&[]);
    // Bring-up itself resets with FLR (the `flr` request).
    let (client, mut dev) = bring_up(&sim, true);
    let resets = client.stats().expect("stats")["resets"];
    assert!(resets >= 1);
    let r = dev
        .execute(
            &[FlowCommand::Insert {
                key: key(1),
                action: FlowAction::forward(0),
            }],
            T,
        )
        .expect("insert");
    assert!(r[0].is_ok());
    let count_before = dev.read_register(regs::RESET_COUNT).expect("RESET_COUNT");

    dev.reinit().expect("reinit with FLR");
    assert!(dev.is_up());
    assert!(dev.read_register(regs::RESET_COUNT).expect("RESET_COUNT") > count_before);
    assert!(
        dev.dump_table().expect("dump").is_empty(),
        "FLR empties the table"
    );
    assert!(client.stats().expect("stats")["resets"] > resets);
}

#[test]
fn faults_and_manual_clock_over_the_socket() {
    let sim = SimProc::start(&["--clock", "manual"]);
    let (client, mut dev) = bring_up(&sim, false);
    client.set_time(123_456_789).expect("set_time");
    let t0 = Instant::now();
    while dev.io().read_timestamp().expect("ts") != 123_456_789 && t0.elapsed() < T {
        std::thread::yield_now();
    }
    assert_eq!(dev.io().read_timestamp().expect("ts"), 123_456_789);

    client
        .inject_fault(SimFault::DeviceErrorNext { n: 1 })
        .expect("fault");
    let r = dev
        .execute(
            &[FlowCommand::Insert {
                key: key(2),
                action: FlowAction::forward(0),
            }],
            T,
        )
        .expect("insert");
    assert_eq!(r[0].outcome, Outcome::Status(CompletionStatus::DeviceError));

    client
        .inject_fault(SimFault::DropCompletions { n: 1 })
        .expect("fault");
    let s = dev.submit(&[FlowCommand::Nop]).expect("submit");
    let token = s.token(0).expect("token");
    let e = dev
        .wait_for(token, Duration::from_millis(300))
        .expect_err("the completion is dropped");
    assert!(matches!(e, DriverError::CommandTimeout { .. }), "{e:?}");
    client.inject_fault(SimFault::Clear).expect("clear");
    assert!(client.stats().expect("stats")["faults_fired"] >= 2);
}

/// Sends raw bytes (and fds) on a raw connection and decodes the reply.
fn raw(conn: &std::os::fd::OwnedFd, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) -> Reply {
    control::send_message(conn.as_fd(), bytes, fds).expect("send");
    assert!(
        control::wait_readable(conn.as_fd(), T).expect("poll"),
        "no reply"
    );
    let m = control::recv_message(conn.as_fd()).expect("recv");
    let env: control::Envelope<Reply> = serde_json::from_slice(&m.bytes).expect("reply is JSON");
    env.body
}

fn kind(r: &Reply) -> Option<ErrorKind> {
    match r {
        Reply::Error { kind, .. } => Some(*kind),
        _ => None,
    }
}

fn connect_raw(path: &Path) -> std::os::fd::OwnedFd {
    let t0 = Instant::now();
    loop {
        match control::connect(path) {
            Ok(c) => return c,
            Err(e) if t0.elapsed() > T => panic!("connect: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[test]
fn bad_control_messages_get_error_replies() {
    let mut sim = SimProc::start(&["--port", "1=mem", "--num-ports", "3"]);
    let conn = connect_raw(&sim.socket);
    let memfd = SharedRegion::create_memfd("t", 8192).expect("memfd");

    let cases: &[(&[u8], ErrorKind)] = &[
        (b"not json at all", ErrorKind::BadMessage),
        (br#"{"id":1,"op":"no_such_op"}"#, ErrorKind::BadMessage),
        (
            br#"{"id":2,"op":"dma_map","iova":"x"}"#,
            ErrorKind::BadMessage,
        ),
        (br#"{"id":3}"#, ErrorKind::BadMessage),
        (
            br#"{"id":4,"op":"hello","version":99}"#,
            ErrorKind::Unsupported,
        ),
        (
            br#"{"id":5,"op":"set_time","now_ns":1}"#,
            ErrorKind::Unsupported,
        ),
        (
            br#"{"id":6,"op":"port_drain","port":2,"max":1}"#,
            ErrorKind::Unsupported,
        ),
        (
            br#"{"id":7,"op":"port_drain","port":200,"max":1}"#,
            ErrorKind::Unsupported,
        ),
        (
            br#"{"id":8,"op":"dma_map","iova":4096,"offset":0,"len":4096}"#,
            ErrorKind::BadFds,
        ),
        (b"", ErrorKind::BadMessage),
    ];
    for (bytes, want) in cases {
        if bytes.is_empty() {
            continue; // an empty SEQPACKET message reads as end of stream; see below
        }
        let r = raw(&conn, bytes, &[]);
        assert_eq!(
            kind(&r),
            Some(*want),
            "{:?} -> {r:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    // A frame longer than a frame buffer.
    let big = format!(
        r#"{{"id":10,"op":"port_inject","port":0,"frames":[{:?}]}}"#,
        vec![0u8; 3000]
    );
    assert_eq!(
        kind(&raw(&conn, big.as_bytes(), &[])),
        Some(ErrorKind::Failed)
    );
    // Descriptors where none belong.
    let r = raw(&conn, br#"{"id":11,"op":"stats"}"#, &[memfd.as_fd()]);
    assert_eq!(kind(&r), Some(ErrorKind::BadFds));
    // An unaligned mapping, then a good one, then an overlapping one.
    let map = |iova: u64, len: u64| {
        format!(r#"{{"id":12,"op":"dma_map","iova":{iova},"offset":0,"len":{len}}}"#)
    };
    assert_eq!(
        kind(&raw(&conn, map(4097, 4096).as_bytes(), &[memfd.as_fd()])),
        Some(ErrorKind::Failed)
    );
    assert_eq!(
        raw(&conn, map(0x10000, 8192).as_bytes(), &[memfd.as_fd()]),
        Reply::Ok
    );
    assert_eq!(
        kind(&raw(&conn, map(0x11000, 4096).as_bytes(), &[memfd.as_fd()])),
        Some(ErrorKind::Failed)
    );
    // Unmapping half of a mapping would split it.
    let r = raw(
        &conn,
        br#"{"id":9,"op":"dma_unmap","iova":65536,"len":4096}"#,
        &[],
    );
    assert_eq!(kind(&r), Some(ErrorKind::Failed));
    // An unsealed fd (a plain file) is refused.
    let file = tempfile::tempfile().expect("file");
    file.set_len(4096).expect("size");
    assert_eq!(
        kind(&raw(&conn, map(0x20000, 4096).as_bytes(), &[file.as_fd()])),
        Some(ErrorKind::Failed)
    );
    // Too long: cut at MAX_MESSAGE and refused.
    let huge = vec![b' '; MAX_MESSAGE + 10];
    let sent = rustix::net::send(&conn, &huge, rustix::net::SendFlags::empty()).expect("send");
    assert_eq!(sent, huge.len());
    assert!(control::wait_readable(conn.as_fd(), T).expect("poll"));
    let m = control::recv_message(conn.as_fd()).expect("recv");
    let r: control::Envelope<Reply> = serde_json::from_slice(&m.bytes).expect("JSON");
    assert_eq!(kind(&r.body), Some(ErrorKind::BadMessage));

    // The connection still works, and so does the process.
    assert!(matches!(
        raw(&conn, br#"{"id":13,"op":"stats"}"#, &[]),
        Reply::Stats { .. }
    ));
    assert!(matches!(
        raw(
            &conn,
            br#"{"id":14,"op":"dma_unmap","iova":65536,"len":8192}"#,
            &[]
        ),
        Reply::Ok
    ));
    drop(conn);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        sim.alive(),
        "a client disconnect must not stop the simulator"
    );
    let client = sim.client();
    assert!(client.stats().is_ok());
}

#[test]
fn killed_simulator_gives_driver_errors_not_panics_or_hangs() {
    let mut sim = SimProc::start(&[]);
    let (client, mut dev) = bring_up(&sim, false);
    let r = dev
        .execute(
            &[FlowCommand::Insert {
                key: key(3),
                action: FlowAction::forward(0),
            }],
            T,
        )
        .expect("insert");
    assert!(r[0].is_ok());

    sim.kill();
    let t0 = Instant::now();
    while !client.is_gone() && t0.elapsed() < T {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(client.is_gone(), "the watcher sees the process die");

    let t0 = Instant::now();
    let e = dev
        .execute(&[FlowCommand::Nop], Duration::from_secs(1))
        .expect_err("no device");
    assert!(matches!(e, DriverError::SimGone { .. }), "{e:?}");
    let e = dev.read_register(regs::STATUS).expect_err("no device");
    assert!(matches!(e, DriverError::SimGone { .. }), "{e:?}");
    let e = client.stats().expect_err("no process");
    assert!(matches!(e, DriverError::SimGone { .. }), "{e:?}");
    let e = dev.reinit().expect_err("no device");
    assert!(matches!(e, DriverError::SimGone { .. }), "{e:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "errors come promptly"
    );
}

#[test]
fn command_in_flight_when_the_simulator_dies_times_out() {
    let mut sim = SimProc::start(&[]);
    let (client, mut dev) = bring_up(&sim, false);
    // Its completion is never written; then the process dies.
    client
        .inject_fault(SimFault::DropCompletions { n: 1 })
        .expect("fault");
    let s = dev.submit(&[FlowCommand::Nop]).expect("submit");
    sim.kill();
    let t0 = Instant::now();
    let e = dev
        .wait_for(s.token(0).expect("token"), Duration::from_millis(500))
        .expect_err("never completes");
    assert!(
        matches!(
            e,
            DriverError::CommandTimeout { .. } | DriverError::SimGone { .. }
        ),
        "{e:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn shutdown_request_and_exit_with_client() {
    let mut sim = SimProc::start(&[]);
    let client = sim.client();
    client.shutdown().expect("shutdown");
    let st = sim.wait_exit().expect("exits after shutdown");
    assert!(st.success(), "{st:?}");
    assert!(!sim.socket.exists(), "socket file removed");

    // A `/dev/shm` BAR lives while the process does and is removed at shutdown.
    let name = format!("ctoffload-test-bar-{}", std::process::id());
    let shm = Path::new("/dev/shm").join(&name);
    let mut sim = SimProc::start(&["--bar-shm", &name]);
    let (client, dev) = bring_up(&sim, false);
    assert!(shm.exists());
    drop(dev);
    client.shutdown().expect("shutdown");
    assert!(sim.wait_exit().expect("exits").success());
    assert!(!shm.exists(), "BAR file removed");

    let mut sim = SimProc::start(&["--exit-with-client"]);
    let (client, dev) = bring_up(&sim, false);
    drop(dev);
    drop(client);
    let st = sim.wait_exit().expect("exits with its client");
    assert!(st.success(), "{st:?}");
    assert!(!sim.socket.exists(), "socket file removed");
}

#[test]
fn bad_command_line_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_ctoffload-nic-sim"))
        .arg("--socket")
        .arg(dir.path().join("ctl"))
        .args(["--buckets-log2", "30"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("buckets_log2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ctoffload-nic-sim"))
        .arg("--socket")
        .arg(dir.path().join("ctl"))
        .args(["--port", "9=mem"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(!dir.path().join("ctl").exists());
}

/// A veth pair unique to this process, deleted on drop.
struct Veth {
    a: String,
    b: String,
}

impl Veth {
    fn create() -> Result<Self, String> {
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("cannot run ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
            }
        };
        let tag = format!("ctp{}", std::process::id() % 1_000_000);
        let (a, b) = (format!("{tag}a"), format!("{tag}b"));
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
        let v = Self { a, b };
        for n in [&v.a, &v.b] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{n}/disable_ipv6"), "1");
            ip(&["link", "set", n, "up"])?;
        }
        let t0 = Instant::now();
        let up = |n: &str| {
            std::fs::read_to_string(format!("/sys/class/net/{n}/operstate"))
                .is_ok_and(|s| s.trim() == "up")
        };
        while t0.elapsed() < T && !(up(&v.a) && up(&v.b)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(v)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.a]).output();
    }
}

#[test]
fn af_packet_port_in_process_mode() {
    use ctoffload_nic_sim::port::{AfPacketPort, PortBackend};
    let veth = match Veth::create() {
        Ok(v) => v,
        Err(reason) => {
            eprintln!("skipping: needs root and iproute2: {reason}");
            return;
        }
    };
    let sim = SimProc::start(&[
        "--num-ports",
        "3",
        "--port",
        &format!("2=af-packet:{}", veth.a),
    ]);
    let (_client, mut dev) = bring_up(&sim, false);
    let mut peer = AfPacketPort::open(&veth.b).expect("open peer");
    // A frame from the wire reaches the exception path on port 2 (resent until it
    // arrives: a link may drop while it comes up).
    let frame = tcp_frame(4242, 0x10);
    let mut got = None;
    let t0 = Instant::now();
    while got.is_none() && t0.elapsed() < T {
        peer.send(&frame).expect("send");
        let t1 = Instant::now();
        while got.is_none() && t1.elapsed() < Duration::from_millis(250) {
            dev.rx_poll(16, |m, b| {
                if b == frame.as_slice() {
                    got = Some(m.port);
                }
            })
            .expect("rx");
        }
    }
    assert_eq!(got, Some(2));
}

#[test]
fn a_detached_client_leaves_and_the_next_attaches_to_the_running_table() {
    let mut sim = SimProc::start(&[]);
    let (client, mut dev) = bring_up(&sim, false);
    let r = dev
        .execute(
            &[FlowCommand::Insert {
                key: key(5000),
                action: FlowAction::forward(1),
            }],
            T,
        )
        .expect("insert");
    let slot = r[0].flow_id.expect("inserted");
    let resets = dev.read_register(regs::RESET_COUNT).expect("RESET_COUNT");
    let frame = tcp_frame(5000, 0x10);
    client.port_inject(0, &[&frame]).expect("inject");
    assert_eq!(drain(&client, 1, 1).len(), 1, "forwarded while attached");

    // The first client detaches and goes away with its memory.
    drop(dev.detach().expect("detach"));
    drop(client);
    // Forwarding continues with nobody attached (a miss would be dropped, not punted).
    let watcher = sim.client();
    watcher.port_inject(0, &[&frame, &frame]).expect("inject");
    assert_eq!(drain(&watcher, 1, 2).len(), 2, "forwarded while detached");
    assert!(sim.alive());

    // A new client maps its rings at the same IOVAs and finds the table and counters.
    let next = sim.client();
    let io = next.attach().expect("hello");
    let mut dev = Device::attach(io, dev_cfg(false)).expect("attach without reset");
    assert_eq!(
        dev.read_register(regs::RESET_COUNT).expect("RESET_COUNT"),
        resets,
        "no reset"
    );
    let table = dev.dump_table().expect("table dump");
    assert_eq!(table.len(), 1);
    assert_eq!(table[0].flow_id, slot);
    assert_eq!(table[0].key, key(5000));
    let mut samples = Vec::new();
    dev.dump_all_counters(&mut samples).expect("counter dump");
    let s = samples.iter().find(|s| s.flow_id == slot).expect("sample");
    assert_eq!(s.counters.packets, 3, "counted across the detach");
    // The new client's rings work: commands complete, misses reach it.
    let r = dev.execute(&[FlowCommand::Nop], T).expect("nop");
    assert!(r[0].is_ok(), "{r:?}");
    let miss = tcp_frame(6000, 0x10);
    next.port_inject(0, &[&miss]).expect("inject");
    let mut got = 0;
    let t0 = Instant::now();
    while got == 0 && t0.elapsed() < T {
        dev.rx_poll(16, |_, b| got += usize::from(b == miss.as_slice()))
            .expect("rx");
    }
    assert_eq!(got, 1, "a miss is punted to the new client");
}

#[test]
fn a_client_that_dies_attached_takes_its_memory_and_the_device_faults_on_use() {
    let sim = SimProc::start(&[]);
    let (client, dev) = bring_up(&sim, false);
    // Gone without detaching: its mappings are removed with its connection.
    drop(dev);
    drop(client);
    let watcher = sim.client();
    // A miss needs an RX buffer in the vanished memory: DMA fault, fatal.
    let frame = tcp_frame(7000, 0x10);
    let next = sim.client();
    let io = next.attach().expect("hello");
    let t0 = Instant::now();
    let mut fatal = false;
    while !fatal && t0.elapsed() < T {
        watcher.port_inject(0, &[&frame]).expect("inject");
        let st = io.read32(regs::STATUS).expect("STATUS");
        fatal = regs::Status::from_bits_retain(st).contains(regs::Status::FATAL);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(fatal, "the device faults on the departed client's memory");
    // Not attachable; a reset brings it back with an empty table.
    let e = Device::attach(io, dev_cfg(false)).expect_err("fatal device");
    assert!(
        !matches!(e, DriverError::SimGone { .. }),
        "a device error, not a lost process: {e:?}"
    );
    let (_c, mut dev) = bring_up(&sim, false);
    assert!(dev.dump_table().expect("dump").is_empty());
}
