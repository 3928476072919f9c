//! userfaultfd(2): the descriptor through which ferry fills a restored process's missing
//! (lazy) pages, and the Unix-socket descriptor passing by which `criu restore` hands it over.
//!
//! Layouts and request numbers are those of `<linux/userfaultfd.h>` (stable kernel ABI).

use crate::retry::retry_eintr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

const UFFDIO: u64 = 0xAA;
/// `_IOC(dir, 0xAA, nr, size)`: dir 1 = write, 2 = read, 3 = both (in the kernel's sense).
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (UFFDIO << 8) | nr
}
const UFFDIO_API: u64 = ioc(3, 0x3F, 24);
const UFFDIO_REGISTER: u64 = ioc(3, 0x00, 32);
const UFFDIO_UNREGISTER: u64 = ioc(2, 0x01, 16);
const UFFDIO_WAKE: u64 = ioc(2, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(3, 0x03, 40);
const UFFDIO_ZEROPAGE: u64 = ioc(3, 0x04, 32);

const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

/// The events CRIU's lazy restore asks for (`NEED_UFFD_API_FEATURES`, criu/uffd.c).
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;
/// `sizeof(struct uffd_msg)`.
const MSG_SIZE: usize = 32;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// One message read from a userfaultfd.
#[derive(Debug)]
pub enum UffdEvent {
    /// A thread touched a missing page at `address` (not page aligned) and waits.
    PageFault { address: u64, write: bool },
    /// The process forked: `uffd` serves the child's registered ranges.
    Fork { uffd: Uffd },
    /// `mremap` moved `[from, from + len)` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// `madvise(DONTNEED/REMOVE)` dropped `[start, end)`; the mapping stays registered.
    Remove { start: u64, end: u64 },
    /// `munmap` removed `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// An event this code does not know.
    Other(u8),
}

/// What became of an [`Uffd::copy`] or [`Uffd::zero`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// All of it was filled (and the waiting threads woken).
    Done,
    /// A page of the range was present already: `filled` bytes before it were filled.
    Exists { filled: u64 },
    /// The process is gone (exited or exec'd): nothing more can be filled.
    Gone,
    /// The mapping is changing (an event not read yet) or is no longer there: `filled`
    /// bytes were filled; look again after reading the events.
    Retry { filled: u64 },
}

/// A userfaultfd descriptor.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn u64_at(msg: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&msg[at..at + 8]);
    u64::from_ne_bytes(b)
}

impl Uffd {
    /// A new userfaultfd of this process (non-blocking, close-on-exec) with the API handshake
    /// done for `features`. For tests and probes: CRIU opens the ones of restored processes.
    pub fn open(features: u64) -> io::Result<Uffd> {
        // SAFETY: userfaultfd(2) takes only flags and returns a new descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall succeeded: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
        let uffd = Uffd { fd };
        let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
        uffd.ioctl(UFFDIO_API, (&mut api as *mut UffdioApi).cast())?;
        Ok(uffd)
    }

    /// Wraps a descriptor received from CRIU.
    pub fn from_fd(fd: OwnedFd) -> Uffd {
        Uffd { fd }
    }

    fn ioctl(&self, request: u64, arg: *mut libc::c_void) -> io::Result<()> {
        // SAFETY: every caller passes a pointer to a live, properly laid out struct of the
        // size encoded in `request`, which the kernel reads and writes only during the call.
        retry_eintr(|| unsafe { libc::ioctl(self.fd.as_raw_fd(), request as libc::c_ulong, arg) })?;
        Ok(())
    }

