//! Shared by `tests/cli.rs` and `tests/config.rs`: run the real `ctoffload` binary
//! (agent and client), bounded in time, killed on drop, in a temporary directory.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;

pub const BIN: &str = env!("CARGO_BIN_EXE_ctoffload");

/// Longest a client command may run.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(20);

/// A child process killed (and reaped) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait for `child` at most `limit`; kill it past that. Returns its output.
pub fn wait_output(child: Child, limit: Duration) -> Output {
    let mut p = Proc(child);
    let start = Instant::now();
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            if let Some(mut o) = p.0.stdout.take() {
                o.read_to_end(&mut stdout).unwrap();
            }
            if let Some(mut e) = p.0.stderr.take() {
                e.read_to_end(&mut stderr).unwrap();
            }
            return Output {
                status,
                stdout,
                stderr,
            };
        }
        assert!(start.elapsed() < limit, "command ran over {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run the binary with `args` (no agent connection options added).
pub fn run(args: &[&str]) -> Output {
    // Output goes to files so that a large output cannot block the child.
    let dir = tempfile::tempdir().unwrap();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let child = Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .spawn()
        .unwrap();
    let out = wait_output(child, CMD_TIMEOUT);
    Output {
        status: out.status,
        stdout: std::fs::read(&o).unwrap(),
        stderr: std::fs::read(&e).unwrap(),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Assert success and return stdout.
#[track_caller]
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// A port free now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub const A: [u8; 4] = [10, 0, 0, 1];
pub const B: [u8; 4] = [192, 0, 2, 10];

fn tcp(
    src: [u8; 4],
    dst: [u8; 4],
    sp: u16,
    dp: u16,
    seq: u32,
    ack: Option<u32>,
    syn: bool,
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(src, dst, 64)
        .tcp(sp, dp, seq, 65535);
    if syn {
        b = b.syn();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut v = Vec::new();
    b.write(&mut v, &[]).unwrap();
    v
}

/// The frames the agent is preloaded with: four connections.
/// - TCP 10.0.0.1:40000 -> 192.0.2.10:80, ESTABLISHED (and offloaded: 3 packets),
/// - TCP 10.0.0.1:40001 -> 198.51.100.1:443, SYN_SENT,
/// - UDP 10.0.0.2:5000 -> 192.0.2.53:53, unreplied,
/// - ICMP echo 10.0.0.3 -> 192.0.2.1 id 7.
pub fn frames() -> Vec<Vec<u8>> {
    let mut v = vec![
        tcp(A, B, 40000, 80, 100, None, true),
        tcp(B, A, 80, 40000, 500, Some(101), true),
        tcp(A, B, 40000, 80, 101, Some(501), false),
        tcp(A, [198, 51, 100, 1], 40001, 443, 7, None, true),
    ];
    let mut u = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4([10, 0, 0, 2], [192, 0, 2, 53], 64)
        .udp(5000, 53)
        .write(&mut u, b"query")
        .unwrap();
    v.push(u);
    let mut i = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4([10, 0, 0, 3], [192, 0, 2, 1], 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut i, b"ping")
        .unwrap();
    v.push(i);
    v
}

pub fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = pcap_file::pcap::PcapWriter::new(f).unwrap();
    for (n, fr) in frames.iter().enumerate() {
        let len = u32::try_from(fr.len()).unwrap();
        w.write_packet(&pcap_file::pcap::PcapPacket::new(
            Duration::from_millis(u64::try_from(n).unwrap()),
            len,
            fr,
        ))
        .unwrap();
    }
}

/// A running `ctoffload agent` in its own temporary directory.
pub struct Agent {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
}

/// The minimal configuration for an agent in `dir` (plus `extra` TOML).
/// These tests exercise the API over the software table (`backend = "software"`,
/// preloaded with exact frames) unless `extra` names a backend.
pub fn config_text(dir: &Path, extra: &str) -> String {
    let backend = if extra.contains("[backend]") {
        ""
    } else {
        "[backend]\nkind = \"software\"\n"
    };
    format!(
        "{backend}[api]\nsocket = {:?}\n{extra}\n",
        dir.join("api.sock").display().to_string()
    )
}

impl Agent {
    /// Start with `extra` configuration, preloaded with [`frames`].
    pub fn start(extra: &str) -> Agent {
        Self::start_with(extra, true)
    }

    pub fn start_with(extra: &str, preload: bool) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ctoffload.toml");
        std::fs::write(&config, config_text(dir.path(), extra)).unwrap();
        let pcap = dir.path().join("preload.pcap");
        write_pcap(&pcap, &frames());
        let log = dir.path().join("agent.log");
        let mut cmd = Command::new(BIN);
        cmd.arg("agent").arg("--config").arg(&config);
        if preload {
            cmd.arg("--preload").arg(&pcap);
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let agent = Agent {
            proc: Proc(child),
            sock: dir.path().join("api.sock"),
            dir,
            config,
            log,
        };
        agent.wait_ready();
        agent
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        while !self.log_text().contains("agent ready") {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "agent not ready; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run a client command against this agent.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let sock = self.sock.display().to_string();
        let mut all = vec!["--socket", sock.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Run a client command that must succeed; its stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        ok(&self.ctl(args))
    }

    /// Run a client command that must succeed and print JSON.
    #[track_caller]
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.proc.0.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Wait until the log contains `needle` `n` times.
    pub fn wait_log(&self, needle: &str, n: usize) {
        let start = Instant::now();
        while self.log_text().matches(needle).count() < n {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{needle:?} not logged {n} times; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let start = Instant::now();
        loop {
            if let Some(st) = self.proc.0.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "agent did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
