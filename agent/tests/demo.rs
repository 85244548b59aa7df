//! `ctoffload demo` and `ctoffload agent` with `backend = "sim"`, as the real binary:
//! the API served over the running dataplane, queried with the CLI while it runs.
//! Every child is killed when its guard drops; every wait is bounded.

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ctoffload");

/// Kills the child when the test ends, however it ends.
struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Proc {
    /// Waits up to `limit` for the child to exit (killing it after that); its output
    /// went to files (a pipe nobody reads while waiting could fill up and block it).
    fn output(mut self, limit: Duration, out: &Path, err: &Path) -> Output {
        let mut child = self.0.take().expect("child");
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if start.elapsed() < limit => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    break;
                }
            }
        }
        let status = child.wait().expect("wait");
        Output {
            status,
            stdout: std::fs::read(out).unwrap_or_default(),
            stderr: std::fs::read(err).unwrap_or_default(),
        }
    }
}

/// Files for a child's stdout and stderr.
fn out_files(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    (
        dir.join(format!("{name}.out")),
        dir.join(format!("{name}.err")),
    )
}

fn file(p: &Path) -> Stdio {
    Stdio::from(std::fs::File::create(p).expect("output file"))
}

/// Runs the CLI once, bounded.
fn ctl(sock: &Path, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let (o, e) = out_files(dir.path(), "ctl");
    let child = Command::new(BIN)
        .arg("--socket")
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file(&o))
        .stderr(file(&e))
        .spawn()
        .expect("spawn ctl");
    Proc(Some(child)).output(Duration::from_secs(20), &o, &e)
}

fn wait_for_socket(sock: &Path, limit: Duration) {
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < limit,
            "no API socket at {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of a summary row (`| name | value |`).
fn row<'a>(summary: &'a str, name: &str) -> &'a str {
    summary
        .lines()
        .find(|l| l.starts_with(&format!("| {name} |")))
        .and_then(|l| l.split('|').nth(2))
        .map_or("", str::trim)
}

