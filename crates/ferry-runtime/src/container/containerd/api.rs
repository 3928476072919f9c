//! containerd's gRPC API through `containerd-client`, driven synchronously: one current-thread
//! tokio runtime per connection, every call a `block_on` with a time limit, the namespace (and
//! a lease, where one is held) in each request's metadata.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    containers_client::ContainersClient, namespaces_client::NamespacesClient, tasks_client::TasksClient,
    version_client::VersionClient, Container, DeleteContainerRequest, DeleteTaskRequest, GetContainerRequest,
    GetRequest, KillRequest, ListContainersRequest, ListNamespacesRequest, ListTasksRequest,
};
use containerd_client::tonic::metadata::AsciiMetadataValue;
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::v1::Process;
use containerd_client::types::Mount;
use prost14::Message;
use prost_types::Any;

use crate::Error;

use super::KIND;

/// Time limit of a plain call (a daemon that hangs must not hang ferry).
pub(super) const CALL_LIMIT: Duration = Duration::from_secs(60);
/// Time limit of a call that runs CRIU (`tasks.Start` of a restore of GiBs).
pub(super) const RESTORE_LIMIT: Duration = Duration::from_secs(600);
const CONNECT_LIMIT: Duration = Duration::from_secs(5);

/// The snapshotter ferry's containers use (the research found only overlayfs here).
pub(super) const SNAPSHOTTER: &str = "overlayfs";
/// How containerd 1.6 names the OCI spec in a container's record.
pub(super) const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// How containerd 1.6 registers runc's options (its typeurl takes the bare proto name).
pub(super) const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";
/// The runtime (shim) ferry creates containers with.
pub(super) const RUNC_V2: &str = "io.containerd.runc.v2";

/// `containerd.runc.v1.Options` (containerd's `runtime/v2/runc/options/oci.proto`), which
/// `containerd-client` does not carry. The options given to `tasks.Create` replace the
/// container's for the shim: `root` must be repeated there.
#[derive(Clone, PartialEq, Message, serde::Serialize, serde::Deserialize)]
#[prost(prost_path = "::prost14")]
pub(super) struct RuncOptions {
    #[prost(bool, tag = "1")]
    #[serde(default)]
    pub no_pivot_root: bool,
    #[prost(bool, tag = "2")]
    #[serde(default)]
    pub no_new_keyring: bool,
    #[prost(string, tag = "3")]
    #[serde(default)]
    pub shim_cgroup: String,
    #[prost(uint32, tag = "4")]
    #[serde(default)]
    pub io_uid: u32,
    #[prost(uint32, tag = "5")]
    #[serde(default)]
    pub io_gid: u32,
    #[prost(string, tag = "6")]
    #[serde(default)]
    pub binary_name: String,
    /// runc's root (runc keeps its state in `ROOT/NAMESPACE/ID`); containerd's default when empty.
    #[prost(string, tag = "7")]
    #[serde(default)]
    pub root: String,
    #[prost(string, tag = "8")]
    #[serde(default)]
    pub criu_path: String,
    #[prost(bool, tag = "9")]
    #[serde(default)]
    pub systemd_cgroup: bool,
    /// A restore: the directory `runc restore --image-path` gets.
    #[prost(string, tag = "10")]
    #[serde(default)]
    pub criu_image_path: String,
    /// A restore: `runc restore --work-path`.
    #[prost(string, tag = "11")]
    #[serde(default)]
    pub criu_work_path: String,
}

impl RuncOptions {
    pub fn to_any(&self) -> Any {
        Any { type_url: RUNC_OPTIONS_TYPE_URL.into(), value: self.encode_to_vec() }
    }

    /// The options in a container's runtime record (none: all defaults).
    pub fn from_any(any: Option<&Any>) -> Result<RuncOptions, String> {
        let Some(any) = any.filter(|a| !a.type_url.is_empty()) else { return Ok(RuncOptions::default()) };
        if !any.type_url.trim_start_matches("type.googleapis.com/").ends_with(RUNC_OPTIONS_TYPE_URL) {
            return Err(format!("runtime options of type {} are not runc's", any.type_url));
        }
        RuncOptions::decode(any.value.as_slice()).map_err(|e| format!("runc options: {e}"))
    }
}

/// A connection to one containerd.
pub(super) struct Api {
    rt: tokio::runtime::Runtime,
    ch: Channel,
    socket: PathBuf,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("socket", &self.socket).finish_non_exhaustive()
    }
}

