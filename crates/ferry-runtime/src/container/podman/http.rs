//! A small blocking HTTP/1.1 client for Podman's REST API on its Unix socket.
//!
//! Why no crate: `podman-api` (the maintained client) always sends a restore with an empty
//! body, so the restore of an imported archive, which ferry's restore is, cannot be expressed
//! with it; it also pulls about a hundred crates (hyper, tokio and more) for what is one
//! request per connection on a local socket. What Podman needs is small: a request line,
//! a few headers, a body (JSON, or an archive streamed with chunked transfer coding), and an
//! answer with a `Content-Length` or chunked body. Every answer is capped in size, every
//! read and write has a timeout, and one connection serves one request (`Connection: close`).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest status line plus headers accepted.
const MAX_HEAD: usize = 64 << 10;
/// Write buffer for a streamed body: each flush is one chunk.
const CHUNK: usize = 256 << 10;

/// Where Podman listens.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    socket: PathBuf,
}

/// An answer.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Podman's error message (`{"cause", "message", "response"}`), or the body as text.
    pub fn message(&self) -> String {
        let text = serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_owned());
        let text: String = text.chars().take(2000).collect();
        if text.is_empty() {
            format!("HTTP {}", self.status)
        } else {
            format!("{text} (HTTP {})", self.status)
        }
    }
}

/// How a call failed before an answer came.
#[derive(Debug)]
pub(crate) enum HttpError {
    /// The socket is not there or nobody accepts on it.
    Connect(io::Error),
    /// The exchange broke off (or timed out) half way.
    Io(io::Error),
    /// The answer is not HTTP as expected, or larger than allowed.
    Protocol(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Connect(e) => write!(f, "cannot connect: {e}"),
            HttpError::Io(e) => write!(f, "the exchange broke off: {e}"),
            HttpError::Protocol(m) => write!(f, "unexpected answer: {m}"),
        }
    }
}

/// What a request sends.
pub(crate) enum Body<'a> {
    None,
    Json(&'a serde_json::Value),
    /// Produced by the closure into the connection, chunked, with this content type.
    Stream(&'a str, &'a mut dyn FnMut(&mut dyn Write) -> io::Result<()>),
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client { socket: socket.to_path_buf() }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One request; the answer's body may be at most `cap` bytes.
    pub fn call(
        &self,
        method: &str,
        target: &str,
        body: Body<'_>,
        cap: usize,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        let mut stream = UnixStream::connect(&self.socket).map_err(HttpError::Connect)?;
        stream.set_read_timeout(Some(timeout)).map_err(HttpError::Io)?;
        stream.set_write_timeout(Some(timeout)).map_err(HttpError::Io)?;
        let sent = send(&mut stream, method, target, body);
        // Podman may answer (an error) before it read the whole body: read what it says.
        let answer = read_response(BufReader::new(&stream), cap);
        match (sent, answer) {
            (_, Ok(r)) => Ok(r),
            (Err(e), Err(_)) => Err(HttpError::Io(e)),
            (Ok(()), Err(e)) => Err(e),
        }
    }
}

fn send(stream: &mut UnixStream, method: &str, target: &str, body: Body<'_>) -> io::Result<()> {
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: podman\r\nConnection: close\r\n");
    match body {
        Body::None => {
            head.push_str("Content-Length: 0\r\n\r\n");
            stream.write_all(head.as_bytes())
        }
        Body::Json(v) => {
            let bytes = serde_json::to_vec(v).map_err(io::Error::other)?;
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                bytes.len()
            ));
            stream.write_all(head.as_bytes())?;
            stream.write_all(&bytes)
        }
        Body::Stream(content_type, produce) => {
            head.push_str(&format!("Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"));
            stream.write_all(head.as_bytes())?;
            let mut w = io::BufWriter::with_capacity(CHUNK, Chunked { inner: &mut *stream });
            produce(&mut w)?;
            w.flush()?;
            drop(w);
            stream.write_all(b"0\r\n\r\n")
        }
    }
}

/// Writes each buffer it gets as one chunk of a chunked body.
struct Chunked<'a> {
    inner: &'a mut UnixStream,
}

impl Write for Chunked<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.inner.write_all(format!("{:x}\r\n", buf.len()).as_bytes())?;
        self.inner.write_all(buf)?;
        self.inner.write_all(b"\r\n")?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads one answer: status line, headers, and a body by length, chunks or end of stream.
