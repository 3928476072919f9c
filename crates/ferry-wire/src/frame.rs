//! Framed messages over any byte stream.
//!
//! ```text
//! offset  size  field
//!      0     4  magic   b"FRYW"
//!      4     2  version u16 BE (= VERSION; the wire format's, not the product's)
//!      6     2  kind    u16 BE (meaning chosen by the protocol above)
//!      8     4  length  u32 BE (payload bytes that follow)
//!     12   len  payload
//! ```
//!
//! A reader refuses a frame whose length is above its cap before it allocates anything, and
//! allocates as the payload arrives, not what the header claims. A wrong magic or version is
//! refused. End of input before the first header byte is a clean end (`Ok(None)`); anywhere
//! else it is [`WireError::Truncated`].

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::WireError;

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FRYW";
/// The wire format version this build reads and writes.
pub const VERSION: u16 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 12;
/// Default cap on a payload: 16 MiB.
pub const DEFAULT_CAP: u32 = 16 << 20;

/// Payloads up to this size are written in one call with their header (one TLS record, one
/// segment); larger ones are written after it, without a copy.
const COALESCE_MAX: usize = 64 << 10;
/// What a reader reserves up front, whatever the header claims.
const INITIAL_ALLOC: usize = 64 << 10;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The message kind from the header.
    pub kind: u16,
    /// The payload, exactly as long as the header said.
    pub payload: Vec<u8>,
}

/// The 12 header bytes of a frame of `kind` with `len` payload bytes.
fn header(kind: u16, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..].copy_from_slice(&len.to_be_bytes());
    h
}

/// Checks a header; returns (kind, payload length).
fn parse_header(h: &[u8; HEADER_LEN], cap: u32) -> Result<(u16, u32), WireError> {
    let found: [u8; 4] = [h[0], h[1], h[2], h[3]];
    if found != MAGIC {
        return Err(WireError::BadMagic { found });
    }
    let version = u16::from_be_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(WireError::Version { found: version, supported: VERSION });
    }
    let kind = u16::from_be_bytes([h[6], h[7]]);
    let len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    if len > cap {
        return Err(WireError::TooLarge { kind, len: len.into(), cap });
    }
    Ok((kind, len))
}

/// Writes one frame and flushes `w`.
pub fn write_frame(w: &mut impl Write, kind: u16, payload: &[u8]) -> Result<(), WireError> {
    let len = u32::try_from(payload.len()).map_err(|_| WireError::TooLarge {
        kind,
        len: payload.len() as u64,
        cap: u32::MAX,
    })?;
    let h = header(kind, len);
    if payload.len() <= COALESCE_MAX {
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(&h);
        buf.extend_from_slice(payload);
        w.write_all(&buf)?;
    } else {
        w.write_all(&h)?;
        w.write_all(payload)?;
    }
    w.flush()?;
    Ok(())
}

/// Reads into `buf` until it is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame whose payload is at most `cap` bytes. `Ok(None)`: the input ended cleanly,
/// before the first byte of a header.
pub fn read_frame(r: &mut impl Read, cap: u32) -> Result<Option<Frame>, WireError> {
    let mut h = [0u8; HEADER_LEN];
    let got = read_full(r, &mut h)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(WireError::Truncated { got, need: HEADER_LEN });
    }
    let (kind, len) = parse_header(&h, cap)?;
    let need = len as usize;
    let mut payload = Vec::with_capacity(need.min(INITIAL_ALLOC));
    let got = r.take(u64::from(len)).read_to_end(&mut payload)?;
    if got < need {
        return Err(WireError::Truncated { got, need });
    }
    Ok(Some(Frame { kind, payload }))
}

/// Decodes the frame at the start of `bytes`; returns it and the bytes it took.
pub fn decode_frame(bytes: &[u8], cap: u32) -> Result<(Frame, usize), WireError> {
    let Some(h) = bytes.first_chunk::<HEADER_LEN>() else {
        return Err(WireError::Truncated { got: bytes.len(), need: HEADER_LEN });
    };
    let (kind, len) = parse_header(h, cap)?;
    let rest = &bytes[HEADER_LEN..];
    let need = len as usize;
    let Some(payload) = rest.get(..need) else {
        return Err(WireError::Truncated { got: rest.len(), need });
    };
    Ok((Frame { kind, payload: payload.to_vec() }, HEADER_LEN + need))
}

/// Encodes `msg` with postcard and writes it as one frame of `kind`.
pub fn send<T: Serialize + ?Sized>(w: &mut impl Write, kind: u16, msg: &T) -> Result<(), WireError> {
    let payload = postcard::to_allocvec(msg).map_err(|source| WireError::Encode { kind, source })?;
    write_frame(w, kind, &payload)
}

