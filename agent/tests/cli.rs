//! The `ctoffload` CLI end to end: the real binary as client against the real binary
//! as agent (`ctoffload agent`, preloaded with a capture), over the Unix socket and
//! over TCP with mutual TLS.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Agent, BIN, Proc, ok, run, stderr, stdout};

#[test]
fn flows_lists_like_conntrack_and_filters() {
    let a = Agent::start("");
    let o = a.ctl(&["flows"]);
    let text = ok(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        stderr(&o).contains("4 flow entries have been shown"),
        "{}",
        stderr(&o)
    );
    let est = lines
        .iter()
        .find(|l| l.contains("sport=40000"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(est.starts_with("tcp      6 "), "{est}");
    assert!(
        est.contains(
            "ESTABLISHED src=10.0.0.1 dst=192.0.2.10 sport=40000 dport=80 packets=2 bytes="
        ),
        "{est}"
    );
    assert!(
        est.contains("src=192.0.2.10 dst=10.0.0.1 sport=80 dport=40000 packets=1"),
        "{est}"
    );
    assert!(
        est.contains("[ASSURED]") && est.contains("[OFFLOAD]"),
        "{est}"
    );
    let udp = lines.iter().find(|l| l.starts_with("udp")).unwrap();
    assert!(udp.contains("[UNREPLIED]"), "{udp}");
    let icmp = lines.iter().find(|l| l.starts_with("icmp")).unwrap();
    assert!(icmp.contains("type=8 code=0 id=7"), "{icmp}");

    let all = a.json(&["flows", "-o", "json"]);
    assert_eq!(all.as_array().unwrap().len(), 4);
    let tcp = a.json(&["flows", "-p", "tcp", "-o", "json"]);
    assert_eq!(tcp.as_array().unwrap().len(), 2);
    assert!(
        tcp.as_array()
            .unwrap()
            .iter()
            .all(|c| c["original"]["protocol"] == 6)
    );
    for (args, n) in [
        (vec!["--dst", "192.0.2.0/24"], 3),
        (vec!["--dst", "198.51.100.1"], 1),
        (vec!["--src", "10.0.0.1"], 2),
        (vec!["--sport", "40000"], 1),
        (vec!["-p", "udp", "--dport", "53"], 1),
        (vec!["--state", "established"], 1),
        (vec!["--state", "SYN_SENT"], 1),
        (vec!["--offloaded"], 1),
        (vec!["--software"], 3),
        (vec!["--zone", "0"], 4),
        (vec!["--zone", "3"], 0),
        (vec!["-p", "icmp"], 1),
        (vec!["--limit", "2"], 2),
    ] {
        let mut args: Vec<&str> = [&["flows", "-o", "json"][..], &args[..]].concat();
        let v = a.json(&args);
        assert_eq!(v.as_array().unwrap().len(), n, "{args:?}: {v}");
        args.retain(|x| *x != "-o" && *x != "json");
        let text = a.ok(&args);
        assert_eq!(text.lines().count(), n, "{args:?}: {text}");
    }
    let est = a.json(&["flows", "--state", "ESTABLISHED", "-o", "json"]);
    let c = &est[0];
    assert_eq!(c["tcp_state"], "ESTABLISHED");
    assert_eq!(c["original"]["src"], "10.0.0.1");
    assert_eq!(c["original"]["dst_port"], 80);
    assert_eq!(c["reply"]["src_port"], 80);
    assert_eq!(c["assured"], true);
    assert_eq!(c["offloaded"], true);
    assert_eq!(c["original_counters"]["packets"], 2);
    assert_eq!(c["reply_counters"]["packets"], 1);
    // An offloaded connection's timeout is held one day ahead (as Linux does).
    let ms = c["timeout_remaining_ms"].as_u64().unwrap();
    assert!((86_000_000..=86_400_000).contains(&ms), "{ms}");
}

#[test]
fn flows_get_delete_and_flush() {
    let a = Agent::start("");
    let c = a.json(&[
        "flows",
        "get",
        "-p",
        "tcp",
        "-s",
        "10.0.0.1",
        "-d",
        "192.0.2.10",
        "--sport",
        "40000",
        "--dport",
        "80",
        "-o",
        "json",
    ]);
    let id = c["id"].as_u64().unwrap();
    // The reply direction names the same connection.
    let r = a.json(&[
        "flows",
        "get",
        "-p",
        "tcp",
        "-s",
        "192.0.2.10",
        "-d",
        "10.0.0.1",
        "--sport",
        "80",
        "--dport",
        "40000",
        "-o",
        "json",
    ]);
    assert_eq!(r["id"].as_u64(), Some(id));
    let by_id = a.ok(&["flows", "get", "--id", &id.to_string()]);
    assert!(
        by_id.contains(&format!("id={id}")) && by_id.contains("ESTABLISHED"),
        "{by_id}"
    );

    let del = a.ctl(&["flows", "delete", "--id", &id.to_string()]);
    assert!(ok(&del).contains(&format!("id={id}")));
    assert!(stderr(&del).contains("1 flow entries have been deleted"));
    let gone = a.ctl(&["flows", "get", "--id", &id.to_string()]);
    assert_eq!(gone.status.code(), Some(1));
    assert_eq!(
        stderr(&gone).trim(),
        format!("ctoffload: NOT_FOUND: connection id {id} not found")
    );

    let del = a.ctl(&["flows", "delete", "-p", "udp"]);
    ok(&del);
    assert!(
        stderr(&del).contains("1 flow entries have been deleted"),
        "{}",
        stderr(&del)
    );
    assert_eq!(
        a.json(&["flows", "-o", "json"]).as_array().unwrap().len(),
        2
    );
    let fl = a.ctl(&["flows", "flush"]);
    ok(&fl);
    assert!(stderr(&fl).contains("2 deleted"), "{}", stderr(&fl));
    assert_eq!(a.json(&["flows", "-o", "json"]), Value::Array(vec![]));
}

#[test]
fn bad_requests_show_code_and_field() {
    let a = Agent::start("");
    for (args, expect) in [
        (
            vec!["flows", "--src", "10.0.0.0/40"],
            "ctoffload: INVALID_ARGUMENT: filter.src_prefix: ",
        ),
        (
            vec!["flows", "delete"],
            "ctoffload: INVALID_ARGUMENT: filter: an empty filter",
        ),
        (
            vec![
                "flows", "get", "-p", "tcp", "-s", "nonsense", "-d", "10.0.0.1",
            ],
            "ctoffload: INVALID_ARGUMENT: key.tuple.src: ",
        ),
        (
            vec![
                "nat",
                "add",
                "x",
                "--kind",
                "snat",
                "--to",
                "192.0.2.9-192.0.2.1",
            ],
            "ctoffload: INVALID_ARGUMENT: rule.to_addresses: empty range",
        ),
        (
            vec!["nat", "remove", "nope"],
            "ctoffload: NOT_FOUND: NAT rule \"nope\" not found",
        ),
        (
            vec!["timeouts", "set", "udp=9999999"],
            "ctoffload: INVALID_ARGUMENT: timeouts.udp: ",
        ),
        (
            vec!["policy", "set", "--tcp", "false", "--udp", "false"],
            "ctoffload: INVALID_ARGUMENT: policy.enabled: ",
        ),
        (
            vec!["events", "--from", "100000"],
            "ctoffload: OUT_OF_RANGE: from_sequence: ",
        ),
    ] {
        let o = a.ctl(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.starts_with(expect),
            "{args:?}: {e:?} should start with {expect:?}"
        );
        assert_eq!(e.lines().count(), 1, "one line: {e}");
    }
    // Local usage errors: exit 2, nothing sent.
    for (args, expect) in [
        (
            vec!["flows", "--state", "BOGUS"],
            "--state: \"BOGUS\" is not a TCP state",
        ),
        (
            vec!["flows", "-p", "nosuch"],
            "--proto: \"nosuch\" is not a protocol",
        ),
        (vec!["timeouts", "set", "udp"], "udp: expected NAME=SECONDS"),
        (vec!["timeouts", "set", "nope=3"], "nope: not a timeout"),
    ] {
        let o = a.ctl(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expect), "{args:?}: {}", stderr(&o));
    }
    let o = a.ctl(&["flows", "--offloaded", "--software"]);
    assert_eq!(o.status.code(), Some(2), "clap refuses conflicting flags");
}

#[test]
fn events_stream_replays_then_goes_live() {
    let a = Agent::start("");
    // Replay from the start of the journal, bounded by --count.
    let out = a.ok(&["events", "--from", "1", "-c", "5", "-o", "json"]);
    let recs: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 5, "{out}");
    let seqs: Vec<u64> = recs
        .iter()
        .map(|r| r["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert_eq!(recs[0]["kind"], "new");
    assert_eq!(recs[0]["event"]["original"]["src"], "10.0.0.1");
    assert!(recs.iter().any(|r| r["kind"] == "state_change"), "{out}");
    let text = a.ok(&["events", "--from", "1", "-c", "1"]);
    assert!(
        text.starts_with("[1]     [NEW] tcp      6 src=10.0.0.1"),
        "{text}"
    );

    // Live: a watcher started before a delete sees its end-of-flow record. It
    // starts at the journal's next sequence, so it cannot miss the record however
    // slowly it connects.
    let next = a.json(&["stats", "-o", "json"])["journal"]["next_sequence"]
        .as_u64()
        .unwrap();
    let sock = a.sock.display().to_string();
    let child = Command::new(BIN)
        .args([
            "--socket",
            &sock,
            "events",
            "-e",
            "end-of-flow",
            "-c",
            "1",
            "-o",
            "json",
        ])
        .args(["--from", &next.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut watcher = Proc(child);
    let stdout_pipe = watcher.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout_pipe).read_line(&mut line);
        let _ = tx.send(line);
    });
    let before = a.json(&["flows", "-p", "udp", "-o", "json"]);
    let id = before[0]["id"].as_u64().unwrap();
    a.ok(&["flows", "delete", "--id", &id.to_string()]);
    let line = rx
        .recv_timeout(Duration::from_secs(15))
        .expect("end-of-flow record within 15 s");
    let rec: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(rec["kind"], "end_of_flow");
    assert!(rec["sequence"].as_u64().unwrap() >= next);
    assert_eq!(rec["event"]["id"].as_u64(), Some(id));
    assert_eq!(rec["event"]["reason"], "deleted");
    assert_eq!(rec["event"]["original"]["dst_port"], 53);
    // --count 1: the watcher exits by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = watcher.0.try_wait().unwrap() {
            assert!(st.success());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "watcher did not exit after --count 1"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn stats_nat_device_policy_timeouts() {
    let a = Agent::start("");
    let s = a.json(&["stats", "-o", "json"]);
    assert_eq!(s["connections"], 4);
    assert_eq!(s["max_connections"], 65536);
    assert_eq!(s["by_protocol"]["tcp"], 2);
    assert_eq!(s["by_protocol"]["udp"], 1);
    assert_eq!(s["by_protocol"]["icmp"], 1);
    assert_eq!(s["by_tcp_state"]["ESTABLISHED"], 1);
    assert_eq!(s["offloaded"], 1);
    assert_eq!(s["packets"], 6);
    let text = a.ok(&["stats"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("connections ") && l.ends_with(" 4 / 65536")),
        "{text}"
    );
    assert!(text.contains("tcp_state.ESTABLISHED"), "{text}");

    // NAT: add, list (text and JSON), remove.
    let added = a.ok(&[
        "nat",
        "add",
        "out",
        "--kind",
        "snat",
        "-s",
        "10.0.0.0/8",
        "--to",
        "192.0.2.100-192.0.2.103",
        "-p",
        "tcp",
        "--to-ports",
        "1024-65535",
    ]);
    assert!(added.starts_with("NAME"), "{added}");
    assert!(added.contains("out   snat  tcp    10.0.0.0/8"), "{added}");
    a.ok(&[
        "nat",
        "add",
        "web",
        "--kind",
        "dnat",
        "-d",
        "192.0.2.1",
        "--to",
        "10.0.0.80",
    ]);
    let list = a.json(&["nat", "list", "-o", "json"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["name"], "out");
    assert_eq!(list[0]["to_addresses"]["last"], "192.0.2.103");
    assert_eq!(list[0]["to_ports"]["first"], 1024);
    assert_eq!(list[1]["kind"], "dnat");
    let dup = a.ctl(&["nat", "add", "out", "--kind", "snat", "--to", "203.0.113.1"]);
    assert!(
        stderr(&dup).starts_with("ctoffload: ALREADY_EXISTS: rule.name: "),
        "{}",
        stderr(&dup)
    );
    let s = a.json(&["stats", "-o", "json"]);
    assert_eq!(s["port_pools"][0]["rule"], "out");
    assert_eq!(s["port_pools"][0]["total"], 4 * 64512);
    a.ok(&["nat", "remove", "out"]);
    let list = a.json(&["nat", "list", "-o", "json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);

    let d = a.json(&["device", "-o", "json"]);
    assert_eq!(d["backend"], "software");
    assert_eq!(d["health"], "ok");
    assert!(a.ok(&["device"]).contains("backend       software"));

    // Policy: defaults from the config, partial set keeps the rest, drain.
    let p = a.json(&["policy", "get", "-o", "json"]);
    assert_eq!(
        p,
        serde_json::json!({"enabled": true, "tcp": true, "udp": true, "min_packets": 2})
    );
    a.ok(&["policy", "set", "--min-packets", "5", "--udp", "false"]);
    let p = a.json(&["policy", "get", "-o", "json"]);
    assert_eq!(
        p,
        serde_json::json!({"enabled": true, "tcp": true, "udp": false, "min_packets": 5})
    );
    let d = a.ctl(&["policy", "drain", "--disable"]);
    ok(&d);
    assert!(
        stderr(&d).contains("1 flows returned to software"),
        "{}",
        stderr(&d)
    );
    assert_eq!(a.json(&["policy", "get", "-o", "json"])["enabled"], false);
    assert_eq!(
        a.json(&["flows", "--offloaded", "-o", "json"]),
        Value::Array(vec![])
    );

    // Timeouts.
    let t = a.json(&["timeouts", "get", "-o", "json"]);
    assert_eq!(t["tcp_established"], 432_000);
    assert_eq!(t["udp"], 30);
    assert_eq!(t["restart_required"], false);
    let set = a.ok(&["timeouts", "set", "udp=45", "tcp_established=3600"]);
    // Applied to the running table at once (no restart).
    assert!(!set.contains("restart_required"), "{set}");
    let t = a.json(&["timeouts", "get", "-o", "json"]);
    assert_eq!(t["udp"], 45);
    assert_eq!(t["tcp_established"], 3600);
    assert_eq!(t["icmp"], 30);
}

#[test]
fn completions_for_shells() {
    for shell in ["bash", "zsh", "fish"] {
        let out = ok(&run(&["completions", shell]));
        assert!(out.contains("ctoffload"), "{shell}");
        assert!(out.contains("flows") && out.contains("timeouts"), "{shell}");
    }
    let bad = run(&["completions", "cmd.exe"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn agent_not_running_is_one_helpful_line() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("absent.sock");
    let sock_s = sock.display().to_string();
    for args in [
        vec!["flows"],
        vec!["stats"],
        vec!["events"],
        vec!["nat", "list"],
    ] {
        let mut all = vec!["--socket", sock_s.as_str()];
        all.extend(args.iter());
        let o = run(&all);
        assert_eq!(o.status.code(), Some(1));
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains(&sock_s), "{e}");
        assert!(e.contains("ctoffload agent --config"), "{e}");
        assert!(!e.contains("panicked") && !e.contains("backtrace"), "{e}");
        assert!(stdout(&o).is_empty());
    }
    // Usage errors are found before connecting.
    let o = run(&["--socket", &sock_s, "flows", "--state", "BOGUS"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--state"), "{}", stderr(&o));
    let o = run(&["--socket", &sock_s, "timeouts", "set", "udp=x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = run(&[
        "--socket", &sock_s, "flows", "delete", "--id", "3", "-p", "tcp",
    ]);
    assert_eq!(o.status.code(), Some(2), "--id and a filter conflict");
    // A stale socket (a file nobody listens on) says so.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let o = run(&["--socket", &sock_s, "flows"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("connection refused"), "{}", stderr(&o));
}

#[test]
fn unix_socket_is_owner_only_and_sigterm_is_graceful() {
    let a = Agent::start("");
    let mode = std::fs::metadata(&a.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let sock = a.sock.clone();
    let st = a.stop();
    assert!(st.success(), "{st:?}");
    assert!(!sock.exists(), "socket removed on shutdown");
}

#[test]
fn sigint_is_graceful() {
    let a = Agent::start("");
    a.signal("INT");
    a.wait_log("SIGINT: shutting down", 1);
    a.wait_log("agent stopped", 1);
}

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
    other_cert: String,
    other_key: String,
}

fn ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
}

fn leaf(issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let ca1 = ca("test ca");
    let ca2 = ca("other ca");
    let (server_cert, server_key) = leaf(&ca1, "localhost");
    let (client_cert, client_key) = leaf(&ca1, "client");
    let (other_cert, other_key) = leaf(&ca2, "intruder");
    Pki {
        ca: ca1.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
        other_cert,
        other_key,
    }
}

#[test]
fn mtls_accepts_the_right_client_and_rejects_others() {
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let ca = file("ca.pem", &p.ca);
    let scert = file("server.pem", &p.server_cert);
    let skey = file("server.key", &p.server_key);
    let ccert = file("client.pem", &p.client_cert);
    let ckey = file("client.key", &p.client_key);
    let ocert = file("other.pem", &p.other_cert);
    let okey = file("other.key", &p.other_key);
    let port = support::free_port();
    let addr = format!("127.0.0.1:{port}");
    let a = Agent::start(&format!(
        "tcp = {addr:?}\n[api.tls]\ncert = {scert:?}\nkey = {skey:?}\nclient_ca = {ca:?}\n"
    ));
    let s = ok(&run(&[
        "--tcp", &addr, "--ca", &ca, "--cert", &ccert, "--key", &ckey, "stats", "-o", "json",
    ]));
    let s: Value = serde_json::from_str(&s).unwrap();
    assert_eq!(s["connections"], 4);
    // Also the Unix socket, at the same time.
    assert_eq!(a.json(&["stats", "-o", "json"])["connections"], 4);

    // A client certificate from another CA is refused.
    let o = run(&[
        "--tcp", &addr, "--ca", &ca, "--cert", &ocert, "--key", &okey, "stats",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).is_empty());
    assert!(stderr(&o).starts_with("ctoffload: "), "{}", stderr(&o));
    // --tcp without the TLS files is a usage error.
    let o = run(&["--tcp", &addr, "stats"]);
    assert_eq!(o.status.code(), Some(2));
    // A missing TLS file is named.
    let o = run(&[
        "--tcp",
        &addr,
        "--ca",
        "/nonexistent/ca.pem",
        "--cert",
        &ccert,
        "--key",
        &ckey,
        "stats",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--ca /nonexistent/ca.pem: cannot read"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn agent_socket_option_overrides_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[api]\nsocket = \"/nonexistent/dir/api.sock\"\n").unwrap();
    let sock = dir.path().join("other.sock");
    let log = dir.path().join("log");
    let child = Command::new(BIN)
        .args(["agent", "--config", &cfg.display().to_string()])
        .args(["--socket", &sock.display().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _agent = Proc(child);
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("agent ready")
    {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = ok(&run(&[
        "--socket",
        &sock.display().to_string(),
        "device",
        "-o",
        "json",
    ]));
    assert!(out.contains("\"backend\": \"sim\""), "{out}");
}