pub(crate) fn read_response(mut r: impl BufRead, cap: usize) -> Result<Response, HttpError> {
    let mut head_len = 0usize;
    let mut line = String::new();
    let mut read_line = |r: &mut dyn BufRead, line: &mut String| -> Result<(), HttpError> {
        line.clear();
        let n =
            r.take((MAX_HEAD - head_len.min(MAX_HEAD)) as u64 + 1).read_line(line).map_err(HttpError::Io)?;
        head_len += n;
        if n == 0 {
            return Err(HttpError::Protocol("the connection closed before an answer".into()));
        }
        if head_len > MAX_HEAD || !line.ends_with('\n') {
            return Err(HttpError::Protocol("the answer's head is too long".into()));
        }
        Ok(())
    };
    read_line(&mut r, &mut line)?;
    let status = parse_status(&line)?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        read_line(&mut r, &mut line)?;
        let h = line.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            return Err(HttpError::Protocol(format!("bad header line '{}'", trunc(h))));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length =
                Some(value.parse().map_err(|_| HttpError::Protocol(format!("Content-Length '{value}'")))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let too_big = || HttpError::Protocol(format!("the answer is larger than {cap} bytes"));
    let body = if chunked {
        read_chunked(&mut r, cap)?
    } else if let Some(n) = length {
        if n > cap {
            return Err(too_big());
        }
        let mut body = vec![0u8; n];
        r.read_exact(&mut body).map_err(HttpError::Io)?;
        body
    } else if status == 204 || status == 304 {
        Vec::new()
    } else {
        let mut body = Vec::new();
        r.take(cap as u64 + 1).read_to_end(&mut body).map_err(HttpError::Io)?;
        if body.len() > cap {
            return Err(too_big());
        }
        body
    };
    Ok(Response { status, body })
}

fn parse_status(line: &str) -> Result<u16, HttpError> {
    let mut parts = line.split_whitespace();
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Protocol(format!("status line '{}'", trunc(line.trim()))));
    }
    code.parse().map_err(|_| HttpError::Protocol(format!("status line '{}'", trunc(line.trim()))))
}

fn read_chunked(r: &mut impl BufRead, cap: usize) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        r.by_ref().take(1024).read_line(&mut line).map_err(HttpError::Io)?;
        let size_text = line.trim().split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Protocol(format!("chunk size '{}'", trunc(line.trim()))))?;
        if size == 0 {
            // Trailers (none expected) up to the empty line; a close right away is fine.
            loop {
                line.clear();
                let n = r.by_ref().take(MAX_HEAD as u64).read_line(&mut line).map_err(HttpError::Io)?;
                if n == 0 || line.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        if body.len().saturating_add(size) > cap {
            return Err(HttpError::Protocol(format!("the answer is larger than {cap} bytes")));
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..]).map_err(HttpError::Io)?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf).map_err(HttpError::Io)?;
        if &crlf != b"\r\n" {
            return Err(HttpError::Protocol("a chunk does not end in CRLF".into()));
        }
    }
}

fn trunc(s: &str) -> String {
    s.chars().take(120).collect()
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8], cap: usize) -> Result<Response, HttpError> {
        read_response(BufReader::new(raw), cap)
    }

    #[test]
    fn reads_length_chunked_and_eof_bodies() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: x\r\n\r\nhelloTRAILING", 100)
            .expect("length");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        let r = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            100,
        )
        .expect("chunked");
        assert_eq!(r.body, b"hello world");
        let r =
            parse(b"HTTP/1.0 404 Not Found\r\n\r\n{\"message\":\"no such container\"}", 100).expect("eof");
        assert_eq!(r.status, 404);
        assert_eq!(r.message(), "no such container (HTTP 404)");
        let r = parse(b"HTTP/1.1 204 No Content\r\n\r\n", 100).expect("204");
        assert!(r.ok() && r.body.is_empty());
    }

    #[test]
    fn caps_and_refuses_odd_answers() {
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n", 100).is_err());
        let big = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n".to_vec();
        assert!(parse(&[big, vec![b'x'; 64], b"\r\n40\r\n".to_vec(), vec![b'x'; 64]].concat(), 100).is_err());
        assert!(parse(&[b"HTTP/1.1 200 OK\r\n\r\n".to_vec(), vec![b'x'; 200]].concat(), 100).is_err());
        assert!(parse(b"SSH-2.0-OpenSSH\r\n\r\n", 100).is_err());
        assert!(parse(b"", 100).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 100).is_err());
        let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        long.extend(vec![b'a'; MAX_HEAD + 10]);
        assert!(parse(&long, 100).is_err());
    }

    #[test]
    fn streams_chunked_bodies() {
        let (a, b) = UnixStream::pair().expect("pair");
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut b = b;
            b.read_to_end(&mut got).expect("read");
            got
        });
        let mut a = a;
        let mut produce = |w: &mut dyn Write| w.write_all(b"abc");
        send(&mut a, "POST", "/x", Body::Stream("application/x-tar", &mut produce)).expect("send");
        drop(a);
        let got = String::from_utf8(reader.join().expect("join")).expect("utf8");
        assert!(got.starts_with("POST /x HTTP/1.1\r\n"), "{got}");
        assert!(got.contains("Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), "{got}");
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(encode("localhost/ferry-lab/busybox:latest"), "localhost%2Fferry-lab%2Fbusybox%3Alatest");
        assert_eq!(encode("CMD [\"/bin/sh\"]"), "CMD%20%5B%22%2Fbin%2Fsh%22%5D");
    }
}