/// Decodes a frame's payload as one `T`, with nothing after it.
pub fn decode_payload<T: DeserializeOwned>(frame: &Frame) -> Result<T, WireError> {
    let kind = frame.kind;
    let (msg, rest) =
        postcard::take_from_bytes(&frame.payload).map_err(|source| WireError::Decode { kind, source })?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes { kind, extra: rest.len() });
    }
    Ok(msg)
}

/// Reads one frame and decodes its payload as `T`. `Ok(None)`: the input ended cleanly.
/// Callers that accept several message types per kind read with [`read_frame`] and decode
/// with [`decode_payload`].
pub fn recv<T: DeserializeOwned>(r: &mut impl Read, cap: u32) -> Result<Option<(u16, T)>, WireError> {
    let Some(frame) = read_frame(r, cap)? else {
        return Ok(None);
    };
    Ok(Some((frame.kind, decode_payload(&frame)?)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Cursor;

    use serde::Deserialize;

    use super::*;

    fn framed(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, kind, payload).unwrap();
        out
    }

    /// Hands out one byte per read, with an `Interrupted` before each.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        interrupt: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::ErrorKind::Interrupted.into());
            }
            if self.pos == self.data.len() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.data[self.pos];
            self.pos += 1;
            Ok(1)
        }
    }

    #[test]
    fn header_layout_is_big_endian() {
        let f = framed(0x0102, b"xyz");
        assert_eq!(&f[..], b"FRYW\x00\x01\x01\x02\x00\x00\x00\x03xyz");
    }

    #[test]
    fn frames_round_trip_then_clean_end() {
        let big = vec![7u8; COALESCE_MAX + 1000];
        let mut stream = framed(1, b"");
        stream.extend(framed(2, b"hello"));
        stream.extend(framed(u16::MAX, &big));
        let mut r = Cursor::new(stream);
        assert_eq!(read_frame(&mut r, DEFAULT_CAP).unwrap(), Some(Frame { kind: 1, payload: vec![] }));
        assert_eq!(read_frame(&mut r, DEFAULT_CAP).unwrap().unwrap().payload, b"hello");
        assert_eq!(read_frame(&mut r, DEFAULT_CAP).unwrap(), Some(Frame { kind: u16::MAX, payload: big }));
        assert_eq!(read_frame(&mut r, DEFAULT_CAP).unwrap(), None);
        assert_eq!(read_frame(&mut r, DEFAULT_CAP).unwrap(), None);
    }

    #[test]
    fn empty_input_is_a_clean_end() {
        assert_eq!(read_frame(&mut io::empty(), DEFAULT_CAP).unwrap(), None);
    }

    #[test]
    fn short_reads_and_interrupts_are_retried() {
        let mut r = Trickle { data: framed(9, b"slowly"), pos: 0, interrupt: false };
        assert_eq!(
            read_frame(&mut r, DEFAULT_CAP).unwrap(),
            Some(Frame { kind: 9, payload: b"slowly".to_vec() })
        );
        assert_eq!(read_frame(&mut r, DEFAULT_CAP).unwrap(), None);
    }

    #[test]
    fn truncated_header_is_an_error() {
        let f = framed(1, b"abc");
        for cut in 1..HEADER_LEN {
            let err = read_frame(&mut Cursor::new(&f[..cut]), DEFAULT_CAP).unwrap_err();
            assert!(matches!(err, WireError::Truncated { got, need: HEADER_LEN } if got == cut), "{err:?}");
        }
    }

    #[test]
    fn truncated_payload_is_an_error() {
        let f = framed(1, b"abcdef");
        let err = read_frame(&mut Cursor::new(&f[..HEADER_LEN + 2]), DEFAULT_CAP).unwrap_err();
        assert!(matches!(err, WireError::Truncated { got: 2, need: 6 }), "{err:?}");
        assert!(err.to_string().contains("2 of 6 bytes"));
    }

    #[test]
    fn wrong_magic_is_refused() {
        let mut f = framed(1, b"abc");
        f[..4].copy_from_slice(b"HTTP");
        let err = read_frame(&mut Cursor::new(&f), DEFAULT_CAP).unwrap_err();
        assert!(matches!(err, WireError::BadMagic { found } if &found == b"HTTP"), "{err:?}");
        assert!(err.to_string().contains("not a ferry wire frame"));
    }

    #[test]
    fn other_version_is_refused() {
        let mut f = framed(1, b"abc");
        f[4..6].copy_from_slice(&2u16.to_be_bytes());
        let err = read_frame(&mut Cursor::new(&f), DEFAULT_CAP).unwrap_err();
        assert!(matches!(err, WireError::Version { found: 2, supported: VERSION }), "{err:?}");
        assert!(decode_frame(&f, DEFAULT_CAP).is_err());
    }

    #[test]
    fn length_above_cap_is_refused_before_reading_the_payload() {
        let mut f = header(3, u32::MAX).to_vec();
        f.extend_from_slice(b"not read");
        let mut r = Cursor::new(&f);
        let err = read_frame(&mut r, DEFAULT_CAP).unwrap_err();
        assert!(
            matches!(err, WireError::TooLarge { kind: 3, len, cap: DEFAULT_CAP } if len == u64::from(u32::MAX))
        );
        assert_eq!(r.position(), HEADER_LEN as u64, "nothing read past the header");
    }

    #[test]
    fn cap_is_per_reader_and_inclusive() {
        let f = framed(1, &[0; 100]);
        assert!(read_frame(&mut Cursor::new(&f), 100).unwrap().is_some());
        assert!(matches!(
            read_frame(&mut Cursor::new(&f), 99),
            Err(WireError::TooLarge { len: 100, cap: 99, .. })
        ));
        assert!(decode_frame(&f, 100).is_ok());
        assert!(matches!(decode_frame(&f, 99), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn huge_claimed_length_with_little_data_is_truncated_not_allocated() {
        let mut f = header(1, DEFAULT_CAP).to_vec();
        f.extend_from_slice(b"tiny");
        let err = read_frame(&mut Cursor::new(&f), DEFAULT_CAP).unwrap_err();
        assert!(matches!(err, WireError::Truncated { got: 4, need } if need == DEFAULT_CAP as usize));
    }

    #[test]
    fn decode_frame_reports_what_it_consumed() {
        let mut bytes = framed(4, b"one");
        bytes.extend(framed(5, b"two!"));
        let (f, used) = decode_frame(&bytes, DEFAULT_CAP).unwrap();
        assert_eq!((f.kind, &f.payload[..], used), (4, &b"one"[..], HEADER_LEN + 3));
        let (f, used2) = decode_frame(&bytes[used..], DEFAULT_CAP).unwrap();
        assert_eq!((f.kind, &f.payload[..], used + used2), (5, &b"two!"[..], bytes.len()));
    }

    #[test]
    fn decode_frame_refuses_short_input() {
        assert!(matches!(
            decode_frame(b"", DEFAULT_CAP),
            Err(WireError::Truncated { got: 0, need: HEADER_LEN })
        ));
        assert!(matches!(decode_frame(b"FRYW\0", DEFAULT_CAP), Err(WireError::Truncated { got: 5, .. })));
        let f = framed(1, b"abc");
        assert!(matches!(
            decode_frame(&f[..f.len() - 1], DEFAULT_CAP),
            Err(WireError::Truncated { got: 2, need: 3 })
        ));
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Hello {
        name: String,
        versions: Vec<u16>,
    }

    #[test]
    fn typed_messages_round_trip() {
        let msg = Hello { name: "node1".into(), versions: vec![1, 2] };
        let mut out = Vec::new();
        send(&mut out, 7, &msg).unwrap();
        send(&mut out, 8, &42u64).unwrap();
        let mut r = Cursor::new(out);
        assert_eq!(recv::<Hello>(&mut r, DEFAULT_CAP).unwrap(), Some((7, msg)));
        assert_eq!(recv::<u64>(&mut r, DEFAULT_CAP).unwrap(), Some((8, 42)));
        assert_eq!(recv::<u64>(&mut r, DEFAULT_CAP).unwrap(), None);
    }

    #[test]
    fn typed_payload_that_does_not_decode_is_refused() {
        let f = framed(3, &[0xff]);
        let err = recv::<Hello>(&mut Cursor::new(&f), DEFAULT_CAP).unwrap_err();
        assert!(matches!(err, WireError::Decode { kind: 3, .. }), "{err:?}");
    }

    #[test]
    fn typed_payload_with_trailing_bytes_is_refused() {
        let mut payload = postcard::to_allocvec(&5u32).unwrap();
        payload.push(0);
        let f = framed(3, &payload);
        let err = recv::<u32>(&mut Cursor::new(&f), DEFAULT_CAP).unwrap_err();
        assert!(matches!(err, WireError::TrailingBytes { kind: 3, extra: 1 }), "{err:?}");
    }
}
