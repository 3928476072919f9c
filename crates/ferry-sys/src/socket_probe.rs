//! Reading a socket of another process without touching it: `pidfd_getfd` gives ferry its own
//! descriptor of the same open socket (the process is not stopped, traced or signalled, and its
//! descriptor table does not change), on which `getsockopt` reads what `/proc` and sock_diag
//! do not show.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// What `ferry check` needs of a TCP socket that is in no TCP table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpProbe {
    /// The kernel's TCP state (`TCP_INFO`'s `tcpi_state`: 1 established ... 7 close, 10 listen).
    pub state: u8,
    /// Whether it still names a peer (`SO_PEERNAME` answers even in the close state, where
    /// `getpeername` says ENOTCONN): a connection that was closed, not a fresh socket.
    pub has_peer: bool,
}

fn syscall_fd(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(ret).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `getsockopt` into `buf`; returns the length the kernel wrote.
fn getsockopt(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = libc::socklen_t::try_from(buf.len()).unwrap_or(libc::socklen_t::MAX);
    // SAFETY: buf is valid for len bytes and the kernel writes at most len of them.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, buf.as_mut_ptr().cast(), &mut len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(len).unwrap_or(0).min(buf.len()))
}

/// Probes descriptor `fd` of process `pid`: `Ok(None)` when it is not a TCP socket. Needs
/// ptrace access to the process (root, or the same user under Yama's default).
pub fn probe_tcp_socket(pid: i32, fd: i32) -> io::Result<Option<TcpProbe>> {
    // SAFETY: plain syscalls with integer arguments; the results are checked.
    let pidfd = syscall_fd(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: as above.
    let sock = syscall_fd(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })?;
    let mut int = [0u8; 4];
    if getsockopt(&sock, libc::SOL_SOCKET, libc::SO_PROTOCOL, &mut int)? != 4
        || libc::c_int::from_ne_bytes(int) != libc::IPPROTO_TCP
    {
        return Ok(None);
    }
    // struct tcp_info starts with the state byte.
    let mut info = [0u8; 8];
    if getsockopt(&sock, libc::SOL_TCP, libc::TCP_INFO, &mut info)? < 1 {
        return Err(io::Error::from(io::ErrorKind::InvalidData));
    }
    // The kernel refuses (EINVAL) a buffer longer than the address it has: 16 bytes, an IPv4
    // address's size, fits both families (an IPv6 peer is copied truncated, which is enough).
    let mut addr = [0u8; 16];
    let has_peer = getsockopt(&sock, libc::SOL_SOCKET, libc::SO_PEERNAME, &mut addr).is_ok();
    Ok(Some(TcpProbe { state: info[0], has_peer }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Shutdown, TcpListener, TcpStream};

    #[test]
    fn a_connection_closed_on_both_sides_keeps_its_peer() {
        let me = std::process::id() as i32;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let open = probe_tcp_socket(me, client.as_raw_fd()).expect("probe").expect("tcp");
        assert_eq!(open, TcpProbe { state: 1, has_peer: true });
        // Both sides shut down their writing: the FINs cross and both sockets end in the close
        // state (one through TIME_WAIT, whose remainder is no longer this socket).
        client.shutdown(Shutdown::Write).expect("shutdown");
        server.shutdown(Shutdown::Write).expect("shutdown");
        let mut closed = None;
        for _ in 0..200 {
            let p = probe_tcp_socket(me, client.as_raw_fd()).expect("probe").expect("tcp");
            if p.state == 7 {
                closed = Some(p);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(closed, Some(TcpProbe { state: 7, has_peer: true }));
        let listen = probe_tcp_socket(me, listener.as_raw_fd()).expect("probe").expect("tcp");
        assert_eq!(listen, TcpProbe { state: 10, has_peer: false });
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        assert_eq!(probe_tcp_socket(me, udp.as_raw_fd()).expect("probe"), None);
    }
}