/// A request in namespace `ns` (and lease `lease`, if any).
pub(super) fn req<T>(ns: &str, lease: Option<&str>, msg: T) -> Result<Request<T>, Status> {
    let mut r = Request::new(msg);
    let value = |v: &str| {
        AsciiMetadataValue::try_from(v)
            .map_err(|_| Status::invalid_argument(format!("'{v}' is no header value")))
    };
    r.metadata_mut().insert("containerd-namespace", value(ns)?);
    if let Some(l) = lease {
        r.metadata_mut().insert("containerd-lease", value(l)?);
    }
    Ok(r)
}

pub(super) fn not_found(s: &Status) -> bool {
    s.code() == Code::NotFound
}

impl Api {
    /// Connects to the daemon listening on `socket` and checks that it answers.
    pub fn connect(socket: &Path) -> Result<Api, Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start a tokio runtime: {e}")))?;
        let unavailable = |detail: String| Error::runtime_unavailable(KIND, socket, detail);
        if !socket.exists() {
            return Err(unavailable("its socket does not exist (is containerd running?)".into()));
        }
        let ch = rt
            .block_on(async { tokio::time::timeout(CONNECT_LIMIT, containerd_client::connect(socket)).await })
            .map_err(|_| unavailable("no connection within 5 s".into()))?
            .map_err(|e| unavailable(format!("cannot connect: {}", error_chain(&e))))?;
        let api = Api { rt, ch, socket: socket.to_owned() };
        api.call("version", CONNECT_LIMIT, |ch| async move { VersionClient::new(ch).version(()).await })
            .map_err(|s| unavailable(format!("it does not answer: {}", s.message())))?;
        Ok(api)
    }

    pub fn channel(&self) -> Channel {
        self.ch.clone()
    }

    /// Runs one call (made by `f` over the channel) within `limit`.
    pub fn call<T, F, Fut>(&self, what: &str, limit: Duration, f: F) -> Result<T, Status>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<containerd_client::tonic::Response<T>, Status>>,
    {
        let fut = f(self.ch.clone());
        self.block_on(what, limit, async move { fut.await.map(|r| r.into_inner()) })
    }

    /// Runs `fut` (several calls, or a stream) within `limit`.
    pub fn block_on<T>(
        &self,
        what: &str,
        limit: Duration,
        fut: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        self.rt.block_on(async {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => {
                    Err(Status::deadline_exceeded(format!("{what}: no answer within {} s", limit.as_secs())))
                }
            }
        })
    }

    /// A failed call as ferry's error: a daemon gone is `RuntimeUnavailable`.
    pub fn error(&self, what: &str, s: &Status) -> Error {
        match s.code() {
            Code::Unavailable | Code::DeadlineExceeded => {
                Error::runtime_unavailable(KIND, &self.socket, format!("{what}: {}", s.message()))
            }
            _ => Error::runtime_failed(KIND, what, s.message(), None),
        }
    }

    pub fn namespaces(&self) -> Result<Vec<String>, Status> {
        let r = ListNamespacesRequest { filter: String::new() };
        let out = self.call("namespaces.List", CALL_LIMIT, |ch| async move {
            NamespacesClient::new(ch).list(Request::new(r)).await
        })?;
        Ok(out.namespaces.into_iter().map(|n| n.name).collect())
    }

    pub fn container(&self, ns: &str, id: &str) -> Result<Option<Container>, Status> {
        let r = req(ns, None, GetContainerRequest { id: id.into() })?;
        match self.call(
            "containers.Get",
            CALL_LIMIT,
            |ch| async move { ContainersClient::new(ch).get(r).await },
        ) {
            Ok(c) => Ok(c.container),
            Err(s) if not_found(&s) => Ok(None),
            Err(s) => Err(s),
        }
    }

    pub fn containers(&self, ns: &str) -> Result<Vec<Container>, Status> {
        let r = req(ns, None, ListContainersRequest { filters: Vec::new() })?;
        let out =
            self.call(
                "containers.List",
                CALL_LIMIT,
                |ch| async move { ContainersClient::new(ch).list(r).await },
            )?;
        Ok(out.containers)
    }

    /// Deletes a container's record; an absent one is fine.
    pub fn delete_container(&self, ns: &str, id: &str) -> Result<(), Status> {
        let r = req(ns, None, DeleteContainerRequest { id: id.into() })?;
        match self.call("containers.Delete", CALL_LIMIT, |ch| async move {
            ContainersClient::new(ch).delete(r).await
        }) {
            Ok(()) => Ok(()),
            Err(s) if not_found(&s) => Ok(()),
            Err(s) => Err(s),
        }
    }

    pub fn task(&self, ns: &str, id: &str) -> Result<Option<Process>, Status> {
        let r = req(ns, None, GetRequest { container_id: id.into(), exec_id: String::new() })?;
        match self.call("tasks.Get", CALL_LIMIT, |ch| async move { TasksClient::new(ch).get(r).await }) {
            Ok(t) => Ok(t.process),
            Err(s) if not_found(&s) => Ok(None),
            Err(s) => Err(s),
        }
    }

    pub fn tasks(&self, ns: &str) -> Result<Vec<Process>, Status> {
        let r = req(ns, None, ListTasksRequest { filter: String::new() })?;
        Ok(self.call("tasks.List", CALL_LIMIT, |ch| async move { TasksClient::new(ch).list(r).await })?.tasks)
    }

    pub fn kill(&self, ns: &str, id: &str, signal: u32) -> Result<(), Status> {
        let r = req(
            ns,
            None,
            KillRequest { container_id: id.into(), exec_id: String::new(), signal, all: true },
        )?;
        self.call("tasks.Kill", CALL_LIMIT, |ch| async move { TasksClient::new(ch).kill(r).await })
    }

    /// Deletes a task (never with force: containerd 1.6 then waits forever for a task created
    /// from a checkpoint and never started); an absent one is fine.
    pub fn delete_task(&self, ns: &str, id: &str) -> Result<(), Status> {
        let r = req(ns, None, DeleteTaskRequest { container_id: id.into() })?;
        match self.call("tasks.Delete", CALL_LIMIT, |ch| async move { TasksClient::new(ch).delete(r).await })
        {
            Ok(_) => Ok(()),
            Err(s) if not_found(&s) => Ok(()),
            Err(s) => Err(s),
        }
    }

    pub fn prepare(
        &self,
        ns: &str,
        lease: Option<&str>,
        key: &str,
        parent: &str,
    ) -> Result<Vec<Mount>, Status> {
        let r = req(
            ns,
            lease,
            PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
                parent: parent.into(),
                labels: HashMap::new(),
            },
        )?;
        let out = self.call("snapshots.Prepare", CALL_LIMIT, |ch| async move {
            SnapshotsClient::new(ch).prepare(r).await
        })?;
        Ok(out.mounts)
    }

    /// The parent of snapshot `key`, `None` if there is no such snapshot.
    pub fn snapshot_parent(&self, ns: &str, snapshotter: &str, key: &str) -> Result<Option<String>, Status> {
        let r = req(ns, None, StatSnapshotRequest { snapshotter: snapshotter.into(), key: key.into() })?;
        match self.call(
            "snapshots.Stat",
            CALL_LIMIT,
            |ch| async move { SnapshotsClient::new(ch).stat(r).await },
        ) {
            Ok(s) => Ok(Some(s.info.map(|i| i.parent).unwrap_or_default())),
            Err(s) if not_found(&s) => Ok(None),
            Err(s) => Err(s),
        }
    }

    /// Removes snapshot `key`; an absent one is fine.
    pub fn remove_snapshot(&self, ns: &str, snapshotter: &str, key: &str) -> Result<(), Status> {
        let r = req(ns, None, RemoveSnapshotRequest { snapshotter: snapshotter.into(), key: key.into() })?;
        match self.call("snapshots.Remove", CALL_LIMIT, |ch| async move {
            SnapshotsClient::new(ch).remove(r).await
        }) {
            Ok(()) => Ok(()),
            Err(s) if not_found(&s) => Ok(()),
            Err(s) => Err(s),
        }
    }
}

