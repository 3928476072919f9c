//! Loopback helpers: free ports and line-oriented clients.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};

use crate::poll::WAIT;

/// A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it; tests running in
/// parallel get different ones).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Connects to 127.0.0.1:`port` and reads until the server closes: the resources workload's
/// greeting.
pub fn fetch_greeting(port: u16) -> io::Result<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(WAIT))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// A client speaking lines over one TCP connection to 127.0.0.1.
#[derive(Debug)]
pub struct LineClient {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl LineClient {
    /// Connects; reads time out after [`WAIT`], long enough to span a checkpoint and restore.
    pub fn connect(port: u16) -> io::Result<LineClient> {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        stream.set_read_timeout(Some(WAIT))?;
        stream.set_nodelay(true)?;
        Ok(LineClient { writer: stream.try_clone()?, reader: BufReader::new(stream) })
    }

    /// The client's local port: CRIU's per-connection firewall rules name it.
    pub fn local_port(&self) -> io::Result<u16> {
        Ok(self.writer.local_addr()?.port())
    }

    /// Sends `line` and a newline.
    pub fn send(&mut self, line: &str) -> io::Result<()> {
        self.writer.write_all(format!("{line}\n").as_bytes())
    }

    /// Reads one line, without its newline. End of stream is an error.
    pub fn recv(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"));
        }
        Ok(line.trim_end_matches('\n').to_string())
    }

    pub fn round_trip(&mut self, line: &str) -> io::Result<String> {
        self.send(line)?;
        self.recv()
    }
}

/// tools/probe_client.py in echo mode against `ip:port`: `conns` connections sending and
/// checking continuously until [`Probe::finish`], however long what it watches takes (a fixed
/// duration fails a slow migration on a loaded machine: a request still unanswered when the
/// probe stops counts as an error).
#[derive(Debug)]
pub struct Probe {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Probe {
    pub fn echo(probe_client: &std::path::Path, ip: std::net::Ipv4Addr, port: u16, conns: u32) -> Probe {
        let dir = tempfile::tempdir().expect("a temporary directory for the probe");
        let child = std::process::Command::new("/usr/bin/python3")
            .arg(probe_client)
            .args(["echo", &ip.to_string(), &port.to_string(), "--conns", &conns.to_string()])
            .arg("--stop-file")
            .arg(dir.path().join("stop"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start tools/probe_client.py");
        Probe { child, dir }
    }

    /// Lets it run `settle` longer, stops it and returns its JSON summary.
    pub fn finish(self, settle: std::time::Duration) -> serde_json::Value {
        std::thread::sleep(settle);
        std::fs::write(self.dir.path().join("stop"), b"").expect("write the probe's stop file");
        let out = self.child.wait_with_output().expect("wait for the probe");
        serde_json::from_slice(&out.stdout).expect("the probe's JSON summary")
    }
}
