//! Unix sockets and their peers, from the kernel's sock_diag netlink interface (what `ss -x`
//! uses): `/proc/net/unix` names no peer, so it cannot tell a socket connected inside the tree
//! from one connected to, say, the journal.
//!
//! Unix sockets belong to a network namespace: the query runs on a thread of its own that
//! first joins the tree's (`setns` affects only the calling thread; the netlink socket stays
//! in the namespace it was made in).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::Path;

use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};

/// A unix socket as sock_diag describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnixSocket {
    pub inode: u64,
    /// 1 stream, 2 datagram, 5 seqpacket.
    pub kind: u8,
    /// Its bound name (an abstract one starts with `@`), if any.
    pub name: Option<String>,
    /// The inode of the socket it is connected to, if any.
    pub peer: Option<u64>,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const AF_UNIX: u8 = 1;
const UDIAG_SHOW_NAME: u32 = 0x1;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
/// A host with more unix sockets than this is answered partly (a reason says so).
const MAX_SOCKETS: usize = 1 << 20;

/// Every unix socket of the network namespace at `netns` (a `/proc/PID/ns/net`), by inode.
pub fn query(netns: &Path) -> io::Result<HashMap<u64, UnixSocket>> {
    let ns = File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            query_here()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the sock_diag thread panicked")))
    })
}

fn query_here() -> io::Result<HashMap<u64, UnixSocket>> {
    let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::DGRAM, Some(netlink::SOCK_DIAG))?;
    rustix::net::sendto(&fd, &request(), SendFlags::empty(), &SocketAddrNetlink::new(0, 0))?;
    let mut out = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, _) = rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty())?;
        match parse(&buf[..n.min(buf.len())], &mut out)? {
            Parsed::More if out.len() < MAX_SOCKETS => {}
            _ => return Ok(out),
        }
    }
}

/// The dump request: every unix socket, with its name and peer.
fn request() -> Vec<u8> {
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(&40u32.to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel
                                              // unix_diag_req: family, protocol, pad, states (all), inode, show, cookie.
    m.extend_from_slice(&[AF_UNIX, 0, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER).to_ne_bytes());
    m.extend_from_slice(&[0u8; 8]);
    m
}

/// Whether a dump's answer goes on after a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    More,
    Done,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses one datagram of netlink messages into `out`; the kernel's lengths are checked
/// against the datagram, never trusted.
pub fn parse(datagram: &[u8], out: &mut HashMap<u64, UnixSocket>) -> io::Result<Parsed> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag answer");
    let mut at = 0;
    while at + 16 <= datagram.len() {
        let len = u32_at(datagram, at).ok_or_else(bad)? as usize;
        let kind = u16_at(datagram, at + 4).ok_or_else(bad)?;
        if len < 16 || at + len > datagram.len() {
            return Err(bad());
        }
        let body = &datagram[at + 16..at + len];
        match kind {
            NLMSG_DONE => return Ok(Parsed::Done),
            NLMSG_ERROR => {
                let errno = u32_at(body, 0).map(|e| -(e as i32)).unwrap_or(0);
                return Err(io::Error::from_raw_os_error(errno.max(1)));
            }
            SOCK_DIAG_BY_FAMILY => {
                if let Some(s) = parse_socket(body) {
                    out.insert(s.inode, s);
                }
            }
            _ => {}
        }
        at += (len + 3) & !3;
    }
    Ok(Parsed::More)
}

/// One `unix_diag_msg` (family, type, state, pad, inode, cookie) and its attributes.
fn parse_socket(body: &[u8]) -> Option<UnixSocket> {
    let mut s = UnixSocket { kind: *body.get(1)?, inode: u64::from(u32_at(body, 4)?), ..Default::default() };
    let mut at = 16;
    while at + 4 <= body.len() {
        let len = usize::from(u16_at(body, at)?);
        let kind = u16_at(body, at + 2)?;
        if len < 4 || at + len > body.len() {
            break;
        }
        let payload = &body[at + 4..at + len];
        match kind {
            UNIX_DIAG_NAME => s.name = Some(socket_name(payload)),
            UNIX_DIAG_PEER => s.peer = u32_at(payload, 0).map(u64::from).filter(|p| *p != 0),
            _ => {}
        }
        at += (len + 3) & !3;
    }
    Some(s)
}

/// A bound name: a path, or an abstract name (leading NUL) shown as `@name`.
fn socket_name(raw: &[u8]) -> String {
    let raw = &raw[..raw.len().min(108)];
    match raw.split_first() {
        Some((&0, rest)) => format!("@{}", String::from_utf8_lossy(rest).trim_end_matches('\0')),
        _ => String::from_utf8_lossy(raw).trim_end_matches('\0').to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend_from_slice(body);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn socket(inode: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![AF_UNIX, 1, 1, 0];
        b.extend_from_slice(&inode.to_ne_bytes());
        b.extend_from_slice(&[0u8; 8]);
        for a in attrs {
            b.extend_from_slice(a);
        }
        msg(SOCK_DIAG_BY_FAMILY, &b)
    }

    #[test]
    fn parses_names_and_peers() {
        let mut d =
            socket(10, &[attr(UNIX_DIAG_NAME, b"\0abstract"), attr(UNIX_DIAG_PEER, &11u32.to_ne_bytes())]);
        d.extend(socket(11, &[attr(UNIX_DIAG_PEER, &0u32.to_ne_bytes())]));
        d.extend(socket(12, &[attr(UNIX_DIAG_NAME, b"/run/x.sock")]));
        let mut out = HashMap::new();
        assert_eq!(parse(&d, &mut out).expect("parse"), Parsed::More);
        assert_eq!(
            out[&10],
            UnixSocket { inode: 10, kind: 1, name: Some("@abstract".into()), peer: Some(11) }
        );
        assert_eq!(out[&11].peer, None);
        assert_eq!(out[&12].name.as_deref(), Some("/run/x.sock"));
        assert_eq!(parse(&msg(NLMSG_DONE, &[0; 4]), &mut out).expect("done"), Parsed::Done);
    }

    #[test]
    fn refuses_lengths_beyond_the_datagram() {
        let mut d = socket(10, &[]);
        d[0] = 200;
        assert!(parse(&d, &mut HashMap::new()).is_err());
        // An attribute running past its message is dropped, the socket kept.
        let mut body = vec![AF_UNIX, 1, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(&[200, 0, 2, 0, 1, 0, 0, 0]);
        assert_eq!(parse_socket(&body).expect("socket").peer, None);
        let errno = msg(NLMSG_ERROR, &(-13i32).to_ne_bytes());
        assert_eq!(parse(&errno, &mut HashMap::new()).expect_err("error").raw_os_error(), Some(13));
    }

    #[test]
    fn this_process_sees_its_own_pair() {
        // Unprivileged: the query of our own namespace without setns is what runs as root too.
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let ino = |s: &std::os::unix::net::UnixStream| {
            use std::os::unix::fs::MetadataExt;
            let fd = std::os::fd::AsRawFd::as_raw_fd(s);
            std::fs::metadata(format!("/proc/self/fd/{fd}")).expect("stat").ino()
        };
        let all = query_here().expect("sock_diag");
        assert_eq!(all[&ino(&a)].peer, Some(ino(&b)));
        assert_eq!(all[&ino(&b)].peer, Some(ino(&a)));
    }
}
