//! What ferry still speaks of CRIU's page-server protocol (CRIU 4.x, `criu/page-xfer.c`): the
//! end of a session, with which ferry closes the page server a lazy dump starts (see
//! `finisher`), and the pagemap flags of lazy dumps. Every message starts with one fixed
//! header of 32 bytes, native (little-endian on the architectures ferry supports) layout of a
//! C struct: `u32 cmd`, 4 bytes of padding, then `u64 nr_pages`, `u64 vaddr`, `u64 dst_id`.
//! `CLOSE` (sent by a client that opened a TCP connection) ends a session: the server answers
//! with a 4-byte status, 0 for success, then waits for the client to close its side.

/// Size of a page (x86_64).
pub const PAGE_SIZE: u64 = 4096;
/// Size of the header of every message.
pub const HEADER_LEN: usize = 32;

/// End of session, client on a connection of its own.
pub const CMD_CLOSE: u32 = 0x1023;
/// End of session, client on an inherited socket.
pub const CMD_FORCE_CLOSE: u32 = 0x1024;
/// `pagemap_entry` flag: the pages are present (in the image).
pub const PE_PRESENT: u32 = 1 << 2;
/// `pagemap_entry` flag: the pages are left out of the images, to be fetched lazily (with
/// `PE_PRESENT`: in the images, and a lazy restore may still leave them to its daemon).
pub const PE_LAZY: u32 = 1 << 1;
/// `pagemap_entry` flag: the pages are in the parent checkpoint's images.
pub const PE_PARENT: u32 = 1 << 0;

/// One page-server header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub cmd: u32,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: u64,
}

impl Header {
    /// An end-of-session header.
    pub fn close(forced: bool) -> Header {
        Header { cmd: if forced { CMD_FORCE_CLOSE } else { CMD_CLOSE }, nr_pages: 0, vaddr: 0, dst_id: 0 }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.cmd.to_le_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_c_struct() {
        let h = Header { cmd: 7, nr_pages: 3, vaddr: 0x7f00_0000_1000, dst_id: 7 };
        let b = h.encode();
        assert_eq!(&b[0..4], &7u32.to_le_bytes());
        assert_eq!(&b[4..8], &[0, 0, 0, 0]);
        assert_eq!(&b[8..16], &3u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x7f00_0000_1000u64.to_le_bytes());
        assert_eq!(&b[24..32], &7u64.to_le_bytes());
        assert_eq!(&Header::close(false).encode()[0..4], &0x1023u32.to_le_bytes());
        assert_eq!(&Header::close(true).encode()[0..4], &0x1024u32.to_le_bytes());
    }
}