/// An error with its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_options_round_trip_with_their_tags() {
        let o =
            RuncOptions { root: "/run/x/runc".into(), criu_image_path: "/s".into(), ..Default::default() };
        let any = o.to_any();
        assert_eq!(any.type_url, "containerd.runc.v1.Options");
        // root is field 7 (tag 0x3a), criu_image_path field 10 (tag 0x52): what runc's shim reads.
        assert_eq!(&any.value[..2], &[0x3a, 11]);
        assert_eq!(any.value[13], 0x52);
        assert_eq!(RuncOptions::from_any(Some(&any)).expect("decode"), o);
        assert_eq!(RuncOptions::from_any(None).expect("none"), RuncOptions::default());
        let other = Any { type_url: "containerd.linux.runc.RuncOptions".into(), value: Vec::new() };
        assert!(RuncOptions::from_any(Some(&other)).is_err());
    }

    #[test]
    fn requests_carry_namespace_and_lease() {
        let r = req("ns1", Some("lease-1"), ()).expect("request");
        assert_eq!(r.metadata().get("containerd-namespace").and_then(|v| v.to_str().ok()), Some("ns1"));
        assert_eq!(r.metadata().get("containerd-lease").and_then(|v| v.to_str().ok()), Some("lease-1"));
        assert!(req("bad\nns", None, ()).is_err());
    }
}
