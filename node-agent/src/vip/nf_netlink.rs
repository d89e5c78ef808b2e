//! nf_tables set elements over netlink: the packet fence's element changes
//! as one atomic batch, sent straight to the kernel (no process), so a
//! timeout computed right before the send is the one the kernel applies,
//! within microseconds. The tables, sets and rules themselves are installed
//! once with the `nft` binary ([`super::packet_fence::TABLES`]).
//!
//! A batch is `NFNL_MSG_BATCH_BEGIN`, one `NFT_MSG_NEWSETELEM` or
//! `NFT_MSG_DELSETELEM` per element, `NFNL_MSG_BATCH_END`; the kernel
//! applies all of it or nothing, and acknowledges each element message.

use std::net::IpAddr;
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// `NFPROTO_INET`.
pub const FAMILY_INET: u8 = 1;
/// `NFPROTO_ARP`.
pub const FAMILY_ARP: u8 = 3;

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;

/// One set: its family, table and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Set {
    /// `FAMILY_ARP` or `FAMILY_INET`.
    pub family: u8,
    /// The table.
    pub table: &'static str,
    /// The set.
    pub name: &'static str,
}

/// One element change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Add the element with a timeout (nothing if it exists).
    Add(Set, IpAddr, Duration),
    /// Delete the element: ENOENT, failing the whole batch, if it is not
    /// there (or expired).
    Delete(Set, IpAddr),
}

impl std::fmt::Display for Op {
    /// The same change in `nft` syntax.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let family = |s: &Set| {
            if s.family == FAMILY_ARP {
                "arp"
            } else {
                "inet"
            }
        };
        match self {
            Op::Add(s, a, t) => write!(
                f,
                "add element {} {} {} {{ {a} timeout {}ms }}",
                family(s),
                s.table,
                s.name,
                t.as_millis().max(1)
            ),
            Op::Delete(s, a) => {
                write!(
                    f,
                    "delete element {} {} {} {{ {a} }}",
                    family(s),
                    s.table,
                    s.name
                )
            }
        }
    }
}

/// How a batch ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied, all of it.
    Applied,
    /// An element, set or table it names is missing (ENOENT): nothing was
    /// applied.
    Missing,
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn nested(kind: u16, inner: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    push_attr(&mut out, kind | NLA_F_NESTED, inner);
    out
}

fn cstring(s: &str) -> Vec<u8> {
    let mut b = s.as_bytes().to_vec();
    b.push(0);
    b
}

/// One netlink message: header, `nfgenmsg` (family, version 0, `res_id`
/// big-endian), attributes.
fn message(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(family);
    m.push(0);
    m.extend_from_slice(&res_id.to_be_bytes());
    m.extend_from_slice(attrs);
    m
}

