//! Reading what Linux conntrack decided: entries from `conntrack -L -o extended` and
//! per-`ct state` packet counters of an nftables table (from `nft -j`).

use std::collections::BTreeMap;

/// One kernel conntrack entry, reduced to what differential tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEntry {
    /// Protocol name as conntrack prints it (`tcp`, `udp`, `icmp`, ...).
    pub proto: String,
    /// Seconds left.
    pub timeout_s: u64,
    /// TCP state (`ESTABLISHED`, ...); `None` for other protocols.
    pub state: Option<String>,
    /// `key=value` pairs of the original tuple (`src`, `dst`, `sport`, `dport`, `type`,
    /// `code`, `id`), in order.
    pub orig: Vec<(String, String)>,
    /// `[ASSURED]`.
    pub assured: bool,
    /// `[UNREPLIED]`: no reply seen (SEEN_REPLY clear).
    pub unreplied: bool,
}

impl KernelEntry {
    /// `proto key=value ...` of the original tuple: a key to match entries by.
    #[must_use]
    pub fn key(&self) -> String {
        let mut k = self.proto.clone();
        for (n, v) in &self.orig {
            k.push(' ');
            k.push_str(n);
            k.push('=');
            k.push_str(v);
        }
        k
    }
}

const TUPLE_KEYS: [&str; 7] = ["src", "dst", "sport", "dport", "type", "code", "id"];

/// Parse one line of `conntrack -L -o extended`, e.g.
/// `ipv4 2 tcp 6 431999 ESTABLISHED src=10.0.1.2 dst=10.0.2.2 sport=1 dport=2 src=...
/// [ASSURED] mark=0 use=1`. `None` for lines that are not entries.
#[must_use]
pub fn parse_entry(line: &str) -> Option<KernelEntry> {
    let toks: Vec<&str> = line.split_whitespace().collect();
    if toks.len() < 6 || !toks[0].starts_with("ipv") {
        return None;
    }
    let proto = toks[2].to_owned();
    let timeout_s = toks[4].parse().ok()?;
    let mut state = None;
    let mut orig = Vec::new();
    let mut assured = false;
    let mut unreplied = false;
    let mut seen_src = 0;
    for t in &toks[5..] {
        match *t {
            "[ASSURED]" => assured = true,
            "[UNREPLIED]" => unreplied = true,
            t if !t.contains('=') && !t.starts_with('[') && orig.is_empty() => {
                state = Some(t.to_owned());
            }
            t => {
                if let Some((k, v)) = t.split_once('=') {
                    if k == "src" {
                        seen_src += 1;
                    }
                    if seen_src == 1 && TUPLE_KEYS.contains(&k) {
                        orig.push((k.to_owned(), v.to_owned()));
                    }
                }
            }
        }
    }
    Some(KernelEntry {
        proto,
        timeout_s,
        state,
        orig,
        assured,
        unreplied,
    })
}

/// Parse the whole output of `conntrack -L -o extended`.
#[must_use]
pub fn parse_entries(text: &str) -> Vec<KernelEntry> {
    text.lines().filter_map(parse_entry).collect()
}

/// Packet counters of the rules of `nft -j list table ...` that carry a comment, by
/// comment. Rules without a comment or counter are skipped.
///
/// # Errors
/// The text is not the JSON nft prints.
pub fn comment_counters(json: &str) -> Result<BTreeMap<String, u64>, serde_json::Error> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let mut out = BTreeMap::new();
    let items = v
        .get("nftables")
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default();
    for item in items {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let Some(comment) = rule.get("comment").and_then(serde_json::Value::as_str) else {
            continue;
        };
        let packets = rule
            .get("expr")
            .and_then(serde_json::Value::as_array)
            .and_then(|exprs| {
                exprs.iter().find_map(|e| {
                    e.get("counter")?
                        .get("packets")
                        .and_then(serde_json::Value::as_u64)
                })
            });
        if let Some(p) = packets {
            out.insert(comment.to_owned(), p);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_lines() {
        let text = "ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.1.2 dst=10.0.2.2 sport=40000 dport=80 src=10.0.2.2 dst=10.0.1.2 sport=80 dport=40000 [ASSURED] mark=0 use=1\n\
ipv4     2 udp      17 29 src=10.0.1.2 dst=10.0.2.2 sport=5353 dport=53 [UNREPLIED] src=10.0.2.2 dst=10.0.1.2 sport=53 dport=5353 mark=0 use=1\n\
ipv4     2 icmp     1 29 src=10.0.1.2 dst=10.0.2.2 type=8 code=0 id=7 src=10.0.2.2 dst=10.0.1.2 type=0 code=0 id=7 mark=0 use=1\n";
        let e = parse_entries(text);
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].state.as_deref(), Some("ESTABLISHED"));
        assert_eq!(e[0].timeout_s, 431_999);
        assert!(e[0].assured && !e[0].unreplied);
        assert_eq!(
            e[0].key(),
            "tcp src=10.0.1.2 dst=10.0.2.2 sport=40000 dport=80"
        );
        assert_eq!(e[1].state, None);
        assert!(e[1].unreplied && !e[1].assured);
        assert_eq!(
            e[2].key(),
            "icmp src=10.0.1.2 dst=10.0.2.2 type=8 code=0 id=7"
        );
    }

    #[test]
    fn nft_counters() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.1.1"}}, {"table": {"family": "inet", "name": "t", "handle": 1}}, {"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 2, "comment": "new", "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}, {"counter": {"packets": 3, "bytes": 180}}]}}]}"#;
        let c = comment_counters(json).expect("json");
        assert_eq!(c.get("new"), Some(&3));
    }
}
