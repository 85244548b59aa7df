//! The configuration file: parsing, errors that name the key, SIGHUP reload of a
//! running `ctoffload agent`, and the Prometheus endpoint it serves.
#![allow(clippy::unwrap_used, clippy::too_many_lines)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ctoffload_agent::config::{self, ConfigError, NatRuleKind};
use support::{Agent, ok, run, stderr};

#[test]
fn example_file_parses_with_every_section() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/ctoffload.example.toml"
    ))
    .unwrap();
    let c = config::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.ports.len(), 2);
    assert_eq!(c.routes.len(), 2);
    assert_eq!(c.routes[1].port, 1);
    let kinds: Vec<NatRuleKind> = c.nat_rules.iter().map(|r| r.kind).collect();
    for k in [
        NatRuleKind::Snat,
        NatRuleKind::Dnat,
        NatRuleKind::Masquerade,
        NatRuleKind::Fullnat,
        NatRuleKind::Vip,
    ] {
        assert!(kinds.contains(&k), "example lacks {k:?}");
    }
    // The API shows the plain SNAT and DNAT rules.
    assert_eq!(c.nat_rules.iter().filter(|r| r.api.is_some()).count(), 2);
    assert_eq!(
        c.timeouts,
        config::parse("").unwrap().timeouts,
        "Linux defaults"
    );
    assert_eq!(c.metrics.map(|m| m.port()), Some(9469));
    // And the binary agrees.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/ctoffload.example.toml"
    );
    let o = run(&["agent", "--config", path, "--check"]);
    assert!(ok(&o).contains("configuration OK"));
}

fn err(text: &str) -> ConfigError {
    match config::parse(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e,
    }
}

const PORTS: &str = r#"
[[ports]]
name = "lan"
mac = "02:00:00:00:00:01"
addresses = ["10.0.0.1/8"]
[[ports]]
name = "wan"
mac = "02:00:00:00:00:02"
addresses = ["192.0.2.1/24"]
"#;

fn snat(name: &str, extra: &str) -> String {
    format!(
        "[[nat.rules]]\nname = {name:?}\nkind = \"snat\"\nprotocol = \"tcp\"\nto_addresses = \"192.0.2.{}\"\n{extra}\n",
        name.len() + 10
    )
}

