//! The config entry (`SKIFF_CONFIG[0]`) and the ready gate it carries.
//!
//! Two parts of userspace write the one entry: the ready gate (`ready`) and the fast-path
//! owner (`fast_path`, `fast_gen`). Each write is a whole-value update of a copy kept here, under
//! one lock, so neither can undo the other's field.

use std::sync::{Arc, Mutex};

use aya::maps::{Array, MapData};
use skiff_common::{CONFIG_INDEX, ConfigValue};

use super::{BpfError, map_err};

/// The map name of the config entry.
pub(super) const MAP_CONFIG: &str = "SKIFF_CONFIG";

/// `SKIFF_CONFIG[0]` and the value last written to it.
pub(crate) struct ConfigMap {
    inner: Mutex<(Array<MapData, ConfigValue>, ConfigValue)>,
}

impl ConfigMap {
    /// Writes `initial` and keeps the map.
    pub(super) fn new(
        mut map: Array<MapData, ConfigValue>,
        initial: ConfigValue,
    ) -> Result<Self, BpfError> {
        map.set(CONFIG_INDEX, initial, 0)
            .map_err(|source| map_err(MAP_CONFIG, "set index 0", source))?;
        Ok(ConfigMap {
            inner: Mutex::new((map, initial)),
        })
    }

    /// The value last written.
    pub(super) fn current(&self) -> ConfigValue {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// Applies `change` to the current value and writes it (one map update); `what` names the
    /// change in errors. On failure the kept value is unchanged.
    pub(super) fn update(
        &self,
        what: impl FnOnce() -> String,
        change: impl FnOnce(&mut ConfigValue),
    ) -> Result<(), BpfError> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (map, value) = &mut *guard;
        let mut next = *value;
        change(&mut next);
        map.set(CONFIG_INDEX, next, 0)
            .map_err(|source| map_err(MAP_CONFIG, what(), source))?;
        *value = next;
        Ok(())
    }
}

/// The ready gate: closed, connects go to their original destination (or are refused in
/// fail-closed mode); open, they are captured.
#[derive(Clone)]
pub struct ReadyGate {
    config: Arc<ConfigMap>,
}

impl ReadyGate {
    pub(super) fn new(config: Arc<ConfigMap>) -> Self {
        ReadyGate { config }
    }

    /// Opens (`true`) or closes the gate.
    pub fn set(&self, ready: bool) -> Result<(), BpfError> {
        self.config.update(
            || format!("set ready={ready}"),
            |v| v.ready = u8::from(ready),
        )
    }
}

impl std::fmt::Debug for ReadyGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadyGate")
    }
}