fn leading_number(s: &str) -> u64 {
    s.split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn demo_serves_the_api_while_it_runs_and_ends_with_a_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("demo.sock");
    let (o, e) = out_files(dir.path(), "demo");
    let child = Command::new(BIN)
        .args(["demo", "--duration", "8", "--seed", "7", "--socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(file(&o))
        .stderr(file(&e))
        .spawn()
        .expect("spawn demo");
    let demo = Proc(Some(child));
    wait_for_socket(&sock, Duration::from_secs(15));
    // Let traffic build up, then look at it through the API.
    std::thread::sleep(Duration::from_millis(800));
    let flows = ctl(&sock, &["flows", "-o", "json"]);
    assert!(
        flows.status.success(),
        "{:?} {}",
        flows.status,
        String::from_utf8_lossy(&flows.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&flows.stdout).expect("flows json");
    let list = list.as_array().expect("array");
    assert!(!list.is_empty(), "no flows");
    let text = serde_json::to_string(list).expect("json");
    assert!(
        list.iter()
            .any(|f| f.to_string().contains("\"hw_offloaded\":true")),
        "nothing offloaded: {}",
        &text[..text.len().min(2000)]
    );
    // Every connection not in hardware says why (policy, table full, ...).
    for f in list {
        if f["hw_offloaded"] == false {
            let reason = f["not_offloaded_reason"].as_str().unwrap_or("");
            assert!(!reason.is_empty(), "no reason for a software flow: {f}");
        }
    }
    assert!(
        text.contains("203.0.113.1"),
        "no masqueraded address: {}",
        &text[..text.len().min(2000)]
    );
    // The journal has the dataplane's events: offloads to hardware, TCP state changes.
    let events = ctl(
        &sock,
        &[
            "events",
            "--from",
            "1",
            "-c",
            "2",
            "-e",
            "offloaded",
            "-o",
            "json",
        ],
    );
    let events = String::from_utf8_lossy(&events.stdout);
    assert_eq!(events.matches("\"hardware\":true").count(), 2, "{events}");
    let events = ctl(
        &sock,
        &[
            "events",
            "--from",
            "1",
            "-c",
            "1",
            "-e",
            "state-change",
            "-o",
            "json",
        ],
    );
    assert!(
        String::from_utf8_lossy(&events.stdout).contains("\"new_state\""),
        "{}",
        String::from_utf8_lossy(&events.stdout)
    );
    let stats = ctl(&sock, &["stats"]);
    assert!(stats.status.success());
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(stats.contains("hw_offloaded"), "{stats}");
    let device = ctl(&sock, &["device", "-o", "json"]);
    let device: serde_json::Value = serde_json::from_slice(&device.stdout).expect("device json");
    assert_eq!(device["backend"], "sim");
    // Drain: every flow in hardware goes back to software (they may come back later);
    // the CLI says how many (`ctoffload: N flows returned to software.`).
    let drain = ctl(&sock, &["policy", "drain"]);
    let drain_out = format!(
        "{}{}",
        String::from_utf8_lossy(&drain.stdout),
        String::from_utf8_lossy(&drain.stderr)
    );
    assert!(drain.status.success(), "{drain_out}");
    assert!(
        drain_out
            .split(|c: char| !c.is_ascii_digit())
            .any(|n| n.parse::<u64>().is_ok_and(|n| n > 0)),
        "{drain_out}"
    );

    let out = demo.output(Duration::from_secs(30), &o, &e);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ctoffload --socket"), "{stdout}");
    assert!(stdout.contains("summary ("), "{stdout}");
    assert!(
        leading_number(row(&stdout, "offloaded to hardware")) > 0,
        "{stdout}"
    );
    assert!(
        leading_number(row(&stdout, "packets in hardware")) > 0,
        "{stdout}"
    );
    assert!(
        leading_number(row(&stdout, "NAT port collisions resolved")) > 0,
        "{stdout}"
    );
}

/// A capture of one UDP exchange, inside (port 0) to outside, for `--preload`.
fn write_pcap(path: &Path) {
    let mut f = std::fs::File::create(path).expect("pcap");
    // Classic pcap header, Ethernet link type.
    let mut h = Vec::new();
    h.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&4u16.to_le_bytes());
    h.extend_from_slice(&[0; 8]);
    h.extend_from_slice(&65535u32.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    f.write_all(&h).expect("write");
    for sport in [5000u16, 5001, 5002] {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 1])
            .ipv4([10, 0, 0, 9], [198, 51, 100, 7], 64)
            .udp(sport, 53)
            .write(&mut v, &[0x5A; 32])
            .expect("frame");
        let len = u32::try_from(v.len()).expect("len");
        let mut rec = Vec::new();
        rec.extend_from_slice(&[0; 8]);
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&v);
        f.write_all(&rec).expect("write");
    }
}

#[test]
fn agent_with_backend_sim_serves_the_dataplane() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("api.sock");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[backend]\nkind = \"sim\"\ntable_size = 4096\n[api]\nsocket = {:?}\n",
            sock.display().to_string()
        ),
    )
    .expect("config");
    let pcap = dir.path().join("p.pcap");
    write_pcap(&pcap);
    let child = Command::new(BIN)
        .arg("agent")
        .arg("--config")
        .arg(&cfg)
        .arg("--preload")
        .arg(&pcap)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn agent");
    let _agent = Proc(Some(child));
    wait_for_socket(&sock, Duration::from_secs(15));
    let device = ctl(&sock, &["device", "-o", "json"]);
    assert!(
        device.status.success(),
        "{}",
        String::from_utf8_lossy(&device.stderr)
    );
    let d: serde_json::Value = serde_json::from_slice(&device.stdout).expect("json");
    assert_eq!(d["backend"], "sim");
    assert_eq!(d["health"], "ok");
    assert_eq!(d["spec_version"], "1.1");
    // The preloaded frames went through the simulated NIC into the worker.
    let start = Instant::now();
    loop {
        let flows = ctl(&sock, &["flows", "-o", "json"]);
        let list: serde_json::Value = serde_json::from_slice(&flows.stdout).unwrap_or_default();
        if list.as_array().is_some_and(|l| l.len() == 3) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "flows: {}",
            String::from_utf8_lossy(&flows.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = ctl(&sock, &["stats", "-o", "json"]);
    let s: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("stats json");
    assert_eq!(s["connections"], 3);
    assert_eq!(s["hw_table"]["capacity"], 4096);
    // Flush goes through the worker's operator delete.
    let flush = ctl(&sock, &["flows", "flush"]);
    assert!(
        flush.status.success(),
        "{}",
        String::from_utf8_lossy(&flush.stderr)
    );
    let flows = ctl(&sock, &["flows", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&flows.stdout).expect("flows json");
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
}