#[test]
fn errors_name_the_key() {
    let three = format!(
        "{PORTS}{}{}{}",
        snat("a", ""),
        snat("bb", ""),
        snat("ccc", "to_ports = \"2000-1000\"")
    );
    let mut wrong = Vec::new();
    for (text, expect) in [
        (three, "nat.rules[2].to_ports: range 2000-1000 is empty"),
        (
            "[timeouts]\nudp = 0\n".to_owned(),
            "timeouts.udp: 0 is not in 1..=2592000 seconds",
        ),
        (
            "[timeouts]\nudp_timeout = 3\n".to_owned(),
            "timeouts.udp_timeout: unknown field `udp_timeout`, expected one of",
        ),
        ("[bogus]\n".to_owned(), "bogus: unknown field `bogus`, expected one of `backend`"),
        (
            "[backend]\nkind = \"software\"\nio = \"dpdk\"\n".to_owned(),
            "backend: unknown variant `dpdk`, expected `af_packet` or `af_xdp`",
        ),
        (
            "[timeouts]\nudp = \"thirty\"\n".to_owned(),
            "timeouts.udp: invalid type: string \"thirty\"",
        ),
        (
            "[backend]\nkind = \"vfio\"\npci = \"03:00.0\"\n".to_owned(),
            "backend.pci: \"03:00.0\" is not a PCI address",
        ),
        (
            "[backend]\nkind = \"software\"\npci = \"0000:03:00.0\"\n".to_owned(),
            "backend: unknown field `pci`",
        ),
        (
            "[backend]\nkind = \"fpga\"\n".to_owned(),
            "backend.kind: unknown variant `fpga`, expected one of `sim`, `vfio`, `software`",
        ),
        (
            format!("{PORTS}[[ports]]\nname = \"x\"\nmac = \"02:00:00:00:00:zz\"\n"),
            "ports[2].mac: \"02:00:00:00:00:zz\" is not a MAC address",
        ),
        (
            format!("{PORTS}[[ports]]\nname = \"lan\"\nmac = \"02:00:00:00:00:03\"\n"),
            "ports[2].name: a port named \"lan\" exists",
        ),
        (
            "[[ports]]\nname = \"p\"\nmac = \"02:00:00:00:00:01\"\naddresses = [\"10.0.0.1\"]\n"
                .to_owned(),
            "ports[0].addresses[0]: \"10.0.0.1\" needs a prefix length",
        ),
        (
            format!("{PORTS}[[routes]]\nprefix = \"0.0.0.0/0\"\nport = \"dmz\"\n"),
            "routes[0].port: no port named \"dmz\"",
        ),
        (
            format!("{PORTS}[[routes]]\nprefix = \"0.0.0.0/0\"\nvia = \"2001:db8::1\"\nport = \"wan\"\n"),
            "routes[0].via: 2001:db8::1 is not of the prefix's address family",
        ),
        (
            format!("{PORTS}[[routes]]\nprefix = \"10.0.0.0/33\"\nport = \"lan\"\n"),
            "routes[0].prefix: ",
        ),
        (
            format!("{}{}", snat("a", ""), snat("a", "")),
            "nat.rules[1].name: a NAT rule named \"a\" exists",
        ),
        (
            "[[nat.rules]]\nname = \"d\"\nkind = \"dnat\"\n".to_owned(),
            "nat.rules[0].to_address: required by a dnat rule",
        ),
        (
            "[[nat.rules]]\nname = \"d\"\nkind = \"dnat\"\nto_address = \"10.0.0.1\"\nto_ports = \"1-2\"\n".to_owned(),
            "nat.rules[0].to_ports: not used by a dnat rule",
        ),
        (
            "[[nat.rules]]\nname = \"m\"\nkind = \"masquerade\"\nout_port = \"wan\"\n".to_owned(),
            "nat.rules[0].out_port: no port named \"wan\"",
        ),
        (
            "[[nat.rules]]\nname = \"v\"\nkind = \"vip\"\ndst = \"192.0.2.53/32\"\n".to_owned(),
            "nat.rules[0].backends: a vip rule needs at least one backend",
        ),
        (
            "[[nat.rules]]\nname = \"v\"\nkind = \"vip\"\nbackends = [{ address = \"10.0.0.1\", weight = 0 }]\n".to_owned(),
            "nat.rules[0].backends[0].weight: must be at least 1",
        ),
        (
            "[[nat.rules]]\nname = \"s\"\nkind = \"snat\"\nto_addresses = \"192.0.2.1\"\nto_ports = \"1024-2000\"\n".to_owned(),
            "nat.rules[0].to_ports: to_ports needs a port protocol",
        ),
        (
            "[[nat.rules]]\nname = \"s\"\nkind = \"snat\"\nto_addresses = \"192.0.2.9-192.0.2.1\"\n".to_owned(),
            "nat.rules[0].to_addresses: range 192.0.2.9-192.0.2.1 is empty",
        ),
        (
            "[[nat.rules]]\nname = \"s\"\nkind = \"snat\"\nprotocol = \"carrier-pigeon\"\nto_addresses = \"192.0.2.1\"\n".to_owned(),
            "nat.rules[0].protocol: \"carrier-pigeon\" is not tcp",
        ),
        (
            format!(
                "{}[[nat.rules]]\nname = \"b\"\nkind = \"snat\"\nprotocol = \"tcp\"\nto_addresses = \"192.0.2.10-192.0.2.20\"\n",
                snat("a", "")
            ),
            "nat.rules[1].to_addresses: source pool overlaps the pool of nat.rules[0] (\"a\")",
        ),
        (
            "[[nat.rules]]\nname = \"bad name!\"\nkind = \"snat\"\nto_addresses = \"192.0.2.1\"\n".to_owned(),
            "nat.rules[0].name: ",
        ),
        (
            "[limits]\nevent_journal_capacity = 8\n".to_owned(),
            "limits.event_journal_capacity: 8 is not in 16..=16777216",
        ),
        (
            "[limits]\nmax_connections = 0\n".to_owned(),
            "limits.max_connections: 0 is not in",
        ),
        (
            format!("[limits]\nmax_nat_rules = 1\n{}{}", snat("a", ""), snat("bb", "")),
            "nat.rules: 2 rules, more than limits.max_nat_rules (1)",
        ),
        (
            "[offload]\nenabled = true\ntcp = false\nudp = false\n".to_owned(),
            "offload.enabled: an enabled policy needs tcp or udp",
        ),
        (
            "[offload]\ndisplacement = \"random\"\n".to_owned(),
            "offload.displacement: unknown variant `random`",
        ),
        (
            "[api]\ntcp = \"0.0.0.0:50051\"\n".to_owned(),
            "api.tls: required with api.tcp",
        ),
        (
            "[api]\ntcp = \"nowhere\"\n[api.tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"a\"\n".to_owned(),
            "api.tcp: \"nowhere\" is not an address:port",
        ),
        (
            "[metrics]\nlisten = \"localhost\"\n".to_owned(),
            "metrics.listen: \"localhost\" is not an address:port",
        ),
    ] {
        let msg = err(&text).to_string();
        if !msg.starts_with(expect) {
            wrong.push(format!("{msg:?} should start with {expect:?} for:\n{text}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Syntax errors carry the line.
    let e = err("[timeouts]\n\nudp = \n");
    assert!(e.to_string().contains("(line 3)"), "{e}");
}

#[test]
fn agent_refuses_a_bad_file_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        format!("{}{}", snat("a", ""), snat("b", "to_ports = \"2000-1000\"")),
    )
    .unwrap();
    let p = path.display().to_string();
    for args in [
        vec!["agent", "--config", &p, "--check"],
        vec!["agent", "--config", &p],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2));
        assert_eq!(
            stderr(&o).trim(),
            format!("ctoffload agent: {p}: nat.rules[1].to_ports: range 2000-1000 is empty")
        );
    }
    let o = run(&[
        "agent",
        "--config",
        "/nonexistent/ctoffload.toml",
        "--check",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("cannot read /nonexistent/ctoffload.toml: No such file"),
        "{}",
        stderr(&o)
    );
}

fn rewrite(a: &Agent, extra: &str) {
    let text = support::config_text(a.dir.path(), extra);
    let tmp = a.config.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &a.config).unwrap();
}