    /// Registers `[start, start + len)` of this process for missing-page faults.
    pub fn register_missing(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, (&mut reg as *mut UffdioRegister).cast())
    }

    /// Stops handling `[start, start + len)`: its faults become ordinary ones again.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        self.ioctl(UFFDIO_UNREGISTER, (&mut range as *mut UffdioRange).cast())
    }

    /// Wakes threads waiting on `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        self.ioctl(UFFDIO_WAKE, (&mut range as *mut UffdioRange).cast())
    }

    fn fill_result(&self, result: io::Result<()>, filled: i64) -> io::Result<Fill> {
        match result {
            Ok(()) => Ok(Fill::Done),
            Err(e) => match e.raw_os_error() {
                Some(libc::EEXIST) => Ok(Fill::Exists { filled: filled.max(0) as u64 }),
                Some(libc::EAGAIN) | Some(libc::ENOENT) => Ok(Fill::Retry { filled: filled.max(0) as u64 }),
                // ESRCH: the mm is gone; ENOSPC: it is going (exit, exec).
                Some(libc::ESRCH) | Some(libc::ENOSPC) => Ok(Fill::Gone),
                _ => Err(e),
            },
        }
    }

    /// Copies `data` (whole pages) to `dst` in the process this descriptor serves and wakes
    /// the threads waiting there. The range must lie inside one registered mapping.
    pub fn copy(&self, dst: u64, data: &[u8]) -> io::Result<Fill> {
        let mut copy =
            UffdioCopy { dst, src: data.as_ptr() as u64, len: data.len() as u64, mode: 0, copy: 0 };
        let r = self.ioctl(UFFDIO_COPY, (&mut copy as *mut UffdioCopy).cast());
        self.fill_result(r, copy.copy)
    }

    /// Maps zero pages at `[dst, dst + len)` and wakes the threads waiting there.
    pub fn zero(&self, dst: u64, len: u64) -> io::Result<Fill> {
        let mut zp = UffdioZeropage { range: UffdioRange { start: dst, len }, mode: 0, zeropage: 0 };
        let r = self.ioctl(UFFDIO_ZEROPAGE, (&mut zp as *mut UffdioZeropage).cast());
        self.fill_result(r, zp.zeropage)
    }

    /// Reads the messages waiting (none if there are none: the descriptor is non-blocking).
    /// A fork's new descriptor arrives in this process with the message.
    pub fn read_events(&self, out: &mut Vec<UffdEvent>) -> io::Result<()> {
        let mut buf = [0u8; MSG_SIZE * 64];
        loop {
            // SAFETY: the pointer and length describe `buf`, which outlives the call.
            let n = match retry_eintr(|| unsafe {
                libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
            }) {
                Ok(n) => n as usize,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(());
            }
            for msg in buf[..n].chunks_exact(MSG_SIZE) {
                out.push(match msg[0] {
                    EVENT_PAGEFAULT => {
                        UffdEvent::PageFault { address: u64_at(msg, 16), write: u64_at(msg, 8) & 1 != 0 }
                    }
                    EVENT_FORK => {
                        let raw = u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]) as RawFd;
                        // SAFETY: the kernel installed this descriptor in our table for this
                        // message; reading the message hands its ownership to us.
                        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                        UffdEvent::Fork { uffd: Uffd { fd } }
                    }
                    EVENT_REMAP => {
                        UffdEvent::Remap { from: u64_at(msg, 8), to: u64_at(msg, 16), len: u64_at(msg, 24) }
                    }
                    EVENT_REMOVE => UffdEvent::Remove { start: u64_at(msg, 8), end: u64_at(msg, 16) },
                    EVENT_UNMAP => UffdEvent::Unmap { start: u64_at(msg, 8), end: u64_at(msg, 16) },
                    other => UffdEvent::Other(other),
                });
            }
            if n < buf.len() {
                return Ok(());
            }
        }
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Waits until one of `fds` is readable (or hung up), at most `timeout_ms` (-1: forever).
/// Returns, per descriptor, whether it is ready.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut polls: Vec<libc::pollfd> =
        fds.iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: `polls` is a valid array of `polls.len()` pollfd structs that outlives the call.
    retry_eintr(|| unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout_ms) })?;
    Ok(polls.iter().map(|p| p.revents != 0).collect())
}

