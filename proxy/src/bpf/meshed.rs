//! Node mode's registry of captured cgroups (`SKIFF_MESHED_V2`): cgroup id -> the fast-path
//! scope its connects look services up in.

use std::path::Path;
use std::sync::Mutex;

use aya::maps::{HashMap, MapData, MapError};

use super::reconciler::ScopeId;
use super::{BpfError, cgroup::cgroup_id, map_err};

/// The map name.
pub(super) const MAP_MESHED: &str = "SKIFF_MESHED_V2";

/// The meshed cgroups (node mode only; sidecar mode captures its whole cgroup).
pub struct Meshed {
    map: Mutex<HashMap<MapData, u64, ScopeId>>,
    node_mode: bool,
}

impl Meshed {
    pub(super) fn new(map: HashMap<MapData, u64, ScopeId>, node_mode: bool) -> Self {
        Meshed {
            map: Mutex::new(map),
            node_mode,
        }
    }

    fn require_node_mode(&self) -> Result<(), BpfError> {
        if self.node_mode {
            Ok(())
        } else {
            Err(BpfError::Config(
                "meshed cgroups exist only in node mode".into(),
            ))
        }
    }

    /// Captures tasks in the cgroup at `path` (exactly that cgroup, not its descendants); their
    /// connects see the fast-path services of `scope`. Returns the cgroup id.
    pub fn add(&self, path: &Path, scope: ScopeId) -> Result<u64, BpfError> {
        self.require_node_mode()?;
        let id = cgroup_id(path)?;
        self.lock().insert(id, scope, 0).map_err(|source| {
            map_err(
                MAP_MESHED,
                format!("insert cgroup {} (id {id}) scope {scope}", path.display()),
                source,
            )
        })?;
        Ok(id)
    }

    /// Stops capturing the cgroup at `path`. Not an error if it was not meshed.
    pub fn remove(&self, path: &Path) -> Result<(), BpfError> {
        self.require_node_mode()?;
        self.remove_id(cgroup_id(path)?)
    }

    /// Stops capturing the cgroup with this id (for cgroups already removed).
    pub fn remove_id(&self, id: u64) -> Result<(), BpfError> {
        match self.lock().remove(&id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(map_err(
                MAP_MESHED,
                format!("remove cgroup id {id}"),
                source,
            )),
        }
    }

    /// The ids of the meshed cgroups, sorted.
    pub fn ids(&self) -> Result<Vec<u64>, BpfError> {
        let guard = self.lock();
        let mut ids = guard
            .keys()
            .collect::<Result<Vec<u64>, MapError>>()
            .map_err(|source| map_err(MAP_MESHED, "list keys", source))?;
        ids.sort_unstable();
        Ok(ids)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MapData, u64, ScopeId>> {
        // A panic while holding the lock leaves the map consistent (each write is one syscall).
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for Meshed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meshed")
            .field("node_mode", &self.node_mode)
            .finish_non_exhaustive()
    }
}
