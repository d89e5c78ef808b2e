//! Frames on the wire as the client sees them: tcpdump in the client
//! namespace, and its output parsed (ARP, neighbour advertisements, echo
//! replies).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::lab::Lab;
use crate::nodes;

/// One frame seen by a capture.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Capture time, seconds since the epoch.
    pub time: f64,
    /// `arp-request`, `arp-reply`, `na` (unsolicited neighbour advertisement)
    /// or `echo-reply` (an IPv4 ping answer; `address` is its source).
    pub kind: String,
    /// The address the frame announces.
    pub address: String,
    /// The sender's MAC.
    pub mac: String,
}

/// tcpdump in the client namespace, capturing ARP and ICMPv6 neighbour
/// advertisements on its interface.
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Starts capturing ARP and neighbour advertisements; returns once
    /// tcpdump listens.
    pub fn start(lab: &Lab, name: &str) -> anyhow::Result<Capture> {
        Self::start_filtered(lab, name, "arp or (icmp6 and ip6[40] == 136)")
    }

    /// Starts capturing what the tcpdump expression `filter` selects.
    pub fn start_filtered(lab: &Lab, name: &str, filter: &str) -> anyhow::Result<Capture> {
        let file = lab.dir().join("logs").join(format!("capture-{name}.txt"));
        let out = std::fs::File::create(&file)?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                nodes::CLIENT_NS,
                "tcpdump",
                "-i",
                "eth0",
                "-l",
                "-n",
                "-e",
                "-tt",
                "-vv",
            ])
            .arg(filter)
            .stdout(out)
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump in the client namespace (apt-get install tcpdump)")?;
        // tcpdump says "listening on" on stderr once the socket is open.
        let mut capture = Capture { child, file };
        let stderr = capture.child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .context("tcpdump did not start listening")?;
        Ok(capture)
    }

    /// Frames captured so far.
    pub fn frames(&self) -> Vec<Frame> {
        parse_tcpdump(&std::fs::read_to_string(&self.file).unwrap_or_default())
    }

    /// Stops tcpdump and returns every frame.
    pub fn stop(mut self) -> Vec<Frame> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        self.frames()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `tcpdump -n -e -tt -vv` lines into frames.
pub fn parse_tcpdump(text: &str) -> Vec<Frame> {
    let mut frames = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(time) = line
            .split_whitespace()
            .next()
            .and_then(|t| t.parse::<f64>().ok())
        else {
            continue;
        };
        let mac = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        if line.contains("ARP") {
            // "Request who-has 198.18.0.100 tell 198.18.0.100" / "Reply 198.18.0.100 is-at aa:..".
            let words: Vec<&str> = line.split_whitespace().collect();
            if let Some(p) = words.iter().position(|w| *w == "who-has") {
                let addr = words
                    .get(p + 1)
                    .unwrap_or(&"")
                    .trim_end_matches(',')
                    .to_owned();
                let tell = words
                    .iter()
                    .position(|w| *w == "tell")
                    .and_then(|t| words.get(t + 1))
                    .map(|s| s.trim_end_matches(','));
                if tell == Some(addr.as_str()) {
                    frames.push(Frame {
                        time,
                        kind: "arp-request".into(),
                        address: addr,
                        mac,
                    });
                }
            } else if let Some(p) = words.iter().position(|w| *w == "is-at") {
                let addr = words.get(p - 1).copied().unwrap_or_default().to_owned();
                frames.push(Frame {
                    time,
                    kind: "arp-reply".into(),
                    address: addr,
                    mac,
                });
            }
        } else if line.contains("ethertype IPv4")
            && lines
                .get(i + 1)
                .is_some_and(|l| l.contains("ICMP echo reply"))
        {
            // "    198.18.0.120 > 198.18.0.200: ICMP echo reply, id 7, seq 3, length 64"
            let addr = lines[i + 1].split_whitespace().next().unwrap_or_default();
            frames.push(Frame {
                time,
                kind: "echo-reply".into(),
                address: addr.to_owned(),
                mac,
            });
        } else if line.contains("neighbor advertisement")
            || lines
                .get(i + 1)
                .is_some_and(|l| l.contains("neighbor advertisement"))
        {
            let all = format!("{line} {}", lines.get(i + 1).unwrap_or(&""));
            if let Some(tgt) = all.split("tgt is ").nth(1) {
                let addr = tgt
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                if !frames
                    .iter()
                    .any(|f: &Frame| f.time == time && f.kind == "na")
                {
                    frames.push(Frame {
                        time,
                        kind: "na".into(),
                        address: addr,
                        mac,
                    });
                }
            }
        }
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcpdump_arp_and_na() {
        let text = "1700000000.100000 aa:bb:cc:dd:ee:01 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: Ethernet (len 6), IPv4 (len 4), Request who-has 198.18.0.100 tell 198.18.0.100, length 28\n\
1700000000.100100 aa:bb:cc:dd:ee:01 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: Ethernet (len 6), IPv4 (len 4), Reply 198.18.0.100 is-at aa:bb:cc:dd:ee:01, length 28\n\
1700000000.100200 aa:bb:cc:dd:ee:01 > 33:33:00:00:00:01, ethertype IPv6 (0x86dd), length 86: (hlim 255, next-header ICMPv6 (58) payload length: 32) 2001:db8::b > ff02::1: [icmp6 sum ok] ICMP6, neighbor advertisement, length 32, tgt is 2001:db8::100, Flags [override]\n\
1700000000.200000 aa:bb:cc:dd:ee:02 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: Ethernet (len 6), IPv4 (len 4), Request who-has 198.18.0.11 tell 198.18.0.200, length 28\n";
        let frames = parse_tcpdump(text);
        let echo = "1700000001.500000 aa:bb:cc:dd:ee:02 > aa:bb:cc:dd:ee:c8, ethertype IPv4 (0x0800), length 98: (tos 0x0, ttl 64, id 1, offset 0, flags [none], proto ICMP (1), length 84)\n    198.18.0.120 > 198.18.0.200: ICMP echo reply, id 7, seq 3, length 64\n";
        let replies = parse_tcpdump(echo);
        assert_eq!(replies.len(), 1);
        assert_eq!(
            (
                replies[0].kind.as_str(),
                replies[0].address.as_str(),
                replies[0].mac.as_str()
            ),
            ("echo-reply", "198.18.0.120", "aa:bb:cc:dd:ee:02")
        );
        let kinds: Vec<(&str, &str)> = frames
            .iter()
            .map(|f| (f.kind.as_str(), f.address.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("arp-request", "198.18.0.100"),
                ("arp-reply", "198.18.0.100"),
                ("na", "2001:db8::100")
            ]
        );
        assert_eq!(frames[0].mac, "aa:bb:cc:dd:ee:01");
    }
}
