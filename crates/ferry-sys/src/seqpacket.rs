//! `SOCK_SEQPACKET` Unix socket pairs: CRIU's RPC (`criu swrk`) reads one protobuf message per
//! packet, which std's stream and datagram types do not model.

use crate::retry::retry_eintr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// One end of a connected `SOCK_SEQPACKET` socket pair.
#[derive(Debug)]
pub struct SeqPacket {
    fd: OwnedFd,
}

impl SeqPacket {
    /// A connected pair; both ends are close-on-exec.
    pub fn pair() -> io::Result<(SeqPacket, SeqPacket)> {
        let mut fds = [-1i32; 2];
        // SAFETY: `fds` is a valid, writable array of two ints, as socketpair(2) requires.
        let rc = unsafe {
            libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socketpair succeeded, so both descriptors are open and owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((SeqPacket { fd: a }, SeqPacket { fd: b }))
    }

    /// Sends one packet, whole.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        // SAFETY: the pointer and length describe `packet`, which outlives the call.
        let n = retry_eintr(|| unsafe {
            libc::send(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len(), libc::MSG_NOSIGNAL)
        })?;
        if n as usize == packet.len() {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::WriteZero, "short packet write"))
        }
    }

    /// Receives one packet of at most `max` bytes. `Ok(None)` means the peer closed the socket.
    /// A packet larger than `max` is an error rather than silently truncated.
    pub fn recv(&self, max: usize) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; max];
        // SAFETY: the pointer and length describe `buf`, which outlives the call.
        let n = retry_eintr(|| unsafe {
            libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC)
        })? as usize;
        if n == 0 {
            return Ok(None);
        }
        if n > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("packet of {n} bytes exceeds the {max}-byte cap"),
            ));
        }
        buf.truncate(n);
        Ok(Some(buf))
    }
}

impl AsFd for SeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<SeqPacket> for OwnedFd {
    fn from(s: SeqPacket) -> OwnedFd {
        s.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_keep_their_boundaries() {
        let (a, b) = SeqPacket::pair().expect("socketpair");
        a.send(b"one").expect("send");
        a.send(b"two-two").expect("send");
        assert_eq!(b.recv(64).expect("recv").as_deref(), Some(&b"one"[..]));
        assert_eq!(b.recv(64).expect("recv").as_deref(), Some(&b"two-two"[..]));
        drop(a);
        assert_eq!(b.recv(64).expect("recv"), None);
    }

    #[test]
    fn oversized_packet_is_an_error() {
        let (a, b) = SeqPacket::pair().expect("socketpair");
        a.send(&[7u8; 100]).expect("send");
        let err = b.recv(10).expect_err("must refuse");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