/// Receives exactly `data.len()` bytes, and with them at most one descriptor passed by
/// `SCM_RIGHTS` (close-on-exec). `Ok(None)` with nothing read means the peer closed.
pub fn recv_with_fd(sock: &UnixStream, data: &mut [u8]) -> io::Result<Option<Option<OwnedFd>>> {
    // Room for one descriptor's control message (CMSG_SPACE(sizeof(int)) = 24 on 64-bit).
    let mut control = [0u64; 8];
    let mut got = 0usize;
    let mut fd: Option<OwnedFd> = None;
    while got < data.len() {
        let mut iov = libc::iovec { iov_base: data[got..].as_mut_ptr().cast(), iov_len: data.len() - got };
        // SAFETY: an all-zero msghdr is a valid empty header; the fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: `msg` points at `iov` (inside `data`) and `control`, both alive for the call.
        let n = retry_eintr(|| unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) })?;
        // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR only walk within
        // `msg_control`/`msg_controllen`, which describe `control`.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: `cmsg` is non-null and points inside `control` (see above).
            let (level, kind, len) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
            if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN(0) is a pure computation.
                let header = unsafe { libc::CMSG_LEN(0) } as usize;
                let count = len.saturating_sub(header) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    // SAFETY: the control message holds `count` descriptors after its header,
                    // inside `control`; read_unaligned copes with any alignment.
                    let raw =
                        unsafe { std::ptr::read_unaligned((libc::CMSG_DATA(cmsg) as *const RawFd).add(i)) };
                    // SAFETY: the kernel installed `raw` in our table for this message: we own it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if fd.is_none() {
                        fd = Some(owned);
                    } // Further descriptors are closed on drop: one was expected.
                }
            }
            // SAFETY: as above, NXTHDR stays within the control buffer or returns null.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "descriptors truncated"));
        }
        let n = n as usize;
        if n == 0 {
            if got == 0 && fd.is_none() {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a message"));
        }
        got += n;
    }
    Ok(Some(fd))
}

/// Sends `data` with `fd` attached (`SCM_RIGHTS`), as CRIU's `send_fd` does: for tests that
/// stand in for `criu restore`.
pub fn send_with_fd(sock: &UnixStream, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: an all-zero msghdr is a valid empty header; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    // SAFETY: `control` is large enough for one descriptor's message (checked by the size of
    // `msg_controllen` above, 24 of its 64 bytes); the header and data are written inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, fd.as_raw_fd());
    }
    // SAFETY: `msg` points at `iov` (over `data`) and `control`, both alive for the call.
    let n = retry_eintr(|| unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) })?;
    if n as usize == data.len() {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::WriteZero, "short write with a descriptor"))
    }
}

/// A private anonymous mapping of this process, unmapped on drop: memory for userfaultfd
/// tests and probes.
#[derive(Debug)]
pub struct AnonMapping {
    addr: usize,
    len: usize,
}

impl AnonMapping {
    /// Maps `len` bytes (rounded up to pages), read-write, not touched yet.
    pub fn new(len: usize) -> io::Result<AnonMapping> {
        let page = 4096usize;
        let len = len.div_ceil(page) * page;
        // SAFETY: an anonymous private mapping at an address of the kernel's choice touches no
        // existing memory; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(AnonMapping { addr: p as usize, len })
    }

    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `out.len()` bytes from `offset` (faulting pages in as any access would).
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset.checked_add(out.len()).is_some_and(|end| end <= self.len), "read outside the mapping");
        // SAFETY: the range was checked to lie inside the live mapping, which stays mapped
        // until drop; volatile-free byte copies of anonymous memory are always defined.
        unsafe {
            std::ptr::copy_nonoverlapping((self.addr + offset) as *const u8, out.as_mut_ptr(), out.len())
        }
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(
            offset.checked_add(data.len()).is_some_and(|end| end <= self.len),
            "write outside the mapping"
        );
        // SAFETY: as in `read`; the mapping is writable and owned by this value.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (self.addr + offset) as *mut u8, data.len()) }
    }
}

