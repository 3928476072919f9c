//! The Docker Engine API through bollard, pinned to API 1.41 (Docker 20.10 refuses newer
//! clients) and driven synchronously: each [`Api`] owns a current-thread tokio runtime and
//! blocks on one call at a time.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummary, ContainerUpdateBody, ImageInspect,
    ImageSummary, RestartPolicy, SystemInfo,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    ListImagesOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::{ClientVersion, Docker};
use futures_util::TryStreamExt;

use crate::Error;

pub(super) const KIND: &str = "docker";
/// The API version Docker 20.10 speaks (its highest).
const API: ClientVersion = ClientVersion { major_version: 1, minor_version: 41 };
/// Seconds an ordinary call may take.
const CALL_TIMEOUT: u64 = 120;
/// A restore of GiBs runs inside one call (`start?checkpoint=`).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(1800);

/// A connection to one dockerd.
pub(super) struct Api {
    rt: tokio::runtime::Runtime,
    docker: Docker,
    socket: PathBuf,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("socket", &self.socket).finish()
    }
}

/// Whether a failed call reached Docker, and what it said.
pub(super) enum CallError {
    /// Docker answered with this status and message.
    Docker(u16, String),
    /// Docker did not answer.
    Unreachable(String),
}

impl Api {
    pub(super) fn connect(socket: &Path) -> Result<Api, Error> {
        let unavailable = |d: String| Error::runtime_unavailable(KIND, socket, d);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("cannot make a tokio runtime: {e}")))?;
        let path = socket.to_str().ok_or_else(|| unavailable("the socket path is not UTF-8".into()))?;
        let docker = Docker::connect_with_unix(path, CALL_TIMEOUT, &API).map_err(|e| match e {
            bollard::errors::Error::SocketNotFoundError(_) => unavailable("no socket there".into()),
            e => unavailable(e.to_string()),
        })?;
        Ok(Api { rt, docker, socket: socket.to_path_buf() })
    }

    pub(super) fn socket(&self) -> &Path {
        &self.socket
    }

    fn run<T, F>(&self, f: F) -> Result<T, CallError>
    where
        F: Future<Output = Result<T, bollard::errors::Error>>,
    {
        self.rt.block_on(f).map_err(|e| match e {
            bollard::errors::Error::DockerResponseServerError { status_code, message } => {
                CallError::Docker(status_code, message)
            }
            bollard::errors::Error::DockerStreamError { error } => CallError::Docker(500, error),
            e => CallError::Unreachable(e.to_string()),
        })
    }

    /// `action` failed: Docker's answer, or that it does not answer.
    pub(super) fn error(&self, action: &str, e: CallError) -> Error {
        match e {
            CallError::Docker(status, message) => {
                Error::runtime_failed(KIND, action, format!("{message} (HTTP {status})"), None)
            }
            CallError::Unreachable(detail) => Error::runtime_unavailable(KIND, &self.socket, detail),
        }
    }

    /// Runs `f`, mapping every failure with [`Api::error`].
    fn call<T, F>(&self, action: &str, f: F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, bollard::errors::Error>>,
    {
        self.run(f).map_err(|e| self.error(action, e))
    }

    pub(super) fn ping(&self) -> Result<(), Error> {
        self.call("GET /_ping", self.docker.ping()).map(drop)
    }

    pub(super) fn info(&self) -> Result<SystemInfo, Error> {
        self.call("GET /info", self.docker.info())
    }

    /// The container `id` (name or id); `None` if Docker has none such.
    pub(super) fn inspect(&self, id: &str) -> Result<Option<ContainerInspectResponse>, Error> {
        match self.run(self.docker.inspect_container(id, None)) {
            Ok(c) => Ok(Some(c)),
            Err(CallError::Docker(404, _)) => Ok(None),
            Err(e) => Err(self.error(&format!("GET /containers/{id}/json"), e)),
        }
    }

    pub(super) fn create(&self, name: &str, body: ContainerCreateBody) -> Result<String, Error> {
        let opts = CreateContainerOptionsBuilder::default().name(name).build();
        let created = self.call("POST /containers/create", self.docker.create_container(Some(opts), body))?;
        for w in created.warnings.iter().filter(|w| !w.is_empty()) {
            tracing::debug!(container = name, warning = %w, "Docker's warning");
        }
        Ok(created.id)
    }

    pub(super) fn start(&self, id: &str) -> Result<(), CallError> {
        self.run(self.docker.start_container(id, None))
    }

    /// `POST /containers/{id}/start?checkpoint=NAME`: bollard's `StartContainerOptions` has only
    /// `detachKeys`, so a request modifier of this call's own client adds the parameter.
    pub(super) fn start_from_checkpoint(&self, id: &str, checkpoint: &str) -> Result<(), CallError> {
        let query = format!("checkpoint={checkpoint}");
        let docker =
            self.docker.clone().with_timeout(RESTORE_TIMEOUT).with_request_modifier(move |mut req| {
                let uri = req.uri().to_string();
                let sep = if uri.contains('?') { '&' } else { '?' };
                match format!("{uri}{sep}{query}").parse() {
                    Ok(u) => *req.uri_mut() = u,
                    Err(e) => tracing::warn!(error = %e, "cannot add the checkpoint to the start request"),
                }
                req
            });
        self.run(docker.start_container(id, None))
    }

    pub(super) fn set_restart_policy(&self, id: &str, policy: RestartPolicy) -> Result<(), Error> {
        let body = ContainerUpdateBody { restart_policy: Some(policy), ..Default::default() };
        self.call(&format!("POST /containers/{id}/update"), self.docker.update_container(id, body))
    }

    /// Kills and removes `id`; gone already is fine.
    pub(super) fn remove(&self, id: &str) -> Result<(), Error> {
        let opts = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.run(self.docker.remove_container(id, Some(opts))) {
            Ok(()) | Err(CallError::Docker(404, _)) => Ok(()),
            Err(e) => Err(self.error(&format!("DELETE /containers/{id}"), e)),
        }
    }

    pub(super) fn list(&self) -> Result<Vec<ContainerSummary>, Error> {
        let opts = ListContainersOptionsBuilder::default().all(true).build();
        self.call("GET /containers/json", self.docker.list_containers(Some(opts)))
    }

    /// The image `name` (a name or an id); `None` if Docker has none such.
    pub(super) fn image(&self, name: &str) -> Result<Option<ImageInspect>, Error> {
        match self.run(self.docker.inspect_image(name)) {
            Ok(i) => Ok(Some(i)),
            Err(CallError::Docker(404, _)) => Ok(None),
            Err(e) => Err(self.error(&format!("GET /images/{name}/json"), e)),
        }
    }

    pub(super) fn images(&self) -> Result<Vec<ImageSummary>, Error> {
        let opts = ListImagesOptionsBuilder::default().all(false).build();
        self.call("GET /images/json", self.docker.list_images(Some(opts)))
    }

    /// `POST /images/create?fromSrc=-&repo=REPO&tag=TAG` with a root filesystem's tar.
    pub(super) fn import(&self, tar: Vec<u8>, repo: &str, tag: &str) -> Result<(), Error> {
        let opts = CreateImageOptionsBuilder::default().from_src("-").repo(repo).tag(tag).build();
        let body = bollard::body_full(tar.into());
        let stream = self.docker.create_image(Some(opts), Some(body), None);
        let infos: Vec<_> = self.call("POST /images/create", stream.try_collect())?;
        tracing::debug!(image = %format!("{repo}:{tag}"), answers = infos.len(), "imported");
        Ok(())
    }

    pub(super) fn delete_checkpoint(&self, id: &str, name: &str) -> Result<(), CallError> {
        self.run(self.docker.delete_checkpoint(id, name, None))
    }

    /// The runtimes registered in the daemon: name, path, arguments.
    pub(super) fn runtimes(info: &SystemInfo) -> HashMap<String, (String, Vec<String>)> {
        info.runtimes
            .iter()
            .flatten()
            .map(|(name, r)| {
                (
                    name.clone(),
                    (r.path.clone().unwrap_or_default(), r.runtime_args.clone().unwrap_or_default()),
                )
            })
            .collect()
    }
}
