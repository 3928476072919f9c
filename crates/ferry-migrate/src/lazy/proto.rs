//! The wire format of CRIU's page server (CRIU 4.x, `criu/page-xfer.c`), as far as lazy pages
//! use it. Every message starts with one fixed header of 32 bytes, native (little-endian on the
//! architectures ferry supports) layout of a C struct: `u32 cmd`, 4 bytes of padding, then
//! `u64 nr_pages`, `u64 vaddr`, `u64 dst_id`.
//!
//! - The lazy-pages daemon asks with `GET` (`dst_id` = the process's pid as in `pstree.img`,
//!   `vaddr` = the range's address in the images, `nr_pages`).
//! - The server answers each `GET`, in order, with a header whose command is `ADD_F` carrying
//!   the flag `PE_PRESENT` in its upper 16 bits, echoing `vaddr` and `dst_id`, with the number of
//!   pages it sends (at most the number asked; the daemon accepts fewer), followed by the pages.
//! - `CLOSE` (sent by a client that opened a TCP connection) and `FORCE_CLOSE` (sent by a client
//!   given an inherited socket) end a session: the server answers with a 4-byte status, 0 for
//!   success. A TCP server then waits for the client to close its side before it closes.

use std::io::{self, Read, Write};

/// Size of a page in CRIU's page-server messages (x86_64).
pub const PAGE_SIZE: u64 = 4096;
/// Size of the header of every message.
pub const HEADER_LEN: usize = 32;

/// Asks for pages (lazy-pages daemon to page server).
pub const CMD_GET: u32 = 7;
/// Pages follow (`flags << 16 | ADD_F`).
pub const CMD_ADD_F: u32 = 6;
/// End of session, client on a connection of its own.
pub const CMD_CLOSE: u32 = 0x1023;
/// End of session, client on an inherited socket.
pub const CMD_FORCE_CLOSE: u32 = 0x1024;
/// `pagemap_entry` flag: the pages are present (in the image, or here: in the message).
pub const PE_PRESENT: u32 = 1 << 2;
/// `pagemap_entry` flag: the pages are left out of the images, to be fetched lazily.
pub const PE_LAZY: u32 = 1 << 1;

const CMD_BITS: u32 = 16;

/// One page-server header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub cmd: u32,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: u64,
}

impl Header {
    /// A request for `nr_pages` pages at `vaddr` of process `pid`.
    pub fn get(pid: u32, vaddr: u64, nr_pages: u64) -> Header {
        Header { cmd: CMD_GET, nr_pages, vaddr, dst_id: u64::from(pid) }
    }

    /// The answer header to `request`, announcing `nr_pages` pages.
    pub fn pages_for(request: &Header, nr_pages: u64) -> Header {
        Header {
            cmd: PE_PRESENT << CMD_BITS | CMD_ADD_F,
            nr_pages,
            vaddr: request.vaddr,
            dst_id: request.dst_id,
        }
    }

    /// An end-of-session header.
    pub fn close(forced: bool) -> Header {
        Header { cmd: if forced { CMD_FORCE_CLOSE } else { CMD_CLOSE }, nr_pages: 0, vaddr: 0, dst_id: 0 }
    }

    /// The command without its flags.
    pub fn command(&self) -> u32 {
        self.cmd & ((1 << CMD_BITS) - 1)
    }

    /// The flags carried in the command's upper bits.
    pub fn flags(&self) -> u32 {
        self.cmd >> CMD_BITS
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.cmd.to_le_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        Header {
            cmd: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        }
    }

    /// Reads one header; `Ok(None)` on a clean end of stream before its first byte.
    pub fn read_from(r: &mut impl Read) -> io::Result<Option<Header>> {
        let mut b = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut b[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short page-server header"))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Some(Header::decode(&b)))
    }

    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_c_struct() {
        let h = Header::get(7, 0x7f00_0000_1000, 3);
        let b = h.encode();
        assert_eq!(&b[0..4], &7u32.to_le_bytes());
        assert_eq!(&b[4..8], &[0, 0, 0, 0]);
        assert_eq!(&b[8..16], &3u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x7f00_0000_1000u64.to_le_bytes());
        assert_eq!(&b[24..32], &7u64.to_le_bytes());
        assert_eq!(Header::decode(&b), h);
        let answer = Header::pages_for(&h, 2);
        assert_eq!(answer.command(), CMD_ADD_F);
        assert_eq!(answer.flags(), PE_PRESENT);
        assert_eq!(answer.cmd, 0x4_0006);
        assert_eq!((answer.vaddr, answer.dst_id, answer.nr_pages), (h.vaddr, 7, 2));
    }

    #[test]
    fn reads_headers_and_clean_ends() {
        let mut bytes = Header::close(true).encode().to_vec();
        bytes.extend_from_slice(&[1, 2, 3]);
        let mut r = &bytes[..];
        assert_eq!(Header::read_from(&mut r).expect("first").expect("some").command(), CMD_FORCE_CLOSE);
        assert!(Header::read_from(&mut r).is_err(), "3 bytes are no header");
        let mut empty: &[u8] = &[];
        assert!(Header::read_from(&mut empty).expect("clean end").is_none());
    }
}