impl AnonMapping {
    /// Moves `len` bytes at `offset` to `dest_offset` of `dest` (`mremap`, fixed address),
    /// replacing what `dest` had there; `[offset, offset + len)` of this mapping is then a hole
    /// that must not be touched.
    pub fn move_to(
        &self,
        offset: usize,
        len: usize,
        dest: &AnonMapping,
        dest_offset: usize,
    ) -> io::Result<()> {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "move outside the mapping");
        assert!(dest_offset.checked_add(len).is_some_and(|end| end <= dest.len), "move outside the target");
        // SAFETY: both ranges were checked to lie inside mappings this process owns (values of
        // this type); MREMAP_FIXED replaces only the target range, which `dest` owns.
        let p = unsafe {
            libc::mremap(
                (self.addr + offset) as *mut libc::c_void,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                (dest.addr + dest_offset) as *mut libc::c_void,
            )
        };
        if p == libc::MAP_FAILED {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Drops the pages of `[offset, offset + len)` (`madvise(MADV_DONTNEED)`): they read as
    /// zeros afterwards.
    pub fn discard(&self, offset: usize, len: usize) -> io::Result<()> {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "discard outside the mapping");
        // SAFETY: the range lies inside this live mapping; MADV_DONTNEED only drops its pages.
        let rc =
            unsafe { libc::madvise((self.addr + offset) as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Makes `[offset, offset + len)` read-only (`mprotect(PROT_READ)`): the kernel splits the
    /// mapping there, and tells no userfaultfd.
    pub fn read_only(&self, offset: usize, len: usize) -> io::Result<()> {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "mprotect outside the mapping");
        // SAFETY: the range lies inside this live mapping; taking write access away touches no
        // memory (this value writes only through `write`, which the caller then must not use there).
        let rc = unsafe { libc::mprotect((self.addr + offset) as *mut libc::c_void, len, libc::PROT_READ) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value made; nothing refers to it afterwards.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel_header() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
    }

    /// A thread faults on a registered page; the fault is read and filled by copy.
    #[test]
    fn faults_are_read_and_filled() {
        let uffd = match Uffd::open(0) {
            Ok(u) => u,
            // Unprivileged and vm.unprivileged_userfaultfd=0: nothing to test here, except in
            // CI, which runs as root and must not skip.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && !crate::is_root() => {
                assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI must run this as root");
                return;
            }
            Err(e) => panic!("userfaultfd: {e}"),
        };
        let map = std::sync::Arc::new(AnonMapping::new(4 * 4096).unwrap());
        uffd.register_missing(map.addr(), map.len() as u64).unwrap();
        let reader = {
            let map = map.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 8];
                map.read(2 * 4096 + 100, &mut b);
                b
            })
        };
        let mut events = Vec::new();
        while events.is_empty() {
            poll_readable(&[uffd.as_fd()], 5000).unwrap();
            uffd.read_events(&mut events).unwrap();
        }
        let UffdEvent::PageFault { address, write } = events[0] else { panic!("{:?}", events[0]) };
        assert_eq!(address & !4095, map.addr() + 2 * 4096);
        assert!(!write);
        let page = vec![7u8; 4096];
        assert_eq!(uffd.copy(map.addr() + 2 * 4096, &page).unwrap(), Fill::Done);
        assert_eq!(reader.join().unwrap(), [7u8; 8]);
        // The page is there now: a second copy finds it.
        assert_eq!(uffd.copy(map.addr() + 2 * 4096, &page).unwrap(), Fill::Exists { filled: 0 });
        assert_eq!(uffd.zero(map.addr(), 4096).unwrap(), Fill::Done);
        let mut b = [1u8; 4];
        map.read(0, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn a_descriptor_crosses_a_socket_with_its_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut &a, &42i32.to_ne_bytes()).unwrap();
        let mut pid = [0u8; 4];
        assert!(recv_with_fd(&b, &mut pid).unwrap().unwrap().is_none());
        assert_eq!(i32::from_ne_bytes(pid), 42);
        let (r, w) = std::io::pipe().unwrap();
        send_with_fd(&a, &[9], r.as_fd()).unwrap();
        drop(r);
        let mut x = [0u8; 1];
        let got = recv_with_fd(&b, &mut x).unwrap().unwrap().expect("a descriptor");
        assert_eq!(x, [9]);
        std::io::Write::write_all(&mut &w, b"z").unwrap();
        let mut via = std::fs::File::from(got);
        let mut z = [0u8; 1];
        std::io::Read::read_exact(&mut via, &mut z).unwrap();
        assert_eq!(&z, b"z", "the received descriptor is the pipe's read end");
        drop(a);
        assert!(recv_with_fd(&b, &mut x).unwrap().is_none(), "closed: None");
    }
}
