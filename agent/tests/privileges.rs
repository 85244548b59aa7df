//! Process hardening of the real `ctoffload agent` binary: after setup it keeps only
//! the capabilities its backend needs (agent/src/privileges.rs) with `no_new_privs`
//! set, read back from `/proc/<pid>/status` and `/proc/<pid>/task/*/status`; and a TLS
//! private key never appears in its log, even at debug level.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ctoffload_agent::privileges::{CAP_NET_ADMIN, CAP_NET_RAW, mask_of, status_mask};
use support::{BIN, Proc, config_text, ok, run};

/// Start the agent with `extra` configuration at log level `level`; wait until ready.
fn start(dir: &Path, extra: &str, level: &str) -> Proc {
    let config = dir.join("ctoffload.toml");
    std::fs::write(&config, config_text(dir, extra)).unwrap();
    let child = Command::new(BIN)
        .arg("agent")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", level)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let p = Proc(child);
    let t0 = Instant::now();
    while !log(dir).contains("agent ready") {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "agent not ready; log:\n{}",
            log(dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

/// Whether this test process may hold every capability (root in the initial set).
fn privileged() -> bool {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    status_mask(&s, "CapEff:").is_some_and(|m| m & (1 << 21) != 0) // CAP_SYS_ADMIN
}

/// `(tid, name, status)` of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        out.push((
            e.file_name().to_string_lossy().into_owned(),
            name.trim().to_owned(),
            status,
        ));
    }
    out
}

fn assert_dropped(what: &str, status: &str, kept: u64) {
    let f = |k| status_mask(status, k).unwrap_or_else(|| panic!("{what}: no {k}"));
    assert_eq!(f("CapEff:"), kept, "{what}: CapEff");
    assert_eq!(f("CapPrm:"), kept, "{what}: CapPrm");
    assert_eq!(f("CapInh:"), 0, "{what}: CapInh");
    assert_eq!(f("CapAmb:"), 0, "{what}: CapAmb");
    assert_eq!(f("CapBnd:"), kept, "{what}: CapBnd");
    assert_eq!(f("NoNewPrivs:"), 1, "{what}: NoNewPrivs");
}

/// As root: an agent with `extra` configuration whose process status shows exactly
/// `kept`; `None` (test skipped) without the privileges to check it.
fn start_checked(extra: &str, kept: u64) -> Option<(tempfile::TempDir, Proc)> {
    if !privileged() {
        eprintln!("skipped: needs root with all capabilities");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), extra, "info");
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.0.id())).unwrap();
    assert_dropped("process", &status, kept);
    Some((dir, agent))
}

#[test]
fn software_backend_keeps_only_net_raw_and_net_admin() {
    let kept = mask_of(&[CAP_NET_RAW, CAP_NET_ADMIN]);
    assert_eq!(kept, 0x3000);
    let Some((dir, agent)) = start_checked("", kept) else {
        return;
    };
    let pid = agent.0.id();
    // Every thread: the software backend starts no thread before the drop but the
    // runtime's, which drop too.
    let all = threads(pid);
    assert!(all.len() >= 3, "main and runtime workers: {}", all.len());
    for (tid, name, st) in &all {
        assert_dropped(&format!("thread {tid} ({name})"), st, kept);
    }
    assert!(
        log(dir.path()).contains("privileges dropped: kept CAP_NET_RAW, CAP_NET_ADMIN"),
        "{}",
        log(dir.path())
    );
    // It still serves.
    let sock = dir.path().join("api.sock").display().to_string();
    ok(&run(&["--socket", &sock, "stats"]));
}

#[test]
fn sim_backend_keeps_no_capability_on_the_threads_it_controls() {
    let Some((dir, agent)) = start_checked("[backend]\nkind = \"sim\"\n", 0) else {
        return;
    };
    let pid = agent.0.id();
    let all = threads(pid);
    let workers: Vec<_> = all
        .iter()
        .filter(|(_, name, _)| name.starts_with("tokio-rt-worker"))
        .collect();
    assert!(!workers.is_empty(), "runtime workers: {all:?}");
    for (tid, name, st) in workers {
        assert_dropped(&format!("thread {tid} ({name})"), st, 0);
    }
    // The simulator's and the worker's threads are spawned from a thread that dropped
    // first: no thread of the process holds a capability, and none is reported.
    for (tid, name, st) in &all {
        assert_dropped(&format!("thread {tid} ({name})"), st, 0);
    }
    let text = log(dir.path());
    assert!(
        !text.contains("keeps its capabilities"),
        "a thread kept capabilities:\n{text}"
    );
}

#[test]
fn tls_private_key_never_appears_in_the_log() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let key_pem = key.serialize_pem();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (c, k, a) = (
        file("server.pem", &cert.pem()),
        file("server.key", &key_pem),
        file("ca.pem", &ca.pem()),
    );
    let addr = format!("127.0.0.1:{}", support::free_port());
    let agent = start(
        dir.path(),
        &format!("tcp = {addr:?}\n[api.tls]\ncert = {c:?}\nkey = {k:?}\nclient_ca = {a:?}\n"),
        "debug",
    );
    // Calls on both listeners (the TLS client presents the same key pair, signed by
    // the same CA).
    let sock = dir.path().join("api.sock").display().to_string();
    ok(&run(&["--socket", &sock, "stats"]));
    ok(&run(&[
        "--tcp", &addr, "--ca", &a, "--cert", &c, "--key", &k, "stats",
    ]));
    // SIGHUP re-reads the configuration (and the key).
    Command::new("kill")
        .arg("-HUP")
        .arg(agent.0.id().to_string())
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(agent);
    let text = log(dir.path());
    assert!(text.contains("DEBUG"), "debug level was on:\n{text}");
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    // No line of the key's base64 body, nor the raw key bytes in hex.
    for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!text.contains(line), "key material in the log");
    }
    let der_hex: String = key
        .serialize_der()
        .iter()
        .take(32)
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(!text.contains(&der_hex), "key bytes in the log");
}
