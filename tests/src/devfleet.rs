//! The dev fleet's state file, shared by `cbus-dev` (which writes it) and whoever looks at a
//! running dev fleet (`cbus-dev status`, the dev-fleet test). The fleet outlives the `cbus-dev
//! up` that started it, so what it started is recorded here rather than held as child handles.

use std::path::{Path, PathBuf};

use crate::machines::{Machine, MachineRecord};

/// The state file's name in the dev fleet's directory (`CBUS_DEV_DIR`, default `.dev`).
pub const STATE_FILE: &str = "state.json";

/// Reading or writing the state file failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// A server process of the fleet (nats-server, cbus-gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Server {
    pub pid: u32,
    pub port: u16,
}

impl Server {
    pub fn alive(&self) -> bool {
        crate::procs::alive(self.pid)
    }
}

/// A machine of the dev fleet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DevMachine {
    #[serde(flatten)]
    pub record: MachineRecord,
    /// The number in its name (`cbus-3`): odd ones are `role=web`, even ones `role=worker`.
    pub index: u32,
    /// The cbus nkey derived from its host key: its NATS user.
    pub nkey: String,
    /// Where its demo web server listens on 127.0.0.1 (machines share the host's loopback).
    pub web_port: u16,
    /// The site whose leaf nats-server it dials (`./dev up --sites N`: 1..=N); 0 is the hub.
    #[serde(default)]
    pub site: u32,
}

impl DevMachine {
    /// The running machine, if it still runs.
    pub fn machine(&self) -> Option<Machine> {
        Machine::reattach(&self.record)
    }
}

/// Everything a dev fleet started.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DevState {
    /// The hub's first (or only) nats-server.
    pub nats: Option<Server>,
    /// The hub's other cluster nodes (`./dev up --cluster N`: N - 1 of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<Server>,
    /// The sites' leaf nats-servers (`./dev up --sites N`): site `i` is `sites[i - 1]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<Server>,
    pub gateway: Option<Server>,
    pub machines: Vec<DevMachine>,
}

impl DevState {
    /// The state of the dev fleet in `dir`; the default (nothing started) when there is none.
    pub fn load(dir: &Path) -> Result<DevState, StateError> {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| StateError::Json { path, source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DevState::default()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Writes the state (atomically: a reader never sees half of it).
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(self).expect("the state serialises");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| StateError::Io { path, source })
    }

    /// Removes the state file (after teardown).
    pub fn remove(dir: &Path) -> Result<(), StateError> {
        let path = dir.join(STATE_FILE);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StateError::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }

    /// Every nats-server: the hub's nodes, then the sites' leaves.
    pub fn nats_servers(&self) -> impl Iterator<Item = Server> + '_ {
        self.nats
            .into_iter()
            .chain(self.cluster.iter().copied())
            .chain(self.sites.iter().copied())
    }

    pub fn machine(&self, name: &str) -> Option<&DevMachine> {
        self.machines.iter().find(|m| m.record.name == name)
    }
}

/// A secret of the dev fleet in `dir` (`admin.password`, `gateway.password`, `gateway.token`).
pub fn secret(dir: &Path, name: &str) -> Result<String, StateError> {
    let path = dir.join(name);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| StateError::Io { path, source })
}