fn key(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The element message of `op`.
fn element_message(op: &Op, seq: u32) -> Vec<u8> {
    let (set, addr, timeout, kind, flags) = match op {
        Op::Add(s, a, t) => (
            s,
            a,
            Some(t),
            NFT_MSG_NEWSETELEM,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
        ),
        Op::Delete(s, a) => (s, a, None, NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
    };
    let mut value = Vec::new();
    push_attr(&mut value, NFTA_DATA_VALUE, &key(*addr));
    let mut elem = nested(NFTA_SET_ELEM_KEY, &value);
    if let Some(t) = timeout {
        let ms = t.as_millis().max(1) as u64;
        push_attr(&mut elem, NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
    }
    let list = nested(NFTA_LIST_ELEM, &elem);
    let mut attrs = Vec::new();
    push_attr(&mut attrs, NFTA_SET_ELEM_LIST_TABLE, &cstring(set.table));
    push_attr(&mut attrs, NFTA_SET_ELEM_LIST_SET, &cstring(set.name));
    attrs.extend_from_slice(&nested(NFTA_SET_ELEM_LIST_ELEMENTS, &list));
    message(
        (NFNL_SUBSYS_NFTABLES << 8) | kind,
        flags,
        seq,
        set.family,
        0,
        &attrs,
    )
}

/// The whole batch of `ops`, sequence numbers from `seq`.
pub fn batch(ops: &[Op], seq: u32) -> Vec<u8> {
    let mut out = message(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    for (i, op) in ops.iter().enumerate() {
        out.extend_from_slice(&element_message(op, seq + 1 + i as u32));
    }
    out.extend_from_slice(&message(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq + 1 + ops.len() as u32,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    ));
    out
}

/// A netlink socket to nf_tables kept open between batches. Closing one
/// costs the closing thread an RCU grace period (6-15 ms measured here, on
/// the latency path of every VIP added); a socket kept open costs nothing
/// at rest. A batch that did not apply cleanly drops the socket, and with
/// it any answer still queued: the next batch opens a fresh one.
#[derive(Debug, Default)]
pub struct Connection {
    open: std::sync::Mutex<Option<(Socket, u32)>>,
}

impl Connection {
    /// Sends `ops` as one batch and waits for the kernel's answer to each.
    /// Blocking, but only on the kernel (microseconds); one batch at a time.
    pub fn apply(&self, ops: &[Op]) -> std::io::Result<Outcome> {
        if ops.is_empty() {
            return Ok(Outcome::Applied);
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (mut socket, seq) = match open.take() {
            Some(kept) => kept,
            None => (connect()?, 1),
        };
        let result = exchange(&mut socket, ops, seq);
        if matches!(result, Ok(Outcome::Applied)) {
            // Sequence numbers of the next batch follow this one's.
            let next = seq.wrapping_add(ops.len() as u32 + 2).max(1);
            *open = Some((socket, next));
        }
        result
    }
}

fn connect() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// Sends `ops` as one batch with sequence numbers from `seq` and reads the
/// answers to its element messages (answers to any other sequence number
/// are skipped).
fn exchange(socket: &mut Socket, ops: &[Op], seq: u32) -> std::io::Result<Outcome> {
    socket.send(&batch(ops, seq), 0)?;
    // This batch's messages: the begin (`seq`), the elements, the end.
    let ours = |s: u32| s.wrapping_sub(seq) <= ops.len() as u32 + 1;
    // One answer per element message; a failure answers for the message
    // that failed (and the batch was aborted), the begin included (EPERM
    // without CAP_NET_ADMIN).
    let mut answered = 0;
    let mut buf = vec![0u8; 65536];
    while answered < ops.len() {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap_or_default());
            let answer_seq =
                u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap_or_default());
            if len < 16 || at + len > n {
                return Err(std::io::Error::other("a malformed netlink answer"));
            }
            if kind == NLMSG_ERROR && len >= 20 && ours(answer_seq) {
                let code = i32::from_ne_bytes(buf[at + 16..at + 20].try_into().unwrap_or_default());
                match code {
                    0 => answered += 1,
                    c if -c == nix::libc::ENOENT => return Ok(Outcome::Missing),
                    c => return Err(std::io::Error::from_raw_os_error(-c)),
                }
            }
            at += (len + 3) & !3;
        }
    }
    Ok(Outcome::Applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: Set = Set {
        family: FAMILY_ARP,
        table: "kubeha",
        name: "live",
    };

    #[test]
    fn an_element_message_carries_table_set_key_and_timeout() {
        let op = Op::Add(
            LIVE,
            "198.18.0.100".parse().unwrap(),
            Duration::from_millis(970),
        );
        assert_eq!(
            op.to_string(),
            "add element arp kubeha live { 198.18.0.100 timeout 970ms }"
        );
        let m = element_message(&op, 7);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(
            u16::from_ne_bytes(m[4..6].try_into().unwrap()),
            (10 << 8) | 12
        );
        assert_eq!(m[16], FAMILY_ARP);
        let tail = &m[20..];
        // "kubeha\0" padded, "live\0" padded, then the nested list.
        assert_eq!(&tail[4..11], b"kubeha\0");
        assert_eq!(&tail[16..21], b"live\0");
        let key = [198u8, 18, 0, 100];
        assert!(m.windows(4).any(|w| w == key));
        assert!(m.windows(8).any(|w| w == 970u64.to_be_bytes()));
        assert_eq!(m.len() % 4, 0);
    }

    #[test]
    fn a_batch_is_framed_by_begin_and_end() {
        let ops = [
            Op::Delete(LIVE, "198.18.0.100".parse().unwrap()),
            Op::Add(
                LIVE,
                "198.18.0.100".parse().unwrap(),
                Duration::from_millis(5),
            ),
        ];
        let b = batch(&ops, 1);
        assert_eq!(
            u16::from_ne_bytes(b[4..6].try_into().unwrap()),
            NFNL_MSG_BATCH_BEGIN
        );
        assert_eq!(&b[18..20], &10u16.to_be_bytes());
        let first = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
        assert_eq!(
            u16::from_ne_bytes(b[first + 4..first + 6].try_into().unwrap()),
            (10 << 8) | 14
        );
        let end = b.len() - 20;
        assert_eq!(
            u16::from_ne_bytes(b[end + 4..end + 6].try_into().unwrap()),
            NFNL_MSG_BATCH_END
        );
    }
}
