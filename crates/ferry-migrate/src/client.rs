//! The CLI's end of the local API: one request on the agent's Unix socket, events until the
//! last one (a report, a status, or a failure).

use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::api::{Event, Request, API_CAP, KIND_API};
use crate::MigrateError;

/// Sends `req` to the agent at `socket`; `on_event` sees progress; returns the final event.
pub fn call(socket: &Path, req: &Request, on_event: &mut dyn FnMut(&Event)) -> Result<Event, MigrateError> {
    let mut s = UnixStream::connect(socket).map_err(|e| MigrateError::Connect {
        node: "the local agent".into(),
        addr: socket.display().to_string(),
        detail: e.to_string(),
    })?;
    ferry_wire::frame::send(&mut s, KIND_API, req)?;
    loop {
        let (_, ev): (u16, Event) = ferry_wire::frame::recv(&mut s, API_CAP)?.ok_or_else(|| {
            MigrateError::Lost { node: "the local agent".into(), phase: "the request".into() }
        })?;
        match ev {
            Event::Progress(_) | Event::Phase(_) => on_event(&ev),
            last => return Ok(last),
        }
    }
}