fn flow_ids(a: &Agent) -> Vec<u64> {
    let mut v: Vec<u64> = a
        .json(&["flows", "-o", "json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn sighup_applies_changes_and_keeps_connections() {
    let a = Agent::start("[timeouts]\nudp = 30\n");
    let before = flow_ids(&a);
    assert_eq!(before.len(), 4);
    assert_eq!(a.json(&["timeouts", "get", "-o", "json"])["udp"], 30);

    rewrite(
        &a,
        &format!(
            "[timeouts]\nudp = 45\ntcp_established = 7200\n[offload]\nmin_packets = 9\n{}",
            snat("out", "")
        ),
    );
    a.signal("HUP");
    a.wait_log("configuration reloaded", 1);
    let t = a.json(&["timeouts", "get", "-o", "json"]);
    assert_eq!(t["udp"], 45);
    assert_eq!(t["tcp_established"], 7200);
    assert_eq!(t["icmp"], 30, "unchanged keys keep their value");
    assert_eq!(t["restart_required"], false, "applied to the running table");
    let log = a.log_text();
    assert!(log.contains("nat.rules[out] added"), "{log}");
    assert!(!log.contains("only after a restart"), "{log}");
    assert_eq!(a.json(&["policy", "get", "-o", "json"])["min_packets"], 9);
    let nat = a.json(&["nat", "list", "-o", "json"]);
    assert_eq!(nat[0]["name"], "out");
    assert_eq!(flow_ids(&a), before, "no connection dropped");
    // The established one is still established and offloaded.
    let est = a.json(&["flows", "--state", "ESTABLISHED", "-o", "json"]);
    assert_eq!(est[0]["offloaded"], true);

    // Removing the rule from the file removes it from the agent.
    rewrite(&a, "[timeouts]\nudp = 45\ntcp_established = 7200\n");
    a.signal("HUP");
    a.wait_log("configuration reloaded", 2);
    assert_eq!(
        a.json(&["nat", "list", "-o", "json"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(flow_ids(&a), before);
}

#[test]
fn invalid_reload_keeps_the_running_config() {
    let a = Agent::start("[timeouts]\nudp = 40\n");
    let before = flow_ids(&a);
    rewrite(
        &a,
        &format!(
            "[timeouts]\nudp = 50\n{}",
            snat("x", "to_ports = \"2000-1000\"")
        ),
    );
    a.signal("HUP");
    a.wait_log("configuration reload rejected", 1);
    let log = a.log_text();
    assert!(
        log.contains("nat.rules[0].to_ports: range 2000-1000 is empty"),
        "{log}"
    );
    assert_eq!(a.json(&["timeouts", "get", "-o", "json"])["udp"], 40);
    assert_eq!(
        a.json(&["nat", "list", "-o", "json"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(flow_ids(&a), before);
    // A file that does not parse at all is rejected the same way; the agent serves on.
    std::fs::write(&a.config, "[timeouts\n").unwrap();
    a.signal("HUP");
    a.wait_log("configuration reload rejected", 2);
    assert_eq!(a.json(&["timeouts", "get", "-o", "json"])["udp"], 40);
    // And a good file afterwards is taken.
    rewrite(&a, "[timeouts]\nudp = 41\n");
    a.signal("HUP");
    a.wait_log("configuration reloaded", 1);
    assert_eq!(a.json(&["timeouts", "get", "-o", "json"])["udp"], 41);
}

fn scrape(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

#[test]
fn metrics_endpoint_serves_the_statistics() {
    let port = support::free_port();
    let addr = format!("127.0.0.1:{port}");
    let a = Agent::start(&format!(
        "[metrics]\nlisten = {addr:?}\n{}",
        // Matches none of the preloaded flows (the rule is live in the engine).
        snat("out", "to_ports = \"1024-1033\"\nsrc = \"198.18.0.0/15\"")
    ));
    a.ok(&["stats"]);
    let (head, body) = scrape(&addr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text"),
        "{head}"
    );
    for series in [
        "ctoffload_connections 4",
        "ctoffload_connections_max 65536",
        "ctoffload_connections_by_state{state=\"ESTABLISHED\"} 1",
        "ctoffload_connections_by_state{state=\"SYN_SENT\"} 1",
        "ctoffload_connections_by_protocol{protocol=\"tcp\"} 2",
        "ctoffload_connections_by_protocol{protocol=\"icmp\"} 1",
        "ctoffload_offloaded 1",
        "ctoffload_hw_offloaded 0",
        "ctoffload_hw_table_used 0",
        "ctoffload_hw_table_capacity 0",
        "ctoffload_hw_insert_failures_total 0",
        "ctoffload_insert_failures_total{cause=\"full\"} 0",
        "ctoffload_drops_total{reason=\"tcp_invalid\"} 0",
        "ctoffload_nat_pool_size{rule=\"out\"} 10",
        "ctoffload_nat_pool_used{rule=\"out\"} 0",
        "ctoffload_created_total 4",
        "ctoffload_packets_total 6",
        "ctoffload_time_to_offload_seconds_count 0",
        "ctoffload_time_to_offload_seconds_bucket{le=\"+Inf\"} 0",
        "ctoffload_offload_queue_depth 0",
        "ctoffload_api_requests_total{method=\"/ctoffload.v1.StatsService/GetStats\",code=\"Ok\"} 1",
        "# EOF",
    ] {
        assert!(body.contains(series), "{series} missing from:\n{body}");
    }
    let (head, _) = scrape(&addr, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    // The statistics follow the table.
    a.ok(&["flows", "flush"]);
    let (_, body) = scrape(&addr, "/metrics");
    assert!(body.contains("ctoffload_connections 0"), "{body}");
}

#[test]
fn agent_start_failures_name_the_key_and_leave_no_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let path = dir.path().join("c.toml");
    let run_with = |extra: &str| {
        std::fs::write(&path, support::config_text(dir.path(), extra)).unwrap();
        run(&["agent", "--config", &path.display().to_string()])
    };
    let o = run_with(
        "tcp = \"127.0.0.1:0\"\n[api.tls]\ncert = \"/nonexistent/s.pem\"\nkey = \"k\"\nclient_ca = \"c\"\n",
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("ctoffload agent: api.tls.cert: cannot read /nonexistent/s.pem"),
        "{}",
        stderr(&o)
    );
    assert!(!sock.exists());
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let o = run_with(&format!("[metrics]\nlisten = \"{addr}\"\n"));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("metrics.listen: cannot listen on {addr}")),
        "{}",
        stderr(&o)
    );
    assert!(!sock.exists());
}
